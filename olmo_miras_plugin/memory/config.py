"""Configuration of a neural memory layer, and the MIRAS presets."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from olmo_core.config import Config, DType, StrEnum

from .architecture import ActivationName, MemoryArchitectureConfig
from .objective import AttentionalBiasConfig, ObjectiveName
from .optimizer import MemoryOptimizerConfig, MemoryOptimizerName
from .retention import RetentionConfig, RetentionName

__all__ = ["MemoryImpl", "NeuralMemoryConfig", "PRESETS"]


class MemoryImpl(StrEnum):
    reference = "reference"
    """Token-by-token loop with autograd for the inner gradient (oracle; slow)."""
    chunked = "chunked"
    """Chunk-parallel PyTorch implementation (portable; CPU and GPU)."""
    compiled = "compiled"
    """``chunked`` with each chunk's step fused by ``torch.compile`` (GPU; compiles on first use)."""
    graphed = "graphed"
    """``compiled``, with the whole forward+backward captured as CUDA graphs per input shape
    (CUDA only; see ``cuda_graphs.py`` for when it falls back to ``compiled``)."""
    triton = "triton"
    """Fused Triton kernels, forward and backward, for the ``titans`` rule (l2 objective, decay
    retention, momentum (the MLP memory also plain gd), with or without the inner clip) with a linear memory
    (``architecture.depth=1``: ``triton_linear.py``) or the depth-2 MLP memory
    (``triton_mlp_split.py``). Partial chunks go through the chunked scan; other rules, CPU
    tensors or a missing ``triton`` fall back to ``compiled`` (CUDA) / ``chunked`` (CPU)."""
    triton_graphed = "triton_graphed"
    """``triton``, with the forward+backward captured as CUDA graphs per input shape (as ``graphed``
    does for ``compiled``): removes the Python/launch overhead per call that dominates at 4k
    tokens (the linear memory's segments of ≥ 16k tokens run without the graph, where its input
    copies cost more). For fixed-shape training loops (each new shape captures and keeps a graph)
    and for streaming inference in fixed-size segments: without gradients a forward-only graph is
    captured at a shape's second call, for at most four shapes per layer (``cuda_graphs.py``)."""


PRESETS: Dict[str, Dict[str, Any]] = {
    # Titans (Behrouz et al., 2024): ℓ = ½‖M(k) − v‖²; S_t = η_t S_{t−1} − θ_t ∇ℓ;
    # M_t = (1 − α_t) M_{t−1} + S_t; M an MLP of depth 2.
    # Step size. A chunk's update sums its C = 64 tokens' gradients taken at the same weights, so
    # when the keys of a chunk point the same way (real hidden states share a large common
    # direction) the step acts like C·θ (and momentum multiplies it by 1/(1 − η)): the inner
    # iteration stops contracting and the *outer* gradients through the chunk chain grow
    # exponentially with T, while the forward stays finite (the clip). Measured (docs/memory.md,
    # "Inner step size and backprop span"; OLMo2-1B + MAL every 4th layer, 8k tokens of backprop,
    # 16 training steps): θ_init / θ_max 0.01 / 0.1 inf gradients at the second step;
    # 0.001 / 0.01 spikes of 1e3–1e13 on some steps; 0.001 / 0.003 spikes from the 12th step;
    # 0.0005 / 0.002 the base model's scale throughout. The cap matters most: the outer optimiser
    # moves the θ gate towards it. tests/test_stability.py checks one layer on aligned inputs.
    # Momentum: a direction that persists is stepped by θ/(1 − η), and on real text at 8k the
    # uncapped η gate saturated at 1.0 (float32) within 5 steps and the outer gradients reached
    # 1e14. Capping η at 0.9 (η_init 0.8) keeps θ/(1 − η) ≤ 0.02: 60 steps at 8k trained to loss
    # 2.78 (uncapped 4.02; a cap of 0.95 still exploded; H100, ninth session, docs/memory.md).
    "titans": dict(
        objective=AttentionalBiasConfig(name=ObjectiveName.l2),
        retention=RetentionConfig(name=RetentionName.decay),
        optimizer=MemoryOptimizerConfig(name=MemoryOptimizerName.momentum),
        theta_init=5e-4,
        theta_max=2e-3,
        eta_init=0.8,
        eta_max=0.9,
    ),
    # Moneta (MIRAS): ℓ = (1/p)‖M(k) − v‖_p^p with p = 3; ℓq retention (mirror descent):
    # A_t = (1 − α_t) A_{t−1} − θ_t ∇ℓ;  W_t = A_t / ‖A_t‖_q^{q−2}.
    # The paper's q = 4 made the inner loop chaotic here (float32 and float64 runs of the same
    # layer part ways after a few hundred tokens), as did α = 1e-2 with q = 3: φ grows as ‖A‖
    # shrinks. q = 3 with α starting at 1e-3 stays stable over long streams. Step size as for
    # titans, a further 10× down: with aligned keys θ_init 0.1 / θ_max 1 and even 0.001 / 0.01
    # made the outer gradients explode (1e10 / 1e5 × the output projection's at 4k tokens).
    "moneta": dict(
        objective=AttentionalBiasConfig(name=ObjectiveName.lp, p=3.0),
        retention=RetentionConfig(name=RetentionName.lq, q=3.0),
        optimizer=MemoryOptimizerConfig(name=MemoryOptimizerName.gd),
        alpha_init=1e-3,
        theta_init=1e-4,
        theta_max=1e-3,
    ),
    # Yaad (MIRAS): Huber attentional bias (quadratic for |e| ≤ δ, linear beyond: robust to
    # outlier tokens) with decay retention: W_t = (1 − α_t) W_{t−1} − θ_t ∇ℓ_Huber.
    "yaad": dict(
        objective=AttentionalBiasConfig(name=ObjectiveName.huber, delta=1.0),
        retention=RetentionConfig(name=RetentionName.decay),
        optimizer=MemoryOptimizerConfig(name=MemoryOptimizerName.gd),
        # A smaller step than the default, for the titans preset's reason (at θ_init 0.1 / θ_max 1
        # outer gradients reached 1e3× the output projection's at 2k tokens with aligned keys); no
        # momentum, so 10× the titans step at the same θ.
        theta_init=0.001,
        theta_max=0.01,
    ),
    # Memora (MIRAS): ℓ2 attentional bias with KL retention; weights on the simplex:
    # log W_t = (1 − α_t) log W_{t−1} − θ_t ∇ℓ  (up to normalisation), W_t = softmax(log W_t).
    "memora": dict(
        objective=AttentionalBiasConfig(name=ObjectiveName.l2),
        retention=RetentionConfig(name=RetentionName.kl),
        optimizer=MemoryOptimizerConfig(name=MemoryOptimizerName.gd),
    ),
}


@dataclass
class NeuralMemoryConfig(Config):
    """A Titans/MIRAS neural long-term memory layer (see :class:`~.layer.NeuralMemory`).

    Gates (per token and head, from the layer input x):
        θ_t = theta_max · σ(w_θ·x + b_θ)   learning rate, in (0, theta_max); b_θ gives θ = theta_init
        η_t = eta_max · σ(w_η·x + b_η)    momentum, in (0, eta_max); b_η gives η = eta_init
        α_t = σ(w_α·x + b_α)              forget, in (0, 1); b_α gives α = alpha_init
    """

    d_model: int
    n_heads: int = 4
    head_dim: Optional[int] = None
    """Per-head key/value width; defaults to ``d_model // n_heads``."""
    chunk_size: int = 64
    """Tokens whose inner gradients are taken at the same weights (C = 1: fully sequential)."""
    architecture: MemoryArchitectureConfig = field(default_factory=MemoryArchitectureConfig)
    objective: AttentionalBiasConfig = field(default_factory=AttentionalBiasConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    optimizer: MemoryOptimizerConfig = field(default_factory=MemoryOptimizerConfig)
    conv_kernel: int = 4
    """Short causal depthwise conv on q, k, v (Titans); 0 disables it."""
    qk_norm: bool = True
    """L2-normalise keys and queries per head (keeps the inner step size meaningful)."""
    theta_max: float = 1.0
    theta_init: float = 0.1
    eta_init: float = 0.9
    eta_max: float = 1.0
    """Cap of the momentum gate η (1: none). A persistent surprise direction is stepped by up to
    θ/(1 − η), so η near 1 undoes ``theta_max``: on OLMo2 hidden states η saturated at 1.0 in float32
    for some tokens within 5 training steps at 8k (docs/memory.md, "Inner step size and backprop
    span"). A cap bounds the effective step by theta_max / (1 − eta_max)."""
    alpha_init: float = 0.01
    impl: MemoryImpl = MemoryImpl.chunked
    backprop_span: Optional[int] = None
    """Cut the memory state's autograd graph at every multiple of this many tokens (absolute
    positions, a multiple of ``chunk_size``; a call that starts on one cuts the state it is
    given): the outer gradient flows back through at most this
    many tokens of memory writes, while the forward carries the state through the whole call
    (truncated backprop inside one sequence). Past ~2K tokens the outer gradients of the MLP
    memory explode on real hidden states (docs/memory.md, "Inner step size and backprop span").
    ``None``: backprop through the whole call."""
    check_finite: bool = True
    """Raise on NaN/Inf inputs (one device sync per call; turn off for maximum speed)."""
    dtype: DType = DType.float32
    preset: Optional[str] = None
    """Name of the preset this config came from (informational)."""

    @classmethod
    def from_preset(cls, name: str, d_model: int, **kwargs: Any) -> "NeuralMemoryConfig":
        """``titans``, ``moneta``, ``yaad`` or ``memora`` (see ``PRESETS``); kwargs override fields."""
        if name not in PRESETS:
            raise ValueError(f"unknown memory preset {name!r}; valid presets: {', '.join(PRESETS)}")
        fields = {k: v.copy() if isinstance(v, Config) else v for k, v in PRESETS[name].items()}
        fields.update(kwargs)
        return cls(d_model=d_model, preset=name, **fields)

    @property
    def resolved_head_dim(self) -> int:
        if self.head_dim is not None:
            return self.head_dim
        return self.d_model // self.n_heads

    def validate(self) -> None:
        if not isinstance(self.d_model, int) or self.d_model <= 0:
            raise ValueError(f"d_model must be a positive integer, got {self.d_model!r}")
        if not isinstance(self.n_heads, int) or self.n_heads <= 0:
            raise ValueError(f"n_heads must be a positive integer, got {self.n_heads!r}")
        if self.head_dim is None and self.d_model % self.n_heads != 0:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                "choose n_heads dividing d_model or set head_dim explicitly"
            )
        if self.head_dim is not None and self.head_dim <= 0:
            raise ValueError(f"head_dim must be positive, got {self.head_dim!r}")
        if not isinstance(self.chunk_size, int) or self.chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive integer, got {self.chunk_size!r}")
        if not isinstance(self.conv_kernel, int) or self.conv_kernel < 0:
            raise ValueError(f"conv_kernel must be an integer >= 0 (0 disables), got {self.conv_kernel!r}")
        if not (self.theta_max > 0 and math.isfinite(self.theta_max)):
            raise ValueError(
                f"theta_max must be finite and > 0 (the inner step θ needs a cap), got {self.theta_max!r}"
            )
        if not 0 < self.theta_init < self.theta_max:
            raise ValueError(f"theta_init must be in (0, theta_max={self.theta_max}), got {self.theta_init!r}")
        if not 0 < self.alpha_init < 1:
            raise ValueError(f"alpha_init must be in (0, 1), got {self.alpha_init!r}")
        # η exists only with a momentum optimizer; the gd presets (moneta, yaad, memora) ignore it.
        if self.optimizer.uses_momentum:
            if not 0 < self.eta_init < 1:
                raise ValueError(f"eta_init must be in (0, 1), got {self.eta_init!r}")
            if not 0 < self.eta_max <= 1:
                raise ValueError(f"eta_max must be in (0, 1] (1: no cap), got {self.eta_max!r}")
            if not self.eta_init < self.eta_max:
                raise ValueError(f"eta_init must be below eta_max={self.eta_max}, got {self.eta_init!r}")
        valid_dtypes = ", ".join(d.value for d in DType)
        try:
            DType(self.dtype)
        except ValueError:
            raise ValueError(f"unknown parameter dtype {self.dtype!r}; valid: {valid_dtypes}") from None
        if self.backprop_span is not None and (
            not isinstance(self.backprop_span, int)
            or self.backprop_span <= 0
            or self.backprop_span % self.chunk_size != 0
        ):
            raise ValueError(
                f"backprop_span must be a positive multiple of chunk_size={self.chunk_size} (or None: "
                f"no cut), got {self.backprop_span!r}"
            )
        valid_impls = ", ".join(i.value for i in MemoryImpl)
        try:
            MemoryImpl(self.impl)
        except ValueError:
            raise ValueError(f"unknown memory impl {self.impl!r}; valid: {valid_impls}") from None
        self.architecture.validate()
        self.objective.validate()
        self.retention.validate()
        self.optimizer.validate()
        if self.architecture.residual_norm and self.architecture.depth < 1:
            raise ValueError("residual_norm needs depth >= 1")

    def gate_biases(self) -> Dict[str, float]:
        """Biases that make each gate start at its ``*_init`` value (η only with momentum)."""
        logit = lambda p: math.log(p) - math.log1p(-p)  # noqa: E731
        biases = {"theta": logit(self.theta_init / self.theta_max), "alpha": logit(self.alpha_init)}
        if self.optimizer.uses_momentum:
            biases["eta"] = logit(self.eta_init / self.eta_max)
        return biases

    def signature(self) -> str:
        """Identifies configs whose states are interchangeable."""
        arch = self.architecture
        return (
            f"heads={self.n_heads},head_dim={self.resolved_head_dim},chunk={self.chunk_size},"
            f"arch={arch.layer_shapes(self.resolved_head_dim)}/{ActivationName(arch.activation)}/"
            f"res={arch.residual_norm},obj={ObjectiveName(self.objective.name)},"
            f"ret={RetentionName(self.retention.name)},opt={MemoryOptimizerName(self.optimizer.name)},"
            f"conv={self.conv_kernel}"
        )

    def num_params(self) -> int:
        h, d, dm = self.n_heads, self.resolved_head_dim, self.d_model
        n = 3 * dm * h * d + h * d * dm  # q, k, v, out
        n_gates = 3 if self.optimizer.uses_momentum else 2
        n += n_gates * (dm * h + h)
        n += sum(o * i for o, i in self.architecture.layer_shapes(d)) * h
        if self.conv_kernel > 0:
            n += 3 * h * d * self.conv_kernel
        n += d  # output norm
        return n

    def build(self, init_device: str = "cpu") -> "NeuralMemory":
        from .layer import NeuralMemory

        self.validate()
        return NeuralMemory(self, init_device=init_device)
