"""Hugging Face ``transformers`` model of an olmo-miras language model (OLMo2/OLMo3 + memory).

This file is copied next to the weights of every exported model (``auto_map`` in config.json), so
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` loads it. It needs the
``olmo-miras`` package (``pip install olmo-miras``) for the memory math.

How the model is built, and why:

- **The base is transformers' own OLMo2/OLMo3 code.** Embeddings, every decoder layer
  (``Olmo2DecoderLayer`` / ``Olmo3DecoderLayer``: attention with its QK-norm, RoPE, MLP,
  post-norms), the rotary embedding, the final norm, the masks and the KV cache all come from
  transformers; layers without memory *are* transformers' decoder layers, run by their own
  ``forward``. Base parameters keep transformers' names (``model.layers.{i}.self_attn.q_proj``,
  ...), so the base state dict loads unchanged into ``Olmo2ForCausalLM`` / ``Olmo3ForCausalLM``,
  and comparing the two models is an independent check of OLMo-core's conversion.
- **The memory is olmo-miras' own modules** (:class:`~olmo_miras_plugin.blocks.parts.MirasMemoryParts`:
  the neural memory, LM2 bank, MAG gate, persistent tokens, context gate), not a re-implementation,
  under ``model.layers.{i}.miras.*`` (the same suffixes as OLMo-core's ``blocks.{i}.attention.miras.*``).
- **A memory layer** (:class:`OlmoMirasMemoryLayer`) holds the transformers decoder layer's
  submodules (same names) plus ``miras``, and wires them as OLMo-core's ``MirasAttention`` in a
  ``reordered_norm`` block does: MAL adds ``memory(norm(x))`` to the stream before attention,
  MAG adds ``σ(W x̂) ⊙ memory(x̂)`` and LM2 the bank read-out to the attention output; with
  memory context (MAC read-outs, persistent tokens) the attention is recomputed here with a
  second softmax over the memory tokens (persistent tokens position-free, read-outs RoPE'd at
  their tokens' positions) mixed in per head by ``context_gate``.
  Every memory output projection starts at zero, so a fresh memory model computes exactly its base.
- **State between calls** lives in :class:`MirasCache`: transformers' ``DynamicCache`` (sliding-
  window layers keep ``window − 1`` keys/values) plus, per memory layer, the memory state
  (neural-memory weights/momentum, LM2 bank, MAC read-outs of the unfinished segment, position).
  ``generate()`` makes one automatically, so a prompt can be prefilled in pieces
  (``prefill_chunk_size``) with the memory written as it goes, and decoding carries both.
  Padding is not supported (the memory would be written with pad tokens): batch rows must be
  the same length. The memory can't be rolled back, so assisted decoding is refused.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_olmo_miras import OlmoMirasConfig

try:  # Inside try: transformers' remote-code import check then doesn't ask for a wrong pip name.
    from olmo_miras_plugin.blocks.parts import MirasMemoryParts
    from olmo_miras_plugin.blocks.state import MirasBlockState, unaliased
    from olmo_miras_plugin.blocks.types import MemoryBlockType
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "olmo-miras models need the olmo-miras package for their memory layers "
        "(pip install olmo-miras; it brings ai2-olmo-core): " + str(e)
    ) from e

try:
    from transformers import initialization as _hf_init
except ImportError:  # pragma: no cover - transformers < 5
    _hf_init = None

__all__ = [
    "CappedKVLayer",
    "MirasCache",
    "OlmoMirasForCausalLM",
    "OlmoMirasMemoryLayer",
    "OlmoMirasModel",
    "OlmoMirasPreTrainedModel",
]


def _base_modules(base_model_type: str) -> Dict[str, Any]:
    """transformers' building blocks of the base (OLMo3 needs transformers with ``olmo3``)."""
    if base_model_type == "olmo2":
        from transformers.models.olmo2 import modeling_olmo2 as m

        return dict(
            layer=m.Olmo2DecoderLayer, norm=m.Olmo2RMSNorm, rotary=m.Olmo2RotaryEmbedding, rope=m.apply_rotary_pos_emb
        )
    if base_model_type == "olmo3":
        try:
            from transformers.models.olmo3 import modeling_olmo3 as m
        except ImportError as e:  # pragma: no cover
            raise ImportError("OLMo3-based olmo-miras models need a transformers version with OLMo3") from e
        return dict(
            layer=m.Olmo3DecoderLayer, norm=m.Olmo3RMSNorm, rotary=m.Olmo3RotaryEmbedding, rope=m.apply_rotary_pos_emb
        )
    raise ValueError(f"unknown base_model_type {base_model_type!r}")


def _memory_layer_specs(config: OlmoMirasConfig) -> Dict[int, Any]:
    """Layer index → resolved OLMo-core ``MirasAttentionConfig`` of every layer with memory parts,
    resolved by OLMo-core (``MirasModelConfig.transformer_config``), as the OLMo-core model is."""
    from olmo_miras_plugin.blocks import MirasAttentionConfig

    miras = config.miras_model_config()
    tc = miras.transformer_config()
    if tc.n_layers != config.num_hidden_layers or tc.d_model != config.hidden_size:
        raise ValueError(
            f"miras_config ({tc.n_layers} layers, d_model {tc.d_model}) doesn't match the config "
            f"({config.num_hidden_layers} layers, hidden_size {config.hidden_size})"
        )
    specs = {}
    for i, block in enumerate(tc.resolved_block_configs):
        mixer = block.sequence_mixer
        if isinstance(mixer, MirasAttentionConfig) and (mixer.memory_block is not None or mixer.n_persistent > 0):
            mixer.validate_for(tc.d_model)
            specs[i] = mixer
    return specs


def _build_memory_parts(spec: Any, d_model: int, dtype: torch.dtype) -> MirasMemoryParts:
    return MirasMemoryParts(
        d_model=d_model,
        n_attn_heads=spec.n_heads,
        memory_block=None if spec.memory_block is None else MemoryBlockType(spec.memory_block),
        memory=spec.memory,
        lm2=spec.resolved_lm2(),
        n_persistent=spec.n_persistent,
        memory_norm=spec.resolved_memory_norm(),
        dtype=dtype,
    )


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """SDPA on ``(batch, heads, len, dim)`` with grouped key/value heads and a boolean mask (True = attend)."""
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=1)
        v = v.repeat_interleave(n_rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _call_in_own_dtype(module: nn.Module, x: torch.Tensor, *args: Any) -> Any:
    """``module(x, *args)`` with ``x`` cast to the module's parameter dtype. The neural memory keeps
    float32 weights (``NeuralMemoryConfig.dtype``) even when transformers loads the rest of the
    model in bfloat16; its inner state is float32 anyway."""
    p = next(module.parameters(), None)
    return module(x if p is None else x.to(p.dtype), *args)


# ---------------------------------------------------------------------------------------------- cache
class CappedKVLayer(DynamicLayer):
    """The cache of a full-attention layer that keeps only its last ``keep`` keys/values between
    calls (within a call every key of the call is still visible): constant memory on streams of
    any length, at the price of exactness beyond ``keep`` tokens. The same rule as OLMo-core
    ``MirasAttention``'s ``max_kv_context``. Reports itself as a full-attention layer (masks are
    made with its offset)."""

    is_sliding = False

    def __init__(self, keep: int):
        super().__init__()
        if keep < 0:
            raise ValueError(f"max_kv_context must be >= 0, got {keep}")
        self.keep = keep
        self.cumulative_length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        n = keys.shape[-2]
        self.keys, self.values = keys[:, :, n - min(self.keep, n) :], values[:, :, n - min(self.keep, n) :]
        return keys, values

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> Tuple[int, int]:
        cached = 0 if not self.is_initialized else self.keys.shape[-2]
        return cached + query_length, self.cumulative_length - cached

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("a capped key/value cache can't be cropped")


class MirasCache(DynamicCache):
    """transformers' ``DynamicCache`` (built from the config: sliding-window layers keep only
    ``window − 1`` keys/values) plus ``memory_states``: layer index → the memory state
    (:class:`~olmo_miras_plugin.blocks.state.MirasBlockState`; its ``readout_kv`` is in
    ``(batch, kv_heads, len, head_dim)`` layout, its ``kv`` unused: the keys/values are here).

    :param max_kv_context: full-attention layers keep at most this many past keys/values
        (:class:`CappedKVLayer`). ``None``: the model's own ``max_kv_context`` (from
        ``miras_config``; normally unset: all of them, exact but growing with the text).
    """

    def __init__(self, *args: Any, max_kv_context: Optional[int] = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        config = kwargs.get("config", args[1] if len(args) > 1 else None)
        if max_kv_context is None and config is not None:
            max_kv_context = (getattr(config, "miras_config", None) or {}).get("max_kv_context")
        self.memory_states: Dict[int, MirasBlockState] = {}
        self.max_kv_context = max_kv_context
        if max_kv_context is not None:
            if not self.layers:
                raise ValueError("max_kv_context needs the model config (MirasCache(config=..., max_kv_context=...))")
            self.layers = [
                layer if getattr(layer, "is_sliding", False) else CappedKVLayer(max_kv_context) for layer in self.layers
            ]

    def _map_memory_states(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.memory_states = {i: s.map_tensors(fn) for i, s in self.memory_states.items()}

    def reset(self) -> None:
        super().reset()
        self.memory_states = {}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_memory_states(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_memory_states(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_memory_states(lambda t: t[indices])

    def crop(self, max_length: int) -> None:
        if self.memory_states:
            raise NotImplementedError(
                "an olmo-miras cache can't be cropped: the memory has already been written with the "
                "tokens to drop (assisted / speculative decoding is not supported)"
            )
        super().crop(max_length)


# ---------------------------------------------------------------------------------------------- layers
class OlmoMirasMemoryLayer(nn.Module):
    """A transformers OLMo2/OLMo3 decoder layer with memory (see the module docstring).

    Holds the decoder layer's ``self_attn``, ``mlp``, ``post_attention_layernorm`` and
    ``post_feedforward_layernorm`` under their own names, plus ``miras``.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        parts: MirasMemoryParts,
        *,
        layer_idx: int,
        segment_len: int,
        apply_rotary: Callable,
    ):
        super().__init__()
        self.self_attn = base_layer.self_attn
        self.mlp = base_layer.mlp
        self.post_attention_layernorm = base_layer.post_attention_layernorm
        self.post_feedforward_layernorm = base_layer.post_feedforward_layernorm
        self.miras = parts
        self.layer_idx = layer_idx
        self.block_type = parts.memory_block
        self.segment_len = segment_len
        self._apply_rotary = apply_rotary

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[Any] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache: Optional[Cache] = None,
        position_embeddings: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        memory_states: Optional[Dict[int, MirasBlockState]] = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """``memory_states``: where this layer's state is read and written (``None``: a fresh state
        that isn't kept)."""
        parts = self.miras
        x = hidden_states
        b, t, _ = x.shape
        start = None if memory_states is None else memory_states.get(self.layer_idx)
        if start is not None and start.batch_size not in (None, b):
            raise ValueError(f"carried memory state has batch size {start.batch_size} but the input has {b}")
        pos = 0 if start is None else start.position

        xm = _call_in_own_dtype(parts.norm, x) if parts.norm is not None else None
        mem_y = lm2_y = mem_state = lm2_state = None
        if parts.memory is not None:
            mem_y, mem_state = _call_in_own_dtype(parts.memory, xm, None if start is None else start.memory)
            mem_y = mem_y.to(x.dtype)
        if parts.lm2 is not None:
            lm2_y, lm2_state = _call_in_own_dtype(parts.lm2, xm, None if start is None else start.lm2)
            lm2_y = lm2_y.to(x.dtype)
        if self.block_type == MemoryBlockType.mal:
            x = x + mem_y

        readout_kv = None
        if parts.has_memory_context:
            att, readout_kv = self._attention_with_memory_context(
                x,
                position_embeddings,
                cache,
                pos,
                readout=mem_y if self.block_type == MemoryBlockType.mac else None,
                readout_kv_in=None if start is None else start.readout_kv,
            )
        else:
            att, _ = self.self_attn(
                hidden_states=x,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )
        if self.block_type == MemoryBlockType.mag:
            att = att + torch.sigmoid(_call_in_own_dtype(parts.gate, xm)).to(att.dtype) * mem_y
        elif self.block_type == MemoryBlockType.lm2:
            att = att + lm2_y

        if memory_states is not None:
            memory_states[self.layer_idx] = unaliased(
                MirasBlockState(position=pos + t, memory=mem_state, readout_kv=readout_kv, lm2=lm2_state), parts
            )
        h = x + self.post_attention_layernorm(att)
        return h + self.post_feedforward_layernorm(self.mlp(h))

    def _attention_with_memory_context(
        self,
        x: torch.Tensor,
        position_embeddings: Tuple[torch.Tensor, torch.Tensor],
        cache: Optional[Cache],
        pos: int,
        *,
        readout: Optional[torch.Tensor],
        readout_kv_in: Optional[Tuple[torch.Tensor, torch.Tensor]],
    ) -> Tuple[torch.Tensor, Optional[Tuple[torch.Tensor, torch.Tensor]]]:
        """The decoder layer's attention (same projections, QK-norm, RoPE and cache) with memory
        tokens: ``att + g_h · (joint − att)``, ``joint`` one softmax over [persistent tokens | MAC
        read-outs | the base keys]. Persistent-token scores are ``q·k`` without RoPE (they have no
        position): ``[q_rope | q]`` against ``[0 | k_p]``; base keys and MAC read-outs (which sit at
        their tokens' positions) are ``[k_rope | 0]`` — as in ``blocks/attention.py``. Query i sees the
        read-out of token j iff both are in the same segment and j ≤ i (a read-out depends on its
        own token's query, so later ones would leak the future)."""
        attn = self.self_attn
        parts = self.miras
        b, t, _ = x.shape
        hd = attn.head_dim
        device = x.device

        def heads(z: torch.Tensor) -> torch.Tensor:
            # shape: (batch, len, heads * head_dim) -> (batch, heads, len, head_dim)
            return z.view(z.shape[0], z.shape[1], -1, hd).transpose(1, 2)

        def project_kv(h: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
            return heads(attn.k_norm(attn.k_proj(h))), heads(attn.v_proj(h))

        q_nope = heads(attn.q_norm(attn.q_proj(x)))
        k, v = project_kv(x)
        cos, sin = position_embeddings
        q, k = self._apply_rotary(q_nope, k, cos, sin)
        if cache is not None:
            k_all, v_all = cache.update(k, v, self.layer_idx)
        else:
            k_all, v_all = k, v
        # The cache returns the last n keys, ending with this call's: absolute positions end-n..end-1.
        end, n = pos + t, k_all.shape[2]
        qpos = torch.arange(pos, end, device=device)
        kpos = torch.arange(end - n, end, device=device)
        diff = qpos[:, None] - kpos[None, :]
        base_mask = diff >= 0
        window = getattr(attn, "sliding_window", None)
        if window is not None:
            base_mask = base_mask & (diff < window)
        att = _sdpa(q, k_all, v_all, base_mask, attn.scaling)

        mem_k: List[torch.Tensor] = []
        mem_v: List[torch.Tensor] = []
        masks: List[torch.Tensor] = []
        if parts.persistent is not None:
            kp, vp = project_kv(parts.persistent.unsqueeze(0).to(x.dtype))
            kp = kp.expand(b, -1, -1, -1)
            mem_k.append(torch.cat([torch.zeros_like(kp), kp], dim=-1))
            mem_v.append(vp.expand(b, -1, -1, -1))
            masks.append(torch.ones(t, kp.shape[2], dtype=torch.bool, device=device))
        readout_kv_out = None
        if readout is not None:
            kr, vr = project_kv(readout)
            _, kr = self._apply_rotary(kr, kr, cos, sin)  # carried read-outs were RoPE'd when made
            lr = 0
            if readout_kv_in is not None:
                lr = readout_kv_in[0].shape[2]
                kr = torch.cat([readout_kv_in[0], kr], dim=2)
                vr = torch.cat([readout_kv_in[1], vr], dim=2)
            seg = self.segment_len
            rpos = torch.arange(pos - lr, end, device=device)
            masks.append((rpos[None, :] <= qpos[:, None]) & (rpos[None, :] // seg == qpos[:, None] // seg))
            mem_k.append(torch.cat([kr, torch.zeros_like(kr)], dim=-1))
            mem_v.append(vr)
            keep, nr = end % seg, kr.shape[2]  # read-outs of the unfinished segment
            readout_kv_out = (kr[:, :, nr - keep :], vr[:, :, nr - keep :])
        k_mem = torch.cat(mem_k, dim=2).to(k_all.dtype)
        v_mem = torch.cat(mem_v, dim=2).to(v_all.dtype)
        qq = torch.cat([q, q_nope.to(q.dtype)], dim=-1)
        kk = torch.cat([k_mem, torch.cat([k_all, torch.zeros_like(k_all)], dim=-1)], dim=2)
        vv = torch.cat([v_mem, v_all], dim=2)
        joint = _sdpa(qq, kk, vv, torch.cat(masks + [base_mask], dim=1), attn.scaling)
        g = parts.context_gate.to(att.dtype).view(1, -1, 1, 1)
        att = att + g * (joint - att)
        out = attn.o_proj(att.transpose(1, 2).reshape(b, t, -1))
        return out, readout_kv_out


# ---------------------------------------------------------------------------------------------- models
class OlmoMirasPreTrainedModel(PreTrainedModel):
    config_class = OlmoMirasConfig
    config: OlmoMirasConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["Olmo2DecoderLayer", "Olmo3DecoderLayer", "OlmoMirasMemoryLayer"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _can_compile_fullgraph = False
    _is_stateful = True  # the memory can't be rolled back: no assisted / speculative decoding

    def _init_weights(self, module: nn.Module) -> None:
        """transformers' init for the base; the memory side initialises itself as OLMo-core does
        (zero output projections, gate biases at their configured values), so a model built
        from a config starts exactly as its base."""
        if isinstance(module, MirasMemoryParts):
            module.reset_parameters(std=getattr(self.config, "initializer_range", 0.02) or 0.02)
            return
        if getattr(module, "_miras_owned", False):
            return  # initialised by its MirasMemoryParts
        super()._init_weights(module)
        if type(module).__name__ == "Olmo3RotaryEmbedding":
            # Per-layer-type buffers: not covered by PreTrainedModel._init_weights.
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            for layer_type in module.layer_types:
                rope_type = module.rope_type.get(layer_type)
                if rope_type is None:
                    continue
                fn = module.compute_default_rope_parameters if rope_type == "default" else ROPE_INIT_FUNCTIONS[rope_type]
                inv_freq, _ = fn(module.config, layer_type=layer_type)
                for name in (f"{layer_type}_inv_freq", f"{layer_type}_original_inv_freq"):
                    buf = getattr(module, name)
                    if _hf_init is not None:
                        _hf_init.copy_(buf, inv_freq)
                    else:  # pragma: no cover
                        with torch.no_grad():
                            buf.copy_(inv_freq)


def _carried_batch_size(cache: Optional[Cache]) -> Optional[int]:
    """The batch size a cache has seen (memory states, else keys), ``None`` while it is empty."""
    if cache is None:
        return None
    for state in getattr(cache, "memory_states", {}).values():
        if state is not None and state.batch_size is not None:
            return state.batch_size
    for layer in getattr(cache, "layers", []):
        keys = getattr(layer, "keys", None)
        if isinstance(keys, torch.Tensor) and keys.ndim == 4 and keys.numel() > 0:
            return int(keys.shape[0])
    return None


class OlmoMirasModel(OlmoMirasPreTrainedModel):
    """The decoder: transformers' OLMo2/OLMo3 base with memory layers (no LM head)."""

    def __init__(self, config: OlmoMirasConfig):
        super().__init__(config)
        mods = _base_modules(config.base_model_type)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.layer_types = config.resolved_layer_types()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        specs = _memory_layer_specs(config)
        layers: List[nn.Module] = []
        for i in range(config.num_hidden_layers):
            layer = mods["layer"](config, i)
            if i in specs:
                parts = _build_memory_parts(specs[i], config.hidden_size, torch.get_default_dtype())
                for m in parts.modules():
                    if m is not parts:
                        m._miras_owned = True
                layer = OlmoMirasMemoryLayer(
                    layer,
                    parts,
                    layer_idx=i,
                    segment_len=specs[i].resolved_segment_len(),
                    apply_rotary=mods["rope"],
                )
            layers.append(layer)
        self.layers = nn.ModuleList(layers)
        self.memory_layers = sorted(specs)
        self.norm = mods["norm"](config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = mods["rotary"](config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed_tokens = value

    def _position_embeddings(self, h: torch.Tensor, position_ids: torch.Tensor) -> Dict[str, Any]:
        if self.config.base_model_type == "olmo3":
            return {lt: self.rotary_emb(h, position_ids, lt) for lt in set(self.layer_types)}
        pe = self.rotary_emb(h, position_ids)
        return {"full_attention": pe}

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache: Optional[Cache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        else:
            kwargs.pop("past_key_values", None)
        kwargs.pop("return_dict", None)
        kwargs.pop("cache_position", None)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = bool(use_cache) if use_cache is not None else bool(getattr(self.config, "use_cache", False))
        if use_cache and cache is None:
            cache = MirasCache(config=self.config)
        if cache is not None and not isinstance(cache, MirasCache):
            raise TypeError(
                f"olmo-miras models carry their memory in a MirasCache, got a {type(cache).__name__}; "
                "pass cache=MirasCache(config=model.config) (or none: one is made for you)"
            )
        carried = _carried_batch_size(cache)
        if carried is not None and carried != inputs_embeds.shape[0]:
            # Checked before any layer runs: a failing layer would already have grown the KV cache.
            raise ValueError(
                f"the cache carries a batch of {carried} but the input has {inputs_embeds.shape[0]} rows; "
                "start a new MirasCache for a new batch"
            )
        if attention_mask is not None and attention_mask.ndim == 2 and not bool(attention_mask.all()):
            raise ValueError(
                "padding (attention_mask with zeros) is not supported: the memory would be written with "
                "the pad tokens. Generate rows of different lengths one at a time."
            )

        t = inputs_embeds.shape[1]
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(t, device=inputs_embeds.device) + past).unsqueeze(0)

        mask_kwargs = dict(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        masks: Dict[str, Any] = {}
        if "full_attention" in self.layer_types:
            masks["full_attention"] = create_causal_mask(**mask_kwargs)
        if "sliding_attention" in self.layer_types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)

        h = inputs_embeds
        position_embeddings = self._position_embeddings(h, position_ids)
        # Without a cache the memory starts fresh and its final state is dropped.
        states: Dict[int, MirasBlockState] = cache.memory_states if cache is not None else {}
        all_hidden: List[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden.append(h)
            lt = self.layer_types[i]
            common = dict(
                attention_mask=masks[lt],
                position_ids=position_ids,
                cache=cache,
                position_embeddings=position_embeddings[lt],
            )
            if isinstance(layer, OlmoMirasMemoryLayer):
                h = layer(h, memory_states=states, **common, **kwargs)
            else:
                h = layer(h, **common, **kwargs)
        h = self.norm(h)
        if output_hidden_states:
            all_hidden.append(h)
        return BaseModelOutputWithPast(
            last_hidden_state=h,
            cache=cache,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
        )


class OlmoMirasForCausalLM(OlmoMirasPreTrainedModel, GenerationMixin):
    """``OlmoMirasModel`` + LM head; ``generate()`` carries the memory in a :class:`MirasCache`."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: OlmoMirasConfig):
        super().__init__(config)
        self.model = OlmoMirasModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def _prepare_cache_for_generation(self, generation_config: Any, model_kwargs: Dict[str, Any], *args: Any, **kwargs: Any):
        """transformers makes a plain ``DynamicCache`` for ``generate()``; swap in a
        :class:`MirasCache` so the memory is carried from step to step too."""
        out = super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        for key in ("cache", "past_key_values"):
            if type(model_kwargs.get(key)) is DynamicCache:
                model_kwargs[key] = MirasCache(config=self.config)
        return out

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache: Optional[Cache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        logits_to_keep: Union[int, torch.Tensor] = 0,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs: Any,
    ) -> Union[CausalLMOutputWithPast, Tuple]:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        h = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            h = h[:, -logits_to_keep:, :] if logits_to_keep > 0 else h
        else:
            h = h[:, logits_to_keep, :]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        result = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
        )
        if return_dict is False:
            return result.to_tuple()
        return result
