"""LM2-style memory bank (Kang et al., 2025, "LM2: Large Memory Models"): slots read by
cross-attention from the hidden states, added through an output gate, written with input/forget
gates.

LM2 states the update per token (``M ← g_in ⊙ tanh(E_mem) + g_forget ⊙ M``) without saying how a
sequence of T token read-outs maps onto N slots. Here each slot gathers what it writes by
attending to the tokens of an update chunk (C tokens, aligned to absolute positions), and
tokens read the bank as of the start of their chunk, so the layer is causal and a sequence fed
in pieces gives the same outputs as fed whole:

    read   (token t in chunk c)   E_t = W_o · MHA(q = W_q e_t;  k, v = W_k M_c, W_v M_c)
           output                 y_t = σ(W_g e_t + b_g) ⊙ E_t
    write  (after chunk c)        U   = MHA(q = W_q M_c;  k, v = W_k e_{c}, W_v e_{c})   (slot-wise)
                                  M_{c+1} = σ(W_in U + b_in) ⊙ tanh(U) + σ(W_f U + b_f) ⊙ M_c

``W_o`` starts at zero, so the bank adds exactly nothing until training moves it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from olmo_core.config import Config

from .state import LM2State

__all__ = ["LM2MemoryConfig", "LM2MemoryBank"]


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


@dataclass
class LM2MemoryConfig(Config):
    """Sizes and gate initialisation of an :class:`LM2MemoryBank`."""

    n_slots: int = 16
    n_heads: Optional[int] = None
    """Heads of the read/write cross-attention; defaults to the attention's ``n_heads``."""
    chunk_size: Optional[int] = None
    """Tokens per bank update (the bank is written once per chunk); ``None``: the model's memory
    ``chunk_size`` (:class:`~olmo_miras_plugin.models.MirasMemoryConfig`), 64 standalone."""
    input_gate_init: float = 0.1
    forget_gate_init: float = 0.9

    def resolved_chunk_size(self) -> int:
        return self.chunk_size if self.chunk_size is not None else 64

    def resolved_n_heads(self, default: int) -> int:
        return self.n_heads if self.n_heads is not None else default

    def validate_for(self, d_model: int, default_heads: int) -> None:
        h = self.resolved_n_heads(default_heads)
        if not isinstance(self.n_slots, int) or self.n_slots <= 0:
            raise ValueError(f"LM2 n_slots must be a positive integer, got {self.n_slots!r}")
        if not isinstance(h, int) or h <= 0:
            raise ValueError(f"LM2 n_heads must be a positive integer, got {h!r}")
        if d_model % h != 0:
            raise ValueError(f"LM2 memory: d_model={d_model} is not divisible by n_heads={h}")
        if self.chunk_size is not None and (not isinstance(self.chunk_size, int) or self.chunk_size <= 0):
            raise ValueError(f"LM2 chunk_size must be a positive integer, got {self.chunk_size!r}")
        for name in ("input_gate_init", "forget_gate_init"):
            val = getattr(self, name)
            if not 0 < val < 1:
                raise ValueError(f"LM2 {name} must be in (0, 1), got {val!r}")

    def num_params(self, d_model: int) -> int:
        # slots, q/k/v/o projections, output gate (+bias), input and forget gates (+bias)
        return self.n_slots * d_model + 4 * d_model * d_model + 3 * (d_model * d_model + d_model)


class LM2MemoryBank(nn.Module):
    """``forward(e, state) -> (y, state)`` with ``e, y: (batch, seq, d_model)``; see the module docstring."""

    def __init__(
        self,
        config: LM2MemoryConfig,
        *,
        d_model: int,
        n_heads: int,
        dtype: torch.dtype = torch.float32,
        init_device: str = "cpu",
    ):
        super().__init__()
        config.validate_for(d_model, n_heads)
        self.config = config
        self.d_model = d_model
        self.n_heads = config.resolved_n_heads(n_heads)
        self.chunk_size = config.resolved_chunk_size()
        self.slots = nn.Parameter(torch.empty(config.n_slots, d_model, dtype=dtype, device=init_device))
        lin = lambda bias: nn.Linear(d_model, d_model, bias=bias, dtype=dtype, device=init_device)  # noqa: E731
        self.w_q, self.w_k, self.w_v, self.w_o = lin(False), lin(False), lin(False), lin(False)
        self.w_gate, self.w_in, self.w_forget = lin(True), lin(True), lin(True)

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02, generator: Optional[torch.Generator] = None) -> None:
        """Slots ~ N(0, 1) (the scale of normed hidden states); W_o = 0 (adds nothing at init)."""
        nn.init.normal_(self.slots, std=1.0, generator=generator)
        for w in (self.w_q, self.w_k, self.w_v, self.w_gate, self.w_in, self.w_forget):
            nn.init.normal_(w.weight, std=std, generator=generator)
        self.w_o.weight.zero_()
        self.w_gate.bias.zero_()
        self.w_in.bias.fill_(_logit(self.config.input_gate_init))
        self.w_forget.bias.fill_(_logit(self.config.forget_gate_init))

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> LM2State:
        dt = torch.promote_types(dtype, torch.float32)
        bank = self.slots.to(device=device, dtype=dt).unsqueeze(0).expand(batch_size, -1, -1)
        pending = torch.zeros(batch_size, 0, self.d_model, device=device, dtype=dtype)
        return LM2State(bank, pending, 0)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(x, "... n (h d) -> ... h n d", h=self.n_heads)

    def _write(self, bank: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One update: ``bank (b, slots, d)`` reads the chunk's keys/values ``(b, heads, C, head_dim)``."""
        # shape: (batch, heads, slots, head_dim) attending to (batch, heads, C, head_dim)
        q = self._heads(self.w_q(bank.to(k.dtype)))
        u = rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)")
        g_in, g_forget = torch.sigmoid(self.w_in(u)), torch.sigmoid(self.w_forget(u))
        return (g_in * torch.tanh(u)).to(bank.dtype) + g_forget.to(bank.dtype) * bank

    def forward(  # type: ignore[override]
        self, e: torch.Tensor, state: Optional[LM2State] = None
    ) -> Tuple[torch.Tensor, LM2State]:
        b, t, _ = e.shape
        if state is None:
            state = self.init_state(b, e.device, e.dtype)
        elif state.bank.shape[0] != b:
            raise ValueError(f"LM2 state has batch size {state.bank.shape[0]} but the input has {b}")
        c = self.chunk_size
        r = state.pending.shape[1]
        # The unfinished chunk's earlier tokens go in front: the write needs the whole chunk.
        xs = torch.cat([state.pending.to(e.dtype), e], dim=1)
        n_full, n_read = (r + t) // c, -(-(r + t) // c)

        # Token keys/values of all whole chunks at once; only the slot side is sequential.
        # shape: (batch, heads, n_full, C, head_dim); unbind, not slicing in the loop, keeps the
        # backward linear in the number of chunks.
        whole = xs[:, : n_full * c]
        k_tok, v_tok = (
            rearrange(self._heads(w(whole)), "b h (n c) d -> b h n c d", c=c) for w in (self.w_k, self.w_v)
        )
        banks = [state.bank]
        for k_c, v_c in zip(k_tok.unbind(2), v_tok.unbind(2)):
            banks.append(self._write(banks[-1], k_c, v_c))

        # Every token reads the bank as of the start of its chunk.
        # shape: (batch, n_read, heads, C, head_dim)
        xp = F.pad(xs, (0, 0, 0, n_read * c - r - t))
        q = rearrange(self._heads(self.w_q(xp)), "b h (n c) d -> b n h c d", c=c)
        # shape: (batch, n_read, slots, d_model) -> (batch, n_read, heads, slots, head_dim)
        bank_stack = torch.stack(banks[:n_read], dim=1).to(e.dtype)
        k, v = self._heads(self.w_k(bank_stack)), self._heads(self.w_v(bank_stack))
        read = rearrange(F.scaled_dot_product_attention(q, k, v), "b n h c d -> b (n c) (h d)")[:, r : r + t]
        y = torch.sigmoid(self.w_gate(e)) * self.w_o(read)
        new_state = LM2State(banks[n_full], xs[:, n_full * c :], state.position + t)
        return y, new_state
