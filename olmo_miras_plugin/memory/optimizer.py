"""Memory optimiser: how per-token gradients of the inner objective update the memory.

Gradient descent with momentum and a forget gate (Titans, "surprise" with momentum):

    S_t = η_t S_{t−1} − θ_t ∇ℓ_t              (momentum; "surprise")
    A_t = (1 − α_t) A_{t−1} + S_t             (retention, see retention.py)

Without momentum (η ≡ 0): ``A_t = (1 − α_t) A_{t−1} − θ_t ∇ℓ_t``.

Each token's gradient is clipped to norm ``max_grad_norm`` (over all memory layers of a head)
before it enters the recurrence: ``∇ℓ_t ← ∇ℓ_t · min(1, τ / ‖∇ℓ_t‖)``. Without it an MLP memory
with large values or a large learning rate diverges to Inf within a few hundred tokens (seen in
tests); with it every write is bounded, so the state stays finite on any stream.

Inside a chunk every ∇ℓ_t is taken at the chunk's starting weights, so the recurrence is linear
in the gradients and its end state has a closed form. With ``Lη_t = Σ_{i≤t} log η_i`` and
``Lκ_t = Σ_{i≤t} log(1 − α_i)`` over the chunk (t = 1..C):

    S_C = e^{Lη_C} S_0 − Σ_s e^{Lη_C − Lη_s} θ_s G_s
    A_C = e^{Lκ_C} A_0 + [Σ_r e^{Lκ_C − Lκ_r + Lη_r}] S_0
          − Σ_s [Σ_{r≥s} e^{Lκ_C − Lκ_r + Lη_r − Lη_s}] θ_s G_s

Every exponent is ≤ 0, so nothing overflows however small the gates get. The suffix sums over
``r ≥ s`` are one reverse cumulative logsumexp per chunk, O(C) (``Lη_s`` is subtracted in log
space after the sum, never factored out: ``e^{−Lη_s}`` alone overflows). The weighted gradient
sums ``Σ_s w_s G_s`` are one matmul per layer (see architecture.py).

A new optimiser (e.g. Muon, as in Atlas) subclasses :class:`MemoryOptimizer` and implements
``step`` (the per-token rule, used by the reference) and ``chunk_coefficients`` / ``chunk_update``
(the chunked rule); nothing else in the memory has to change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Sequence

import torch

from olmo_core.config import Config, StrEnum

__all__ = [
    "MemoryOptimizerName",
    "MemoryOptimizerConfig",
    "MemoryOptimizer",
    "MomentumGD",
    "ChunkCoefficients",
]


class MemoryOptimizerName(StrEnum):
    gd = "gd"
    momentum = "momentum"


@dataclass
class MemoryOptimizerConfig(Config):
    name: MemoryOptimizerName = MemoryOptimizerName.momentum
    max_grad_norm: Optional[float] = 1.0
    """Per-token clip of the inner gradient norm (a trust region on each write); ``None`` or
    ``math.inf`` disables it (then the Triton linear kernel can split a head's state over programs)."""

    def validate(self) -> None:
        valid = ", ".join(o.value for o in MemoryOptimizerName)
        try:
            MemoryOptimizerName(self.name)
        except ValueError:
            raise ValueError(f"unknown memory optimizer {self.name!r}; valid: {valid}") from None
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 (math.inf: no clipping), got {self.max_grad_norm!r}")

    @property
    def uses_momentum(self) -> bool:
        return MemoryOptimizerName(self.name) == MemoryOptimizerName.momentum

    def build(self) -> "MemoryOptimizer":
        self.validate()
        tau = self.max_grad_norm
        return MomentumGD(use_momentum=self.uses_momentum, max_grad_norm=None if tau is None or math.isinf(tau) else tau)


class ChunkCoefficients(NamedTuple):
    """Closed-form coefficients of one chunk; leading dims ``(..., n_chunks)``."""

    accum_keep: torch.Tensor  # (..., N)     e^{Lκ_C}
    accum_from_momentum: Optional[torch.Tensor]  # (..., N)   Σ_r e^{Lκ_C − Lκ_r + Lη_r}
    momentum_keep: Optional[torch.Tensor]  # (..., N)   e^{Lη_C}
    accum_token_weight: torch.Tensor  # (..., N, C) coefficient of G_s in A_C (θ included)
    momentum_token_weight: Optional[torch.Tensor]  # (..., N, C) coefficient of G_s in S_C

    def per_chunk(self) -> List["ChunkCoefficients"]:
        """The coefficients of each chunk: (..., N) -> (...), (..., N, C) -> (..., C).

        ``unbind`` (not indexing in a loop) so that backward gathers all chunks in one stack;
        per-chunk indexing would scatter into a full-size zero tensor once per chunk (O(N²)).
        """
        n = self.accum_keep.shape[-1]
        cols = [
            [None] * n if t is None else t.unbind(-1 if i < 3 else -2) for i, t in enumerate(self)
        ]
        return [ChunkCoefficients(*(col[ci] for col in cols)) for ci in range(n)]


class MemoryOptimizer:
    uses_momentum: bool
    max_grad_norm: Optional[float] = None

    def clip_scale(self, sq_norm: torch.Tensor) -> Optional[torch.Tensor]:
        """Factor ``min(1, τ/‖g‖)`` for per-token squared gradient norms (None: no clipping)."""
        if self.max_grad_norm is None:
            return None
        return (self.max_grad_norm * torch.rsqrt(sq_norm + 1e-12)).clamp(max=1.0)

    def step(
        self,
        accum: torch.Tensor,
        momentum: Optional[torch.Tensor],
        grad: torch.Tensor,
        theta: torch.Tensor,
        eta: torch.Tensor,
        alpha: torch.Tensor,
    ):
        raise NotImplementedError

    def chunk_coefficients(
        self, theta: torch.Tensor, log_eta: torch.Tensor, log_keep: torch.Tensor, valid: torch.Tensor
    ) -> ChunkCoefficients:
        raise NotImplementedError

    def token_weights(self, coef: ChunkCoefficients) -> List[torch.Tensor]:
        raise NotImplementedError

    def chunk_update(
        self,
        accum: Sequence[torch.Tensor],
        momentum: Optional[Sequence[torch.Tensor]],
        weighted_grads: Sequence[torch.Tensor],
        coef: ChunkCoefficients,
    ):
        raise NotImplementedError


class MomentumGD(MemoryOptimizer):
    def __init__(self, use_momentum: bool = True, max_grad_norm: Optional[float] = None):
        self.uses_momentum = use_momentum
        self.max_grad_norm = max_grad_norm

    def step(self, accum, momentum, grad, theta, eta, alpha):
        """One token of the recurrence; gate tensors broadcast against the weights."""
        if self.uses_momentum:
            assert momentum is not None
            momentum = eta * momentum - theta * grad
            return (1.0 - alpha) * accum + momentum, momentum
        return (1.0 - alpha) * accum - theta * grad, None

    def chunk_coefficients(
        self, theta: torch.Tensor, log_eta: torch.Tensor, log_keep: torch.Tensor, valid: torch.Tensor
    ) -> ChunkCoefficients:
        """Inputs ``(..., N, C)``: θ ≥ 0, log η ≤ 0, log(1 − α) ≤ 0, ``valid`` 1 for real tokens.

        Padding tokens (θ = 0, η = 1, α = 0, valid = 0) leave both A and S unchanged: ``valid``
        drops their ``A += S`` term.
        """
        lk = log_keep.cumsum(-1)  # Lκ_t
        lk_end = lk[..., -1:]  # Lκ_C
        accum_keep = lk_end.squeeze(-1).exp()
        if not self.uses_momentum:
            return ChunkCoefficients(
                accum_keep=accum_keep,
                accum_from_momentum=None,
                momentum_keep=None,
                accum_token_weight=(lk_end - lk).exp() * theta,
                momentum_token_weight=None,
            )
        le = log_eta.cumsum(-1)  # Lη_t
        le_end = le[..., -1:]
        x = lk_end - lk + le  # exponent Lκ_C − Lκ_r + Lη_r of S_r's share of A_C; ≤ 0
        # Σ_{r≥s} e^{x_r − Lη_s} valid_r as a reverse cumulative logsumexp: O(C) per chunk
        # rather than a (C, C) pairwise tensor. e^{−Lη_s} must not be factored out (it overflows
        # once the gates get small), so the log-space suffix sum R_s is formed first and Lη_s
        # subtracted before exp: R_s − Lη_s = log Σ_{r≥s} e^{Lκ_C − Lκ_r + (Lη_r − Lη_s)} valid_r
        # has every term's exponent ≤ 0, so it is ≤ log C. Invalid tokens get a huge *finite*
        # negative log-weight, not −inf: logcumsumexp's backward turns −inf into NaN. An
        # all-invalid suffix then gives R_s ≈ that value, so its weight is exactly 0 (with zero
        # gradient), never NaN. log(valid) keeps fractional weights exact, as before.
        neg = torch.finfo(x.dtype).min / 8
        tiny = torch.finfo(x.dtype).tiny
        log_valid = torch.where(valid > 0, valid.clamp_min(tiny).log(), neg)
        r = (x + log_valid).flip(-1).logcumsumexp(-1).flip(-1)  # R_s
        return ChunkCoefficients(
            accum_keep=accum_keep,
            accum_from_momentum=(x.exp() * valid).sum(-1),
            momentum_keep=le_end.squeeze(-1).exp(),
            accum_token_weight=(r - le).exp() * theta,
            momentum_token_weight=(le_end - le).exp() * theta,
        )

    def token_weights(self, coef: ChunkCoefficients) -> List[torch.Tensor]:
        """Per-token weights ``(..., C)`` of one chunk whose weighted gradient sums the update needs."""
        ws = [coef.accum_token_weight]
        if self.uses_momentum:
            assert coef.momentum_token_weight is not None
            ws.append(coef.momentum_token_weight)
        return ws

    def chunk_update(self, accum, momentum, weighted_grads, coef):
        """One chunk's end state; ``weighted_grads[i]`` holds, per layer, ``Σ_s w_s G_s`` for
        ``token_weights()[i]``; ``coef`` is that chunk's (see :meth:`ChunkCoefficients.at`)."""

        def col(t: torch.Tensor) -> torch.Tensor:
            return t[..., None, None]

        new_accum, new_momentum = [], None
        if not self.uses_momentum:
            for a, g in zip(accum, weighted_grads[0]):
                new_accum.append(col(coef.accum_keep) * a - g)
            return new_accum, None
        assert momentum is not None and coef.accum_from_momentum is not None
        assert coef.momentum_keep is not None
        new_momentum = []
        for a, s, ga, gs in zip(accum, momentum, weighted_grads[0], weighted_grads[1]):
            new_accum.append(col(coef.accum_keep) * a + col(coef.accum_from_momentum) * s - ga)
            new_momentum.append(col(coef.momentum_keep) * s - gs)
        return new_accum, new_momentum
