"""Retention: how the memory's accumulated updates become its weights, and what it forgets.

Every retention here keeps a linear recurrence on an accumulator ``A``
(``A_t = (1 − α_t) A_{t−1} + S_t``, see ``optimizer.py``) and maps it to the memory weights
``W = φ(A)`` that are read and differentiated:

- ``decay``  φ(A) = A. With the forget gate α this is Titans' weight decay / ℓ2 retention.
- ``lq``     φ(A) = A / ‖A‖_q^{q−2} per weight matrix: mirror descent with ℓq retention
             (Moneta; q = 2 is ``decay``). ‖·‖_q is the entry-wise q-norm.
- ``kl``     φ(A) = softmax(A / τ) over each matrix row: every row is a point of the probability
             simplex and the update is multiplicative, i.e. KL retention (Memora). ``A`` plays
             log W. (A scale of d_in on the simplex was tried and made the inner loop chaotic: the
             all-ones component of W dominates every read.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from olmo_core.config import Config, StrEnum

__all__ = ["RetentionName", "RetentionConfig", "Retention"]


class RetentionName(StrEnum):
    decay = "decay"
    lq = "lq"
    kl = "kl"


@dataclass
class RetentionConfig(Config):
    name: RetentionName = RetentionName.decay
    q: float = 4.0
    """Exponent of ``lq`` retention; q ≥ 1."""
    eps: float = 1e-6
    """Smoothing of ‖A‖_q near zero (added as ε^q inside the norm) so φ stays finite."""
    temperature: float = 1.0
    """Softmax temperature of ``kl`` retention."""

    def validate(self) -> None:
        valid = ", ".join(r.value for r in RetentionName)
        try:
            RetentionName(self.name)
        except ValueError:
            raise ValueError(f"unknown retention {self.name!r}; valid: {valid}") from None
        if self.name == RetentionName.lq and not self.q >= 1.0:
            raise ValueError(f"lq retention needs q >= 1, got q={self.q!r}")
        if not self.eps > 0:
            raise ValueError(f"retention eps must be > 0, got {self.eps!r}")
        if not self.temperature > 0:
            raise ValueError(f"kl retention temperature must be > 0, got {self.temperature!r}")

    def build(self) -> "Retention":
        self.validate()
        return Retention(self)


class Retention:
    def __init__(self, config: RetentionConfig):
        self.name = RetentionName(config.name)
        self.q = float(config.q)
        self.eps = float(config.eps)
        self.temperature = float(config.temperature)

    @property
    def is_identity(self) -> bool:
        return self.name == RetentionName.decay or (self.name == RetentionName.lq and self.q == 2.0)

    def materialize(self, accum: torch.Tensor) -> torch.Tensor:
        """Memory weights ``φ(A)`` for an accumulator of shape ``(..., d_out, d_in)``."""
        if self.is_identity:
            return accum
        if self.name == RetentionName.lq:
            # (Σ|A|^q + ε^q)^{1/q}: a smooth q-norm, ≥ ε, so φ and its gradient stay finite at A = 0.
            power = accum.abs().pow(self.q).sum(dim=(-2, -1), keepdim=True)
            norm = (power + self.eps**self.q).pow(1.0 / self.q)
            return accum * norm.pow(2.0 - self.q)
        return torch.softmax(accum / self.temperature, dim=-1)
