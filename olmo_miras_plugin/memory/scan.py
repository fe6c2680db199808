"""The memory read/write scan over a sequence: the reference loop and the chunk-parallel form.

Both compute, per head and batch element, with chunks of C tokens aligned to absolute positions:

    for each chunk c:   W = φ(A) at the chunk start
        read   y_t = M_W(q_t)                 for t in c   (the memory as of the end of the
                                                            previous chunk: strictly causal)
        write  G_t = ∇_W ℓ(M_W; k_t, v_t)      for t in c   (all at the chunk-start weights,
                                                            each clipped to norm ≤ τ)
               S_t = η_t S_{t−1} − θ_t G_t;  A_t = (1 − α_t) A_{t−1} + S_t

With C = 1 this is the fully sequential recurrence (read with the state after t − 1, then write).
"""

from __future__ import annotations

import types
import weakref
from typing import Callable, List, NamedTuple, Optional, Tuple

import torch
from einops import rearrange

from .architecture import MemoryArchitecture
from .objective import AttentionalBias
from .optimizer import ChunkCoefficients, MemoryOptimizer
from .retention import Retention
from .state import map_read_weights

__all__ = ["MemoryRule", "Gates", "ScanState", "reference_scan", "chunked_scan", "chunk_step"]


class MemoryRule(NamedTuple):
    """The four MIRAS design axes, built."""

    architecture: MemoryArchitecture
    objective: AttentionalBias
    retention: Retention
    optimizer: MemoryOptimizer


class Gates(NamedTuple):
    """Per-token gates, each ``(batch, n_heads, seq)``, float32."""

    theta: torch.Tensor  # learning rate θ ≥ 0
    eta: torch.Tensor  # momentum η ∈ (0, 1)
    alpha: torch.Tensor  # forget α ∈ (0, 1)
    log_eta: torch.Tensor  # log η, computed stably
    log_keep: torch.Tensor  # log(1 − α), computed stably


class ScanState(NamedTuple):
    accum: List[torch.Tensor]
    momentum: Optional[List[torch.Tensor]]
    read_weights: List[torch.Tensor]
    position: int

    def detach(self) -> "ScanState":
        """Same values, cut from the autograd graph (read weights that are the accumulator stay so)."""
        accum = [a.detach() for a in self.accum]
        momentum = None if self.momentum is None else [m.detach() for m in self.momentum]
        return ScanState(accum, momentum, map_read_weights(torch.Tensor.detach, self.read_weights, self.accum, accum), self.position)


def reference_scan(
    rule: MemoryRule, state: ScanState, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, gates: Gates, chunk_size: int
) -> Tuple[torch.Tensor, ScanState]:
    """Token-by-token loop with autograd for the inner gradient. Slow; exists to be obviously right.

    ``k, v, q``: ``(batch, n_heads, seq, head_dim)``. Returns ``(batch, n_heads, seq, head_dim)``.
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "impl='reference' takes its inner gradients with autograd, which torch.inference_mode() "
            "turns off; run it under torch.no_grad() instead, or use impl='chunked'"
        )
    arch, objective, retention, optimizer = rule
    accum, momentum, read, pos = list(state.accum), state.momentum, list(state.read_weights), state.position
    momentum = None if momentum is None else list(momentum)
    outer_grad = torch.is_grad_enabled()
    outs = []
    for t in range(k.shape[2]):
        if pos % chunk_size == 0:
            read = [retention.materialize(a) for a in accum]
        outs.append(arch(read, q[:, :, t : t + 1]))
        with torch.enable_grad():
            w = [r if (outer_grad and r.requires_grad) else r.detach().requires_grad_() for r in read]
            # Summing over batch and heads keeps per-(batch, head) gradients separate.
            loss = objective.loss(arch(w, k[:, :, t : t + 1]), v[:, :, t : t + 1]).sum()
            grads = torch.autograd.grad(loss, w, create_graph=outer_grad)
        if not outer_grad:
            grads = tuple(g.detach() for g in grads)
        scale = optimizer.clip_scale(sum(g.pow(2).sum(dim=(-2, -1)) for g in grads))
        if scale is not None:
            grads = tuple(g * scale[..., None, None] for g in grads)
        g4 = lambda x: x[:, :, t, None, None]  # noqa: E731  (batch, heads) -> broadcast over weights
        new_accum, new_mom = [], [] if momentum is not None else None
        for i, g in enumerate(grads):
            a, s = optimizer.step(
                accum[i], None if momentum is None else momentum[i], g, g4(gates.theta), g4(gates.eta), g4(gates.alpha)
            )
            new_accum.append(a)
            if new_mom is not None:
                new_mom.append(s)
        accum, momentum = new_accum, new_mom
        pos += 1
    if pos % chunk_size == 0:
        read = [retention.materialize(a) for a in accum]
    return torch.cat(outs, dim=2), ScanState(accum, momentum, read, pos)


def chunked_scan(
    rule: MemoryRule,
    state: ScanState,
    k: torch.Tensor,
    v: torch.Tensor,
    q: torch.Tensor,
    gates: Gates,
    chunk_size: int,
    compiled: bool = False,
) -> Tuple[torch.Tensor, ScanState]:
    """Chunk-parallel form: inside a chunk, gradients and the gate recurrence are solved in parallel.

    The piece is cut on the absolute chunk grid: a head that finishes the chunk the previous
    piece left open, whole chunks, and a tail that opens the next one. Head and tail are processed
    at their true length (no padding), so streaming one token at a time costs one token of work.
    Chunks run one after another.
    """
    optimizer = rule.optimizer
    t = k.shape[2]
    c = chunk_size
    head = min(t, (c - state.position % c) % c)
    n_full = (t - head) // c
    tail = t - head - n_full * c

    accum, momentum, read = list(state.accum), state.momentum, list(state.read_weights)
    momentum = None if momentum is None else list(momentum)
    outs: List[torch.Tensor] = []
    pos, start = state.position, 0
    for length, n_chunks in ((head, 1), (c, n_full), (tail, 1)):
        if length == 0 or n_chunks == 0:
            continue
        span = slice(start, start + length * n_chunks)
        # shape: (batch, heads, n_chunks, length, head_dim)
        kc, vc, qc = (rearrange(x[:, :, span], "b h (n c) d -> b h n c d", c=length) for x in (k, v, q))
        # shape: (batch, heads, n_chunks, length)
        theta, log_eta, log_keep = (
            rearrange(g[:, :, span], "b h (n c) -> b h n c", c=length)
            for g in (gates.theta, gates.log_eta, gates.log_keep)
        )
        coef = optimizer.chunk_coefficients(theta, log_eta, log_keep, torch.ones_like(theta))
        # Only whole chunks go through torch.compile: one shape, no recompiles.
        step = _compiled_chunk_step(rule) if compiled and length == c else chunk_step
        # unbind, not kc[:, :, i]: indexing in the loop makes backward O(N²) (a full-size zero
        # tensor per chunk); unbind's backward is one stack.
        for k_i, q_i, v_i, coef_i in zip(kc.unbind(2), qc.unbind(2), vc.unbind(2), coef.per_chunk()):
            y, accum, momentum, next_read = step(rule, read, accum, momentum, k_i, q_i, v_i, coef_i)
            pos += length
            if pos % c == 0:
                read = next_read  # a finished chunk: the next one reads the new weights
            outs.append(y)
        start = span.stop
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    return out, ScanState(accum, momentum, read, pos)


def chunk_step(
    rule: MemoryRule,
    read: List[torch.Tensor],
    accum: List[torch.Tensor],
    momentum: Optional[List[torch.Tensor]],
    k: torch.Tensor,
    q: torch.Tensor,
    v: torch.Tensor,
    coef: ChunkCoefficients,
):
    """One chunk: read with, and differentiate at, ``read``; return the read-out and the next state.

    ``k, q, v``: ``(batch, heads, C, head_dim)``; ``coef``: this chunk's closed-form coefficients.
    """
    arch, objective, retention, optimizer = rule
    c = k.shape[-2]
    # Keys and queries go through the memory in one pass at the chunk-start weights.
    y, cache = arch.forward_cached(read, torch.cat([k, q], dim=-2))
    grad_out = objective.grad(y[..., :c, :], v)
    factors = arch.backward(read, [z[..., :c, :] for z in cache], grad_out)
    token_weights = optimizer.token_weights(coef)
    # ‖δ ⊗ x‖_F = ‖δ‖·‖x‖, so per-token gradient norms need no outer products.
    scale = optimizer.clip_scale(sum(d.pow(2).sum(-1) * i.pow(2).sum(-1) for d, i in factors))
    if scale is not None:
        token_weights = [w * scale for w in token_weights]
    # Σ_s w_s δ_s ⊗ x_s for every layer and every weighting, one matmul per layer:
    # shape: (n_weightings, batch, heads, d_out, d_in)
    w_stack = torch.stack(token_weights).unsqueeze(-1)
    per_layer = [torch.matmul((delta * w_stack).transpose(-1, -2), inp) for delta, inp in factors]
    weighted = [[g[j] for g in per_layer] for j in range(len(token_weights))]
    accum, momentum = optimizer.chunk_update(accum, momentum, weighted, coef)
    return y[..., c:, :], accum, momentum, [retention.materialize(a) for a in accum]


_COMPILED_STEPS: "weakref.WeakKeyDictionary[MemoryArchitecture, Callable]" = weakref.WeakKeyDictionary()


def _compiled_chunk_step(rule: MemoryRule) -> Callable:
    """``chunk_step`` under ``torch.compile``, one compiled function per layer.

    Dynamo keeps its compiled-code cache on the *code object*, so every layer gets its own copy
    of ``chunk_step``'s code: layers never trigger each other's recompiles or exhaust the shared
    cache limit (and a dynamo bug that crashed when logging the reason for such a recompile,
    seen with torch 2.11, is never reached).
    """
    fn = _COMPILED_STEPS.get(rule.architecture)
    if fn is None:
        code = chunk_step.__code__.replace(co_name=f"chunk_step_{id(rule.architecture):x}")
        step = types.FunctionType(code, chunk_step.__globals__, code.co_name, chunk_step.__defaults__)
        fn = _COMPILED_STEPS[rule.architecture] = torch.compile(step, dynamic=False)
    return fn
