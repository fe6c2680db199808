"""Attentional bias: the inner objective ℓ(M; k, v) the memory minimises while it reads.

Each objective gives the per-token loss (used by the autograd reference) and its explicit
gradient w.r.t. the memory output (used by the chunked path). Losses are summed over features.

- ``l2``     ℓ = ½‖M(k) − v‖²                                   (Titans)
- ``lp``     ℓ = (1/p) Σ_i (e_i² + ε)^{p/2},  e = M(k) − v        (Moneta; ε smooths |e|^p at 0)
- ``huber``  ℓ = Σ_i ½e_i² if |e_i| ≤ δ else δ(|e_i| − ½δ)         (Yaad)
- ``dot``    ℓ = −⟨M(k), v⟩                                       (linear attention / Hebbian)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from olmo_core.config import Config, StrEnum

__all__ = ["ObjectiveName", "AttentionalBiasConfig", "AttentionalBias"]


class ObjectiveName(StrEnum):
    l2 = "l2"
    lp = "lp"
    huber = "huber"
    dot = "dot"


@dataclass
class AttentionalBiasConfig(Config):
    name: ObjectiveName = ObjectiveName.l2
    p: float = 3.0
    """Exponent of the ``lp`` objective; p ≥ 1."""
    delta: float = 1.0
    """Huber threshold of the ``huber`` objective; δ > 0."""
    eps: float = 1e-6
    """Smoothing of ``lp`` around zero error, so its gradient is smooth for every p ≥ 1."""

    def validate(self) -> None:
        valid = ", ".join(o.value for o in ObjectiveName)
        try:
            ObjectiveName(self.name)
        except ValueError:
            raise ValueError(f"unknown attentional bias {self.name!r}; valid: {valid}") from None
        if self.name == ObjectiveName.lp and not self.p >= 1.0:
            raise ValueError(f"lp objective needs p >= 1, got p={self.p!r}")
        if self.name == ObjectiveName.huber and not self.delta > 0.0:
            raise ValueError(f"huber objective needs delta > 0, got delta={self.delta!r}")
        if not self.eps > 0.0:
            raise ValueError(f"objective eps must be > 0, got {self.eps!r}")

    def build(self) -> "AttentionalBias":
        self.validate()
        return AttentionalBias(self)


class AttentionalBias:
    def __init__(self, config: AttentionalBiasConfig):
        self.name = ObjectiveName(config.name)
        self.p = float(config.p)
        self.delta = float(config.delta)
        self.eps = float(config.eps)

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-token loss, summed over the last dim."""
        if self.name == ObjectiveName.dot:
            return -(pred * target).sum(-1)
        e = pred - target
        if self.name == ObjectiveName.l2:
            return 0.5 * (e * e).sum(-1)
        if self.name == ObjectiveName.lp:
            return ((e * e + self.eps) ** (0.5 * self.p)).sum(-1) / self.p
        a = e.abs()
        quad = 0.5 * e * e
        lin = self.delta * (a - 0.5 * self.delta)
        return torch.where(a <= self.delta, quad, lin).sum(-1)

    def grad(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """∂ℓ/∂pred, written out (the chunked path differentiates through it)."""
        if self.name == ObjectiveName.dot:
            return -target
        e = pred - target
        if self.name == ObjectiveName.l2:
            return e
        if self.name == ObjectiveName.lp:
            if self.p == 2.0:
                return e
            return e * (e * e + self.eps) ** (0.5 * self.p - 1.0)
        return e.clamp(-self.delta, self.delta)
