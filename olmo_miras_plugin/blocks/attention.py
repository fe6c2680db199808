"""``MirasAttention``: OLMo-core's ``Attention`` plus a memory branch and carried state.

The module *is* an OLMo-core ``Attention`` (built by OLMo-core from the same ``AttentionConfig``
fields, so window sizes, backend, RoPE and QK-norm are resolved exactly as OLMo-core resolves
them, and its parameters keep OLMo-core's names). Everything memory-side lives under
``self.miras`` (:class:`~.parts.MirasMemoryParts`). ``Attention.forward`` stays the driver; two of
its documented hooks are overridden:

- ``_prepare_qkv``: in stateful mode RoPE starts at the carried position, and MAC / persistent
  tokens also need the pre-RoPE query.
- ``sdpa``: in stateful mode queries also attend to the carried keys/values (the last
  ``window − 1`` for sliding-window layers); with memory context (MAC read-outs, persistent
  tokens) a second, joint attention over [memory tokens | the layer's normal context] is mixed in
  per head by ``context_gate`` (0 at init).

Persistent tokens have no position: their scores are ``q·k`` without RoPE, computed in the same
softmax as the RoPE'd base scores by concatenating ``[q_rope | q]`` against ``[k_rope | 0]`` for
base keys and ``[0 | k]`` for persistent keys. MAC's read-out of token j *does* have a position,
j's own: its key is RoPE'd like a base key (``[k_rope | 0]``), so a query can pick out its own
read-out (offset 0) among the segment's others — with position-free read-outs it could not, since
a read-out carries the recalled value but nothing of the token that asked for it (a MAC recall
model stayed at chance that way). The read-out of token j is visible to query i iff both lie in
the same segment (absolute positions ``// segment_len``) and ``j ≤ i`` — read-outs depend on the
reading token's query, so letting earlier tokens see later tokens' read-outs would leak the future.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import repeat

from olmo_core.exceptions import OLMoConfigurationError
from olmo_core.nn.attention import Attention

from .parts import MirasMemoryParts
from .state import KV, MirasBlockState, StatefulMixer
from .types import MemoryBlockType

if TYPE_CHECKING:
    from olmo_core.nn.transformer.init import InitMethod

    from .config import MirasAttentionConfig

__all__ = ["MirasAttention"]

_DOC_MASK_KWARGS = ("cu_doc_lens", "cu_doc_lens_q", "cu_doc_lens_k", "max_doc_len", "max_doc_len_q", "max_doc_len_k")


@dataclass
class _Call:
    """What one forward call hands to the ``_prepare_qkv`` / ``sdpa`` hooks, and gets back."""

    carry: bool
    position: int
    memory_context: bool
    kv_in: Optional[KV] = None
    readout: Optional[torch.Tensor] = None
    readout_kv_in: Optional[KV] = None
    q_nope: Optional[torch.Tensor] = None
    kv_out: Optional[KV] = None
    readout_kv_out: Optional[KV] = None


def _derived_generator(generator: Optional[torch.Generator], block_idx: int) -> Optional[torch.Generator]:
    """A generator for the memory side that leaves OLMo-core's stream of draws untouched, so the
    base weights come out identical to the plain model's for the same ``init_seed``."""
    if generator is None:
        return None
    g = torch.Generator(device=generator.device)
    g.manual_seed((generator.initial_seed() + 0x9E3779B1 * (block_idx + 1)) % (2**63))
    return g


@torch.compiler.disable
def _run_outside_compile(module: nn.Module, x: torch.Tensor, state: Any) -> Tuple[torch.Tensor, Any]:
    """Memory scans loop over a data-dependent number of chunks and carry Python-side state:
    traced inside OLMo-core's per-block ``torch.compile`` they would recompile for every sequence
    length and state shape. They run eagerly here; ``NeuralMemoryConfig.impl="compiled"`` fuses
    each chunk step with a single compiled shape instead."""
    return module(x, state)


class MirasAttention(Attention, StatefulMixer):
    """See the module docstring. Built by :class:`~.config.MirasAttentionConfig`."""

    miras: Optional[MirasMemoryParts]

    @classmethod
    def adopt(
        cls,
        attention: Attention,
        config: "MirasAttentionConfig",
        *,
        d_model: int,
        layer_idx: int,
        init_device: str = "cpu",
    ) -> "MirasAttention":
        """Turn a freshly built OLMo-core ``Attention`` into a ``MirasAttention`` (same submodules)."""
        if type(attention) is not Attention:
            raise OLMoConfigurationError(
                f"miras attention extends OLMo-core's default Attention, got {type(attention).__name__}"
            )
        obj = cls.__new__(cls)
        obj.__dict__.update(attention.__dict__)
        obj._setup(config, d_model=d_model, layer_idx=layer_idx, init_device=init_device)
        return obj

    def _setup(self, config: "MirasAttentionConfig", *, d_model: int, layer_idx: int, init_device: str) -> None:
        self.layer_idx = layer_idx
        self.memory_block = None if config.memory_block is None else MemoryBlockType(config.memory_block)
        self.n_persistent = config.n_persistent
        self.max_kv_context = config.max_kv_context
        self.segment_len = config.resolved_segment_len()
        norm = config.resolved_memory_norm()
        self.miras = None
        if self.memory_block is not None or self.n_persistent > 0:
            self.miras = MirasMemoryParts(
                d_model=d_model,
                n_attn_heads=self.n_heads,
                memory_block=self.memory_block,
                memory=config.memory,
                lm2=config.resolved_lm2(),
                n_persistent=self.n_persistent,
                memory_norm=norm,
                dtype=config.dtype.as_pt(),
                init_device=init_device,
            )
        self._miras_call: Optional[_Call] = None
        self._init_stateful()

    # ------------------------------------------------------------------ init
    def init_weights(
        self,
        *,
        init_method: "InitMethod",
        d_model: int,
        block_idx: int,
        num_blocks: int,
        std: float = 0.02,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        """OLMo-core's attention init (same draws from ``generator``), then the memory side from a
        derived generator, with the zero-init that makes the block start as the base block."""
        super().init_weights(
            init_method=init_method,
            d_model=d_model,
            block_idx=block_idx,
            num_blocks=num_blocks,
            std=std,
            generator=generator,
        )
        if self.miras is not None:
            self.miras.init_parameters(std=std, generator=_derived_generator(generator, block_idx))

    # ------------------------------------------------------------------ forward
    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        *,
        state_key: Optional[torch.Tensor] = None,
        mal_pre_norm: Optional[nn.Module] = None,
        **kwargs: Any,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """``x``: ``(batch, seq, d_model)``. Returns the mixer output; MAL returns
        ``(x + memory(norm(x)), attention(...))`` so its block can update the residual stream.

        :param state_key: the block's input tensor (identifies the call for activation
            checkpointing; defaults to ``x``).
        :param mal_pre_norm: MAL in a pre-norm block: the block's attention norm, applied to the
            memory-updated stream before attention.
        """
        if self.miras is not None:
            bad = [k for k in _DOC_MASK_KWARGS if kwargs.get(k) is not None]
            if bad:
                raise ValueError(
                    f"memory blocks don't support intra-document masking ({', '.join(bad)}): the memory "
                    "would carry information across documents; put documents in separate rows instead"
                )
        if not self._carry and self.miras is None:
            return super().forward(x, **kwargs)  # exactly OLMo-core's attention
        if self.memory_block == MemoryBlockType.mal and state_key is None:
            raise OLMoConfigurationError(
                "a MAL mixer changes the residual stream, so it needs its block: build the layer "
                "with MirasBlockConfig, not a plain TransformerBlockConfig"
            )
        key = x if state_key is None else state_key
        start, is_replay = self._starting_state(key) if self._carry else (None, False)

        b, t = x.shape[0], x.shape[1]
        if start is not None and start.batch_size not in (None, b):
            raise ValueError(
                f"carried memory state has batch size {start.batch_size} but the input has {b}; "
                "call reset_memory_states(model) before starting a new batch"
            )
        if self._carry:
            if self.kv_cache_manager is not None:
                raise RuntimeError("stateful mode carries its own key/value context; don't also use a KV cache")
            if any(kwargs.get(k) is not None for k in ("pos_sin", "pos_cos", "freqs_cis")):
                raise NotImplementedError("stateful mode is not supported with context parallelism")
        pos = 0 if start is None else start.position

        parts = self.miras
        xm = mem_y = lm2_y = None
        mem_state = lm2_state = None
        if parts is not None and parts.norm is not None:
            xm = parts.norm(x)
        if parts is not None and parts.memory is not None:
            mem_y, mem_state = _run_outside_compile(parts.memory, xm, None if start is None else start.memory)
        if parts is not None and parts.lm2 is not None:
            lm2_y, lm2_state = _run_outside_compile(parts.lm2, xm, None if start is None else start.lm2)

        attn_in = x
        if self.memory_block == MemoryBlockType.mal:
            x = x + mem_y
            attn_in = x if mal_pre_norm is None else mal_pre_norm(x)

        call = _Call(
            carry=self._carry,
            position=pos,
            memory_context=parts is not None and parts.has_memory_context,
            kv_in=None if start is None else start.kv,
            readout=mem_y if self.memory_block == MemoryBlockType.mac else None,
            readout_kv_in=None if start is None else start.readout_kv,
        )
        self._miras_call = call
        try:
            att = super().forward(attn_in, **kwargs)
        finally:
            self._miras_call = None

        if self.memory_block == MemoryBlockType.mag:
            assert parts is not None and parts.gate is not None
            att = att + torch.sigmoid(parts.gate(xm)) * mem_y
        elif self.memory_block == MemoryBlockType.lm2:
            att = att + lm2_y

        if self._carry:
            new = MirasBlockState(
                position=pos + t, kv=call.kv_out, memory=mem_state, readout_kv=call.readout_kv_out, lm2=lm2_state
            )
            self._advance_state(key, start, new, is_replay)
        if self.memory_block == MemoryBlockType.mal:
            return x, att
        return att

    # ------------------------------------------------------------------ hooks into Attention.forward
    def _project_kv(self, h: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of tokens ``h (b, l, d_model)`` exactly as ``Attention._prepare_qkv`` makes
        them, without RoPE: ``(b, l, n_kv_heads, head_dim)`` each."""
        b, l, _ = h.shape
        k, v = self.w_k(h), self.w_v(h)
        if self.clip_qkv is not None:
            k = k.clamp(min=-self.clip_qkv, max=self.clip_qkv)
            v = v.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        if not self.use_head_qk_norm and self.k_norm is not None:
            k = self.k_norm(k)
        k, v = k.view(b, l, -1, self.head_dim), v.view(b, l, -1, self.head_dim)
        if self.use_head_qk_norm and self.k_norm is not None:
            k = self.k_norm(k)
        return k, v

    def _prepare_qkv(
        self,
        x: torch.Tensor,
        *,
        pos_sin: Optional[torch.Tensor] = None,
        pos_cos: Optional[torch.Tensor] = None,
        freqs_cis: Optional[torch.Tensor] = None,
        start_pos: Optional[int] = None,
        cu_doc_lens: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        call = self._miras_call
        if call is not None and call.carry:
            start_pos = call.position
        if call is None or not call.memory_context:
            return super()._prepare_qkv(
                x, pos_sin=pos_sin, pos_cos=pos_cos, freqs_cis=freqs_cis, start_pos=start_pos, cu_doc_lens=cu_doc_lens
            )
        # Same steps as Attention._prepare_qkv, keeping the pre-RoPE query for memory context.
        b, t, _ = x.shape
        q = self.w_q(x)
        if self.clip_qkv is not None:
            q = q.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        if not self.use_head_qk_norm and self.q_norm is not None:
            q = self.q_norm(q)
        q = q.view(b, t, -1, self.head_dim)
        if self.use_head_qk_norm and self.q_norm is not None:
            q = self.q_norm(q)
        k, v = self._project_kv(x)
        call.q_nope = q
        if self.rope is not None:
            q, k = self._apply_rope(q, k, start_pos, pos_sin, pos_cos, freqs_cis, cu_doc_lens)
        return q, k, v

    def sdpa(  # type: ignore[override]
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_doc_lens: Optional[torch.Tensor] = None,
        cu_doc_lens_q: Optional[torch.Tensor] = None,
        cu_doc_lens_k: Optional[torch.Tensor] = None,
        max_doc_len: Optional[int] = None,
        max_doc_len_q: Optional[int] = None,
        max_doc_len_k: Optional[int] = None,
        local_k_slice: Optional[slice] = None,
        cache_leftpad: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        call = self._miras_call
        backend_kwargs = dict(
            cu_doc_lens=cu_doc_lens,
            cu_doc_lens_q=cu_doc_lens_q,
            cu_doc_lens_k=cu_doc_lens_k,
            max_doc_len=max_doc_len,
            max_doc_len_q=max_doc_len_q,
            max_doc_len_k=max_doc_len_k,
            local_k_slice=local_k_slice,
            cache_leftpad=cache_leftpad,
        )
        if call is None or (not call.carry and not call.memory_context):
            return super().sdpa(q, k, v, **backend_kwargs)  # type: ignore[arg-type]

        ctx = call.kv_in if call.carry else None
        lc = 0 if ctx is None else ctx[0].shape[1]
        if lc == 0:
            # A fresh sequence: OLMo-core's backend, so the first piece matches a stateless call.
            att = super().sdpa(q, k, v, **backend_kwargs)  # type: ignore[arg-type]
            k_all, v_all = k, v
        else:
            assert ctx is not None
            k_all, v_all = torch.cat([ctx[0], k], dim=1), torch.cat([ctx[1], v], dim=1)
            att = self._masked_sdpa(q, k_all, v_all, self._base_mask(q.shape[1], lc, q.device))
        if call.carry:
            call.kv_out = self._visible_context(k_all, v_all)
        if call.memory_context:
            att = self._mix_memory_context(att, q, k_all, v_all, lc, call)
        return att

    # ------------------------------------------------------------------ attention helpers
    def _base_mask(self, t: int, lc: int, device: torch.device) -> torch.Tensor:
        """``(t, lc + t)``: query i (after ``lc`` context keys) sees key j iff causal and in the window."""
        qpos = torch.arange(t, device=device) + lc
        kpos = torch.arange(lc + t, device=device)
        diff = qpos[:, None] - kpos[None, :]
        mask = diff >= 0
        if self.window_size is not None:
            mask = mask & (diff < self.window_size)
        return mask

    def _visible_context(self, k_all: torch.Tensor, v_all: torch.Tensor) -> KV:
        """The keys/values a later query can still see: the last ``window − 1`` (sliding window),
        the last ``max_kv_context`` or all (full attention)."""
        n = k_all.shape[1]
        if self.window_size is not None:
            keep = self.window_size - 1
        elif self.max_kv_context is not None:
            keep = self.max_kv_context
        else:
            keep = n
        keep = min(keep, n)
        return k_all[:, n - keep :], v_all[:, n - keep :]

    def _masked_sdpa(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor,
        scale: Optional[float] = None,
    ) -> torch.Tensor:
        """SDPA on ``(b, len, heads, dim)`` tensors with a boolean ``(q_len, k_len)`` mask (True = attend)."""
        n_rep = q.shape[2] // k.shape[2]
        if n_rep > 1:
            k = repeat(k, "b s h d -> b s (h r) d", r=n_rep)
            v = repeat(v, "b s h d -> b s (h r) d", r=n_rep)
        # shape: (batch, heads, len, dim)
        att = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            dropout_p=self.backend.dropout_p if self.training else 0.0,
            scale=self.backend.scale if scale is None else scale,
        )
        return att.transpose(1, 2).contiguous()

    def _mix_memory_context(
        self,
        att: torch.Tensor,
        q: torch.Tensor,
        k_all: torch.Tensor,
        v_all: torch.Tensor,
        lc: int,
        call: _Call,
    ) -> torch.Tensor:
        """``att + g_h · (joint − att)``, joint = one softmax over [persistent | read-outs | base context]."""
        parts = self.miras
        assert parts is not None and parts.context_gate is not None and call.q_nope is not None
        b, t, _, d = q.shape
        device = q.device
        # keys as [rope'd half | position-free half], see the module docstring
        mem_k, mem_v, masks = [], [], []
        if parts.persistent is not None:
            kp, vp = self._project_kv(parts.persistent.unsqueeze(0))
            kp = kp.expand(b, -1, -1, -1)
            mem_k.append(torch.cat([torch.zeros_like(kp), kp], dim=-1))
            mem_v.append(vp.expand(b, -1, -1, -1))
            masks.append(torch.ones(t, kp.shape[1], dtype=torch.bool, device=device))
        if self.memory_block == MemoryBlockType.mac:
            assert call.readout is not None
            kr, vr = self._project_kv(call.readout)
            if self.rope is not None:
                # the read-outs sit at their tokens' positions (carried ones were RoPE'd when made)
                _, kr = self._apply_rope(kr, kr, call.position if call.carry else None, None, None, None, None)
            lr = 0
            if call.readout_kv_in is not None:
                lr = call.readout_kv_in[0].shape[1]
                kr = torch.cat([call.readout_kv_in[0], kr], dim=1)
                vr = torch.cat([call.readout_kv_in[1], vr], dim=1)
            pos, seg = call.position, self.segment_len
            qpos = torch.arange(pos, pos + t, device=device)
            kpos = torch.arange(pos - lr, pos + t, device=device)
            masks.append((kpos[None, :] <= qpos[:, None]) & (kpos[None, :] // seg == qpos[:, None] // seg))
            halves = [kr, torch.zeros_like(kr)] if self.rope is not None else [torch.zeros_like(kr), kr]
            mem_k.append(torch.cat(halves, dim=-1))
            mem_v.append(vr)
            if call.carry:
                keep = (pos + t) % seg  # read-outs of the unfinished segment
                n = kr.shape[1]
                call.readout_kv_out = (kr[:, n - keep :], vr[:, n - keep :])
        k_mem = torch.cat(mem_k, dim=1).to(k_all.dtype)
        v_mem = torch.cat(mem_v, dim=1).to(v_all.dtype)
        q_nope = call.q_nope.to(q.dtype)
        # shape: (batch, len, heads, 2 * head_dim): RoPE'd scores, position-free scores
        qq = torch.cat([q, q_nope], dim=-1)
        kk = torch.cat([k_mem, torch.cat([k_all, torch.zeros_like(k_all)], dim=-1)], dim=1)
        vv = torch.cat([v_mem, v_all], dim=1)
        mask = torch.cat(masks + [self._base_mask(t, lc, device)], dim=1)
        scale = self.backend.scale if self.backend.scale is not None else d**-0.5
        joint = self._masked_sdpa(qq, kk, vv, mask, scale=scale)
        g = parts.context_gate.to(att.dtype).view(1, 1, -1, 1)
        return att + g * (joint - att)

    # ------------------------------------------------------------------ unsupported parallelism
    def apply_tp(self, *args: Any, **kwargs: Any) -> None:
        if self.miras is not None:
            raise NotImplementedError("tensor parallelism is not supported for miras memory blocks")
        super().apply_tp(*args, **kwargs)

    def apply_cp(self, *args: Any, **kwargs: Any) -> None:
        if self.miras is not None:
            raise NotImplementedError("context parallelism is not supported for miras memory blocks")
        super().apply_cp(*args, **kwargs)

    def init_kv_cache_manager(self, batch_size: int, max_seq_len: int) -> None:
        raise NotImplementedError(
            "miras attention carries its own key/value context: use carry_memory_states(model) to generate"
        )

    def extra_repr(self) -> str:
        return f"memory_block={self.memory_block}, window={self.window_size}, n_persistent={self.n_persistent}"
