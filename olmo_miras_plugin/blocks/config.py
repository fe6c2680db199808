"""Configs: the ``miras_attention`` sequence mixer and the memory block config.

``MirasAttentionConfig`` is an OLMo-core ``AttentionConfig`` (same fields, registered in
OLMo-core's ``SequenceMixerConfig`` registry as ``"miras_attention"``) plus the memory fields.
``MirasBlockConfig`` is a ``TransformerBlockConfig`` whose ``build`` makes the block classes of
:mod:`.block`: OLMo-core dispatches block types on the ``TransformerBlockType`` enum inside
``TransformerBlockConfig.build``, but ``Transformer`` only ever calls ``config.build(...)`` on
each resolved block config, so a subclass overriding ``build`` slots in through
``TransformerConfig.block`` / ``block_overrides`` without patching anything.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from olmo_core.exceptions import OLMoConfigurationError
from olmo_core.nn.attention import AttentionConfig, AttentionType
from olmo_core.nn.attention.base import SequenceMixerConfig
from olmo_core.nn.buffer_cache import BufferCache
from olmo_core.nn.layer_norm import LayerNormConfig, LayerNormType
from olmo_core.nn.transformer.config import TransformerBlockConfig, TransformerBlockType

from ..memory import NeuralMemoryConfig
from .lm2 import LM2MemoryConfig
from .types import MemoryBlockType, parse_block_type

if TYPE_CHECKING:
    from olmo_core.nn.transformer.block import TransformerBlockBase

    from .attention import MirasAttention

__all__ = ["MirasAttentionConfig", "MirasBlockConfig", "SUPPORTED_BASE_BLOCKS"]

SUPPORTED_BASE_BLOCKS = (TransformerBlockType.default, TransformerBlockType.reordered_norm)
"""OLMo-core block types a memory block can extend (OLMo2/OLMo3 use ``reordered_norm``)."""


@SequenceMixerConfig.register("miras_attention")
@dataclass
class MirasAttentionConfig(AttentionConfig):
    """OLMo-core attention + an optional memory branch, able to carry state between calls.

    With ``memory_block=None`` and ``n_persistent=0`` the module has exactly the parameters of
    OLMo-core's attention and, outside stateful mode, computes exactly what it computes; in
    stateful mode it carries its key/value context (used for the non-memory layers of a memory
    model so a document can be fed in pieces).
    """

    memory_block: Optional[MemoryBlockType] = None
    """``mal``, ``mag``, ``mac``, ``lm2`` or ``None`` (attention only). MAL also needs
    :class:`MirasBlockConfig` (it changes the residual stream, not just the mixer output)."""
    memory: Optional[NeuralMemoryConfig] = None
    """The neural memory (MAL / MAG / MAC); its ``d_model`` must be the model's."""
    lm2: Optional[LM2MemoryConfig] = None
    """The LM2 bank (``memory_block="lm2"``); defaults to ``LM2MemoryConfig()``."""
    n_persistent: int = 0
    """Learned, data-independent tokens every query can attend to (Titans' persistent memory)."""
    segment_len: Optional[int] = None
    """MAC: queries see the read-outs of their own segment only; defaults to the memory chunk size."""
    max_kv_context: Optional[int] = None
    """Stateful mode, full-attention layers: carry at most this many past keys/values
    (``None``: all of them, which is exact but grows with the document)."""
    memory_norm: Optional[LayerNormConfig] = None
    """Pre-norm of the memory branch; defaults to RMSNorm(eps=1e-6)."""

    # ------------------------------------------------------------------ validation
    def resolved_segment_len(self) -> int:
        if self.segment_len is not None:
            return self.segment_len
        return self.memory.chunk_size if self.memory is not None else 64

    def resolved_lm2(self) -> Optional[LM2MemoryConfig]:
        if self.memory_block is None or MemoryBlockType(self.memory_block) != MemoryBlockType.lm2:
            return None
        return self.lm2 if self.lm2 is not None else LM2MemoryConfig()

    def resolved_memory_norm(self) -> LayerNormConfig:
        return self.memory_norm or LayerNormConfig(name=LayerNormType.rms, eps=1e-6, bias=False, dtype=self.dtype)

    def validate_for(self, d_model: int) -> None:
        """Clear errors, naming the offending value, for configs that can't be built."""
        if self.name != AttentionType.default:
            raise OLMoConfigurationError(f"miras attention extends the 'default' attention, got name={self.name!r}")
        if not isinstance(self.n_heads, int) or self.n_heads <= 0:
            raise OLMoConfigurationError(f"attention n_heads must be a positive integer, got {self.n_heads!r}")
        if self.head_dim is None and d_model % self.n_heads != 0:
            raise OLMoConfigurationError(
                f"attention: d_model={d_model} is not divisible by n_heads={self.n_heads}; "
                "choose n_heads dividing d_model or set head_dim"
            )
        n_kv = self.n_kv_heads or self.n_heads
        if self.n_heads % n_kv != 0:
            raise OLMoConfigurationError(f"attention: n_heads={self.n_heads} is not divisible by n_kv_heads={n_kv}")
        for flag in ("scalable_softmax", "attention_sinks", "use_recompute_qkv_prep", "mxfp8_save_qkv_for_backward"):
            if getattr(self, flag):
                raise OLMoConfigurationError(f"miras attention doesn't support {flag}=True")
        if self.memory_block is not None:
            self.memory_block = parse_block_type(self.memory_block)
        block = self.memory_block
        if block in (MemoryBlockType.mal, MemoryBlockType.mag, MemoryBlockType.mac):
            if self.memory is None:
                raise OLMoConfigurationError(f"memory block {block.value!r} needs a NeuralMemoryConfig (memory=...)")
            if self.memory.d_model != d_model:
                raise OLMoConfigurationError(
                    f"memory d_model={self.memory.d_model} does not match the model's d_model={d_model}"
                )
            self.memory.validate()
        elif self.memory is not None:
            raise OLMoConfigurationError(f"memory is set but memory_block={block!r} doesn't use a neural memory")
        if block == MemoryBlockType.lm2:
            lm2 = self.resolved_lm2()
            assert lm2 is not None
            lm2.validate_for(d_model, self.n_heads)
        if not isinstance(self.n_persistent, int) or self.n_persistent < 0:
            raise OLMoConfigurationError(f"n_persistent must be an integer >= 0, got {self.n_persistent!r}")
        if self.segment_len is not None and (not isinstance(self.segment_len, int) or self.segment_len <= 0):
            raise OLMoConfigurationError(f"segment_len must be a positive integer, got {self.segment_len!r}")
        if self.max_kv_context is not None and (not isinstance(self.max_kv_context, int) or self.max_kv_context < 0):
            raise OLMoConfigurationError(f"max_kv_context must be an integer >= 0, got {self.max_kv_context!r}")

    # ------------------------------------------------------------------ size / build
    def memory_num_params(self, d_model: int) -> int:
        """Parameters of the memory side (``attention.miras.*``)."""
        block = None if self.memory_block is None else MemoryBlockType(self.memory_block)
        n = 0
        if block is not None:
            n += self.resolved_memory_norm().num_params(d_model)
        if block in (MemoryBlockType.mal, MemoryBlockType.mag, MemoryBlockType.mac):
            assert self.memory is not None
            n += self.memory.num_params()
        if block == MemoryBlockType.mag:
            n += d_model * d_model + d_model
        if block == MemoryBlockType.lm2:
            lm2 = self.resolved_lm2()
            assert lm2 is not None
            n += lm2.num_params(d_model)
        n += self.n_persistent * d_model
        if block == MemoryBlockType.mac or self.n_persistent > 0:
            n += self.n_heads  # context_gate
        return n

    def num_params(self, d_model: int) -> int:
        return super().num_params(d_model) + self.memory_num_params(d_model)

    def base_attention_config(self) -> AttentionConfig:
        """The plain OLMo-core ``AttentionConfig`` with the same attention fields."""
        return AttentionConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(AttentionConfig)})

    def build(  # type: ignore[override]
        self,
        d_model: int,
        *,
        layer_idx: int,
        n_layers: int,
        init_device: str = "cpu",
        cache: Optional[BufferCache] = None,
    ) -> "MirasAttention":
        from .attention import MirasAttention

        self.validate_for(d_model)
        # OLMo-core resolves window size, backend, RoPE and QK norm; the memory is added on top.
        attention = self.base_attention_config().build(
            d_model, layer_idx=layer_idx, n_layers=n_layers, init_device=init_device, cache=cache
        )
        return MirasAttention.adopt(attention, self, d_model=d_model, layer_idx=layer_idx, init_device=init_device)


@dataclass
class MirasBlockConfig(TransformerBlockConfig):
    """A transformer block whose sequence mixer is a :class:`MirasAttentionConfig`.

    ``name`` picks the OLMo-core block it extends (``reordered_norm`` for OLMo2/OLMo3, or
    ``default``); parameter names are that block's, plus ``attention.miras.*``.
    """

    def build(  # type: ignore[override]
        self,
        *,
        d_model: int,
        block_idx: int,
        n_layers: int,
        init_device: str = "cpu",
        cache: Optional[BufferCache] = None,
    ) -> "TransformerBlockBase":
        from .block import MirasReorderedNormTransformerBlock, MirasTransformerBlock

        if not isinstance(self.sequence_mixer, MirasAttentionConfig):
            got = type(self.sequence_mixer).__name__
            raise OLMoConfigurationError(f"MirasBlockConfig needs a MirasAttentionConfig sequence mixer, got {got}")
        name = TransformerBlockType(self.name)
        classes = {
            TransformerBlockType.default: MirasTransformerBlock,
            TransformerBlockType.reordered_norm: MirasReorderedNormTransformerBlock,
        }
        if name not in classes:
            valid = ", ".join(t.value for t in SUPPORTED_BASE_BLOCKS)
            raise OLMoConfigurationError(f"memory blocks extend the base block types {valid}; got {name.value!r}")
        if self.feed_forward is None or self.layer_norm is None or self.feed_forward_moe is not None:
            raise OLMoConfigurationError("memory blocks need a dense feed_forward and a layer_norm (no MoE)")
        kwargs = self.as_dict(exclude_none=True, recurse=False)
        kwargs.pop("name")
        kwargs.update(d_model=d_model, block_idx=block_idx, n_layers=n_layers, init_device=init_device, cache=cache)
        try:
            return classes[name](**kwargs)
        except TypeError as e:
            raise OLMoConfigurationError(f"invalid options for '{name}' {self.__class__.__name__}, {e}") from e
