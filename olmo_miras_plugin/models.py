"""OLMo2 / OLMo3 models with memory layers: ``MirasModelConfig`` and the preset functions.

The base is OLMo-core's own ``TransformerConfig`` (``olmo2_1B``, ``olmo3_7B``, ``olmo3_32B``, a
tiny one from ``olmo3_1M`` / ``olmo2_1M``), untouched except that the chosen layers become memory
blocks through ``block_overrides`` (and, with ``stream_attention``, every other layer's attention
becomes a ``miras_attention`` with *no* extra parameters, so the whole model can carry state
between calls). The built model is OLMo-core's ``Transformer``: base parameter names are
OLMo-core's, memory parameters all live under ``blocks.<i>.attention.miras.``, so a base
checkpoint loads unchanged (:func:`load_base_state_dict`), and since every memory branch starts
at exactly zero the model then computes exactly what the base model computes.

Dotted overrides work with OLMo-core's config machinery, e.g.
``config.merge(["memory.preset=yaad", "memory.block_type=mac", "memory.layers=[1,3]"])``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Set

import torch
import torch.nn as nn

from olmo_core.config import Config
from olmo_core.exceptions import OLMoConfigurationError
from olmo_core.nn.attention import AttentionBackendName, AttentionConfig, SlidingWindowAttentionConfig
from olmo_core.nn.config import ModelConfig
from olmo_core.nn.transformer import Transformer, TransformerBlockConfig, TransformerConfig, TransformerType

from .blocks import LM2MemoryConfig, MemoryBlockType, MirasAttentionConfig, MirasBlockConfig
from .blocks.config import SUPPORTED_BASE_BLOCKS
from .blocks.types import parse_block_type
from .memory import PRESETS, MemoryArchitectureConfig, MemoryImpl, NeuralMemoryConfig

__all__ = [
    "DOLMA2_PADDED_VOCAB_SIZE",
    "MEMORY_PARAM_MARKER",
    "MirasMemoryConfig",
    "MirasModelConfig",
    "PRESET_REVISION",
    "REVISION_1_STEP",
    "REVISION_2_MOMENTUM",
    "preset_revision_values",
    "is_memory_param",
    "load_base_state_dict",
    "miras_from_preset",
    "olmo2_1B_miras",
    "olmo3_7B_miras",
    "olmo3_32B_miras",
    "parameter_report",
    "set_memory_impl",
    "tiny_miras",
    "upgrade_saved_config",
]

log = logging.getLogger(__name__)
_warned: Set[str] = set()


def _warn_once(message: str) -> None:
    """Config resolution runs several times per launch (dry run, build); say it once."""
    if message not in _warned:
        _warned.add(message)
        log.warning(message)

MEMORY_PARAM_MARKER = ".miras."
"""Every memory parameter's name contains this; no base parameter's does."""

PRESET_REVISION = 3
"""Revision of the presets' values that ``MirasMemoryConfig.preset_revision`` selects. A saved
config names its preset, not the preset's numbers, so a model must keep the values it was
trained with when the presets change (docs/memory.md, "Inner step size and backprop span"):
revision 1 is the inner step size (θ_init, θ_max) before 2026-11-26; revision 2 the titans
preset's momentum without a cap (η_init 0.9, η_max 1) before 2026-11-26's ninth session;
revision 3 the current values."""

REVISION_1_STEP = {"titans": (0.01, 0.1), "moneta": (0.1, 1.0), "yaad": (0.1, 1.0), "memora": (0.1, 1.0)}
"""(θ_init, θ_max) of each preset in revision 1."""

REVISION_2_MOMENTUM = {"titans": (0.9, 1.0)}
"""(η_init, η_max) of the presets whose momentum changed in revision 3 (revisions 1 and 2)."""


def preset_revision_values(preset: str, revision: int) -> Dict[str, float]:
    """The values of ``preset`` that differ in ``revision`` from the current presets
    (:data:`PRESET_REVISION`); empty for the current revision."""
    if revision not in range(1, PRESET_REVISION + 1):
        raise OLMoConfigurationError(
            f"memory.preset_revision must be one of {list(range(1, PRESET_REVISION + 1))}, got {revision!r}"
        )
    values: Dict[str, float] = {}
    if revision == 1:
        values["theta_init"], values["theta_max"] = REVISION_1_STEP[preset]
    if revision <= 2 and preset in REVISION_2_MOMENTUM:
        values["eta_init"], values["eta_max"] = REVISION_2_MOMENTUM[preset]
    return values


_MEMORY_CONFIG_CLASS = "olmo_miras_plugin.models.MirasMemoryConfig"


def upgrade_saved_config(data: Any) -> Any:
    """A saved config dict (checkpoint or Hugging Face ``miras_config``), with every
    ``MirasMemoryConfig`` written before ``preset_revision`` existed marked revision 1, so it
    builds the memory it was trained with. Returns a new dict; call it before ``from_dict``."""
    if isinstance(data, dict):
        out = {k: upgrade_saved_config(v) for k, v in data.items()}
        if out.get("_CLASS_") == _MEMORY_CONFIG_CLASS and "preset_revision" not in out:
            out["preset_revision"] = 1
        return out
    if isinstance(data, list):
        return [upgrade_saved_config(v) for v in data]
    return data

DOLMA2_PADDED_VOCAB_SIZE = 100352
"""OLMo2/OLMo3's tokenizer (dolma2, 100,278 tokens) padded to a multiple of 128."""


@dataclass
class MirasMemoryConfig(Config):
    """Which layers get memory, of which block type, and the memory's preset and sizes."""

    block_type: MemoryBlockType = MemoryBlockType.mag
    """``mal``, ``mag``, ``mac`` or ``lm2``."""
    layers: Optional[List[int]] = None
    """Explicit memory layers; when set, ``every`` / ``offset`` are not used."""
    every: int = 4
    """Without ``layers``: every ``every``-th layer, starting at ``offset``."""
    offset: int = 0
    preset: str = "titans"
    """Neural-memory preset (``titans``, ``moneta``, ``yaad``, ``memora``); MAL / MAG / MAC."""
    n_heads: Optional[int] = None
    """Memory heads; defaults to the attention's ``n_heads``."""
    head_dim: Optional[int] = None
    chunk_size: int = 64
    """Tokens per memory update: the neural memory's inner-gradient chunk (MAC: also the segment
    length unless ``segment_len``), LM2's bank-update chunk unless ``lm2.chunk_size``."""
    depth: Optional[int] = None
    """Memory MLP depth; ``None`` keeps the preset's."""
    expansion: Optional[float] = None
    theta_max: Optional[float] = None
    """Cap of the inner learning rate θ; ``None`` keeps the preset's."""
    theta_init: Optional[float] = None
    """Initial inner learning rate θ (gate bias); ``None`` keeps the preset's."""
    eta_init: Optional[float] = None
    """Initial momentum η; ``None`` keeps the preset's (titans 0.8; presets without momentum ignore it)."""
    eta_max: Optional[float] = None
    """Cap of the momentum gate η; ``None`` keeps the preset's (titans 0.9; see
    ``NeuralMemoryConfig.eta_max``)."""
    alpha_init: Optional[float] = None
    """Initial forget rate α; ``None`` keeps the preset's (titans 1e-2, moneta 1e-3). Small values
    let early training see gradients from writes far back (e⁻²⁰ of a write survives 2,000 tokens at
    1e-2)."""
    preset_revision: int = PRESET_REVISION
    """Which revision of the presets' values ``None`` fields take (:data:`PRESET_REVISION`,
    :func:`preset_revision_values`): new configs get the current one; configs saved before this
    field existed load as revision 1 (:func:`upgrade_saved_config`), so a trained model keeps its
    inner step size and momentum."""
    max_grad_norm: Optional[float] = None
    """Per-token clip of the *inner* (surprise) gradient; ``None`` keeps the default (1.0),
    ``math.inf`` turns clipping off (see ``MemoryOptimizerConfig.max_grad_norm``)."""
    check_finite: bool = True
    """Memory refuses NaN/Inf inputs (one device sync per layer call)."""
    backprop_span: Optional[int] = None
    """Truncate the neural memory's backprop every this many tokens inside a sequence (a multiple
    of ``chunk_size``; see ``NeuralMemoryConfig.backprop_span``); ``None``: no cut inside a call
    (the train module's ``bptt_segments`` still cuts between segments)."""
    impl: Optional[MemoryImpl] = None
    """Neural-memory implementation (``chunked``, ``compiled``, ...); ``None`` keeps the default."""
    n_persistent: Optional[int] = None
    """Persistent tokens; ``None``: 4 for MAC (as Titans uses them), 0 otherwise."""
    segment_len: Optional[int] = None
    lm2: LM2MemoryConfig = field(default_factory=LM2MemoryConfig)
    """The LM2 bank (``block_type="lm2"``)."""

    def resolved_block_type(self) -> MemoryBlockType:
        return parse_block_type(self.block_type)

    def resolved_n_persistent(self) -> int:
        if self.n_persistent is not None:
            return self.n_persistent
        return 4 if self.resolved_block_type() == MemoryBlockType.mac else 0

    def resolve_layers(self, n_layers: int) -> List[int]:
        """The memory layer indices, validated against ``n_layers``."""
        if not isinstance(self.every, int) or self.every <= 0:
            raise OLMoConfigurationError(f"memory.every must be a positive integer, got {self.every!r}")
        if not isinstance(self.offset, int) or not 0 <= self.offset < self.every:
            raise OLMoConfigurationError(
                f"memory.offset must be in 0..{self.every - 1} (every={self.every}), got {self.offset!r}"
            )
        if self.layers is not None:
            if (self.every, self.offset) != (MirasMemoryConfig.every, MirasMemoryConfig.offset):  # not the defaults
                _warn_once(
                    f"memory.layers={list(self.layers)} is set, so every={self.every} / offset={self.offset} "
                    "are not used (set --model.memory.layers=null to place memory by every/offset)"
                )
            layers = [int(i) for i in self.layers]
            for i in layers:
                if not 0 <= i < n_layers:
                    raise OLMoConfigurationError(
                        f"memory layer {i} out of range for a {n_layers}-layer model (valid 0..{n_layers - 1})"
                    )
            dups = sorted({i for i in layers if layers.count(i) > 1})
            if dups:
                raise OLMoConfigurationError(f"memory layers listed more than once: {dups}")
        else:
            layers = list(range(self.offset, n_layers, self.every))
        if not layers:
            raise OLMoConfigurationError(f"no memory layers selected for a {n_layers}-layer model")
        return sorted(layers)

    def neural_memory(self, d_model: int, attn_heads: int) -> NeuralMemoryConfig:
        """The ``NeuralMemoryConfig`` of one memory layer."""
        if self.preset not in PRESETS:
            raise OLMoConfigurationError(
                f"unknown memory preset {self.preset!r}; valid presets: {', '.join(PRESETS)}"
            )
        kwargs: Dict[str, Any] = dict(
            n_heads=self.n_heads if self.n_heads is not None else attn_heads,
            head_dim=self.head_dim,
            chunk_size=self.chunk_size,
            check_finite=self.check_finite,
            backprop_span=self.backprop_span,
        )
        if self.impl is not None:
            kwargs["impl"] = self.impl
        kwargs.update(preset_revision_values(self.preset, self.preset_revision))
        for name in ("theta_max", "theta_init", "eta_init", "eta_max", "alpha_init"):
            if getattr(self, name) is not None:
                kwargs[name] = getattr(self, name)
        if self.depth is not None or self.expansion is not None:
            arch = MemoryArchitectureConfig()
            kwargs["architecture"] = dataclasses.replace(
                arch,
                depth=self.depth if self.depth is not None else arch.depth,
                expansion=self.expansion if self.expansion is not None else arch.expansion,
            )
        try:
            config = NeuralMemoryConfig.from_preset(self.preset, d_model=d_model, **kwargs)
            if self.max_grad_norm is not None:  # inf stored as the config's canonical "no clip", None
                config.optimizer.max_grad_norm = None if math.isinf(self.max_grad_norm) else self.max_grad_norm
            config.validate()
        except ValueError as e:
            raise OLMoConfigurationError(f"memory: {e}") from e
        return config


def is_memory_param(name: str) -> bool:
    """Whether a parameter name (from ``named_parameters`` / a state dict) belongs to the memory."""
    return MEMORY_PARAM_MARKER in f".{name}"


INFERENCE_IMPL_CHOICES = ("auto", "keep", *(i.value for i in MemoryImpl))
"""``--memory-impl`` of the inference CLIs (evaluate, generate)."""


def set_memory_impl(model: nn.Module, impl: str, device: Optional[torch.device] = None) -> Optional[str]:
    """Switch every memory layer of ``model`` to ``impl`` (the math is the same; only speed differs).

    ``"keep"`` leaves the checkpoint's choice. ``"auto"`` (for inference) switches to ``triton``,
    on CUDA with Triton installed, the layers whose rule a Triton kernel computes (the linear and
    the MLP memory of the titans rule) and keeps the others' choice: their fallback inside
    ``triton`` would be ``torch.compile``, a compile per new shape that short evaluations don't
    repay. Returns the impl set (None: nothing changed).
    """
    from .memory import NeuralMemory, triton_scan

    if impl not in INFERENCE_IMPL_CHOICES:
        raise ValueError(f"unknown memory impl {impl!r}; valid: {', '.join(INFERENCE_IMPL_CHOICES)}")
    if impl == "keep":
        return None
    layers = [m for m in model.modules() if isinstance(m, NeuralMemory)]
    if impl == "auto":
        if device is None or device.type != "cuda":
            return None
        layers = [m for m in layers if triton_scan.rule_supported(m.rule)]
        if not layers:
            return None
        impl = MemoryImpl.triton.value
    for m in layers:
        m.impl = MemoryImpl(impl)
    return impl


@dataclass
class MirasModelConfig(ModelConfig):
    """An OLMo-core transformer (``base``) with memory layers (``memory``); ``build()`` gives an
    OLMo-core ``Transformer``."""

    base: TransformerConfig
    memory: MirasMemoryConfig = field(default_factory=MirasMemoryConfig)
    stream_attention: bool = True
    """Make every layer's attention able to carry its key/value context in stateful mode (no
    extra parameters; identical outputs otherwise), so the whole model can read a document in
    pieces. Off: non-memory layers stay plain OLMo-core attention and only see the current call."""
    max_kv_context: Optional[int] = None
    """Stateful mode: cap the keys/values carried by full-attention layers (``None``: all)."""
    freeze_base: bool = False
    """Train only the memory (the base parameters get ``requires_grad=False``)."""

    # ------------------------------------------------------------------ the derived OLMo-core config
    def _miras_block(self, block: TransformerBlockConfig, layer: Optional[int], memory_layer: bool) -> MirasBlockConfig:
        """``block`` with a ``miras_attention`` mixer (with memory if ``memory_layer``); ``layer``
        only labels errors (``None``: the shared ``block``)."""
        where = "the shared block" if layer is None else f"layer {layer}"
        att = block.sequence_mixer
        if type(att) is not AttentionConfig and not isinstance(att, MirasAttentionConfig):
            raise OLMoConfigurationError(
                f"{where}: memory blocks need an attention sequence mixer, got {type(att).__name__}"
            )
        if block.name not in SUPPORTED_BASE_BLOCKS:
            valid = ", ".join(t.value for t in SUPPORTED_BASE_BLOCKS)
            raise OLMoConfigurationError(f"{where}: block type {block.name!r} can't take memory (valid: {valid})")
        fields = {f.name: getattr(att, f.name) for f in dataclasses.fields(AttentionConfig)}
        mixer = MirasAttentionConfig(**fields, max_kv_context=self.max_kv_context)
        if memory_layer:
            spec = self.memory
            block_type = spec.resolved_block_type()
            mixer.memory_block = block_type
            if block_type != MemoryBlockType.lm2:
                mixer.memory = spec.neural_memory(self.base.d_model, att.n_heads)
            else:
                lm2 = spec.lm2.copy()
                lm2.chunk_size = lm2.chunk_size if lm2.chunk_size is not None else spec.chunk_size
                mixer.lm2 = lm2
            mixer.n_persistent = spec.resolved_n_persistent()
            mixer.segment_len = spec.segment_len
            mixer.memory_norm = None if block.layer_norm is None else block.layer_norm.copy()
        try:
            mixer.validate_for(self.base.d_model)
        except (ValueError, OLMoConfigurationError) as e:
            raise OLMoConfigurationError(f"{where}: {e}") from e
        block_fields = {f.name: getattr(block, f.name) for f in dataclasses.fields(TransformerBlockConfig)}
        block_fields["sequence_mixer"] = mixer
        return MirasBlockConfig(**block_fields)

    def memory_layers(self) -> List[int]:
        return self.memory.resolve_layers(self.base.n_layers)

    def transformer_config(self) -> TransformerConfig:
        """The OLMo-core ``TransformerConfig`` this builds: ``base`` with memory block overrides."""
        base = self.base.copy()
        if isinstance(base.block, dict) or base.block_pattern is not None:
            raise OLMoConfigurationError(
                "bases with named blocks (block_pattern) are not supported; use block_overrides"
            )
        if base.name != TransformerType.default:
            raise OLMoConfigurationError(f"memory models extend the default transformer, got name={base.name!r}")
        layers = set(self.memory_layers())
        resolved = base.resolved_block_configs
        overridden = set(base.block_overrides or {})
        overrides: Dict[int, TransformerBlockConfig] = {}
        for i in sorted(layers | overridden):
            if i in layers or self.stream_attention:
                overrides[i] = self._miras_block(resolved[i], i, memory_layer=i in layers)
            else:
                overrides[i] = resolved[i]
        if self.stream_attention:
            # The shared block: attention that can carry its context, with no extra parameters.
            base.block = self._miras_block(base.block, None, memory_layer=False)  # type: ignore[arg-type]
        base.block_overrides = overrides or None
        return base

    # ------------------------------------------------------------------ ModelConfig
    @property
    def num_params(self) -> int:
        return self.transformer_config().num_params

    @property
    def num_non_embedding_params(self) -> int:
        return self.transformer_config().num_non_embedding_params

    @property
    def num_memory_params(self) -> int:
        tc = self.transformer_config()
        return sum(
            b.sequence_mixer.memory_num_params(tc.d_model)
            for b in tc.resolved_block_configs
            if isinstance(b.sequence_mixer, MirasAttentionConfig)
        )

    def build(self, *, init_device: str = "cpu") -> Transformer:  # type: ignore[override]
        """Build the OLMo-core ``Transformer``; logs a base / memory / trainable parameter report."""
        model = self.transformer_config().build(init_device=init_device)
        if self.freeze_base:
            for name, p in model.named_parameters():
                if not is_memory_param(name):
                    p.requires_grad_(False)
        report = parameter_report(model)
        log.info(
            "miras model: %s blocks at layers %s (preset %s) | params: base %s, memory %s, total %s, trainable %s",
            self.memory.resolved_block_type().value,
            self.memory_layers(),
            self.memory.preset if self.memory.resolved_block_type() != MemoryBlockType.lm2 else "lm2",
            f"{report['base']:,d}",
            f"{report['memory']:,d}",
            f"{report['total']:,d}",
            f"{report['trainable']:,d}",
        )
        return model


# ---------------------------------------------------------------------------------------------- helpers
def parameter_report(model: nn.Module) -> Dict[str, int]:
    """Parameter counts: ``total``, ``base``, ``memory``, ``trainable``, ``trainable_memory``."""
    out = dict(total=0, base=0, memory=0, trainable=0, trainable_memory=0)
    for name, p in model.named_parameters():
        n = p.numel()
        mem = is_memory_param(name)
        out["total"] += n
        out["memory" if mem else "base"] += n
        if p.requires_grad:
            out["trainable"] += n
            if mem:
                out["trainable_memory"] += n
    return out


def load_base_state_dict(model: nn.Module, state_dict: Mapping[str, Any]) -> List[str]:
    """Load a base (OLMo-core, no memory) state dict into a memory model.

    Every key must match a base parameter of ``model``, and every base parameter must be given;
    the memory parameters keep their (zero-init) values. Returns the memory parameter names left
    as they were.
    """
    missing, unexpected = model.load_state_dict(dict(state_dict), strict=False)
    if unexpected:
        raise KeyError(f"state dict has keys the model doesn't: {sorted(unexpected)[:10]}")
    base_missing = [k for k in missing if not is_memory_param(k)]
    if base_missing:
        raise KeyError(f"state dict lacks base parameters: {sorted(base_missing)[:10]}")
    return list(missing)


def _torch_backend(backend: Optional[str]) -> Optional[AttentionBackendName]:
    return None if backend is None else AttentionBackendName(backend)


def miras_from_preset(
    preset: str,
    vocab_size: int = DOLMA2_PADDED_VOCAB_SIZE,
    *,
    memory: Optional[MirasMemoryConfig] = None,
    attn_backend: Optional[str] = "torch",
    **kwargs: Any,
) -> MirasModelConfig:
    """Memory model on any OLMo-core preset, e.g. ``"olmo2_1B_v2"`` (the released 16-layer
    OLMo-2-0425-1B layout) or ``"olmo3_7B"``; ``kwargs`` go to :class:`MirasModelConfig`."""
    factory = getattr(TransformerConfig, preset, None)
    if factory is None or not preset.startswith(("olmo2_", "olmo3_")):
        raise OLMoConfigurationError(f"unknown OLMo2/OLMo3 preset {preset!r} (e.g. olmo2_1B, olmo3_7B, olmo3_32B)")
    base = factory(vocab_size=vocab_size, attn_backend=_torch_backend(attn_backend))
    return MirasModelConfig(base=base, memory=memory if memory is not None else MirasMemoryConfig(), **kwargs)


def olmo2_1B_miras(
    vocab_size: int = DOLMA2_PADDED_VOCAB_SIZE,
    *,
    memory: Optional[MirasMemoryConfig] = None,
    attn_backend: Optional[str] = "torch",
    **kwargs: Any,
) -> MirasModelConfig:
    """``TransformerConfig.olmo2_1B`` + memory (OLMo-core's preset has 18 layers; the released
    16-layer checkpoint is ``miras_from_preset("olmo2_1B_v2")``)."""
    return miras_from_preset("olmo2_1B", vocab_size, memory=memory, attn_backend=attn_backend, **kwargs)


def olmo3_7B_miras(
    vocab_size: int = DOLMA2_PADDED_VOCAB_SIZE,
    *,
    memory: Optional[MirasMemoryConfig] = None,
    attn_backend: Optional[str] = "torch",
    **kwargs: Any,
) -> MirasModelConfig:
    """``TransformerConfig.olmo3_7B`` + memory; OLMo3's sliding-window pattern is kept."""
    return miras_from_preset("olmo3_7B", vocab_size, memory=memory, attn_backend=attn_backend, **kwargs)


def olmo3_32B_miras(
    vocab_size: int = DOLMA2_PADDED_VOCAB_SIZE,
    *,
    memory: Optional[MirasMemoryConfig] = None,
    attn_backend: Optional[str] = "torch",
    **kwargs: Any,
) -> MirasModelConfig:
    """``TransformerConfig.olmo3_32B`` + memory (GQA: 40 query / 8 key-value heads)."""
    return miras_from_preset("olmo3_32B", vocab_size, memory=memory, attn_backend=attn_backend, **kwargs)


def tiny_miras(
    vocab_size: int = 259,
    *,
    d_model: int = 128,
    n_layers: int = 4,
    n_heads: int = 4,
    n_kv_heads: Optional[int] = None,
    hidden_size: Optional[int] = None,
    window: Optional[int] = 64,
    memory: Optional[MirasMemoryConfig] = None,
    **kwargs: Any,
) -> MirasModelConfig:
    """A CPU-sized OLMo3 (``window`` set: OLMo3's sliding-window pattern ``[w, w, w, full]``) or
    OLMo2 (``window=None``), from OLMo-core's ``olmo3_1M`` / ``olmo2_1M`` with fields changed.
    The default vocabulary is the byte tokenizer's (259)."""
    if d_model % n_heads != 0:
        raise OLMoConfigurationError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
    common: Dict[str, Any] = dict(
        vocab_size=vocab_size,
        n_layers=n_layers,
        n_heads=n_heads,
        head_dim=d_model // n_heads,
        attn_backend=AttentionBackendName.torch,
    )
    if n_kv_heads is not None:
        common["n_kv_heads"] = n_kv_heads
    if window is not None:
        pattern = SlidingWindowAttentionConfig(
            pattern=[window, window, window, -1],
            force_full_attention_on_first_layer=False,
            force_full_attention_on_last_layer=True,
        )
        base = TransformerConfig.olmo3_1M(sliding_window=pattern, **common)
    else:
        base = TransformerConfig.olmo2_1M(**common)
    base.d_model = d_model
    assert isinstance(base.block, TransformerBlockConfig) and base.block.feed_forward is not None
    base.block.feed_forward.hidden_size = hidden_size if hidden_size is not None else 2 * d_model
    return MirasModelConfig(base=base, memory=memory if memory is not None else MirasMemoryConfig(), **kwargs)
