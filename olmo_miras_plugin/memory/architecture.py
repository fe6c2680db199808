"""Memory architectures: the small network whose weights are the memory.

Every architecture here is a stack of per-head linear maps, so the gradient of the inner objective
w.r.t. each weight matrix, for one token, is an outer product ``delta ⊗ input``. The chunked
implementation relies on that: the weighted sum of per-token gradients of a chunk is one matmul
``deltaᵀ · diag(w) · input``. ``forward_cached`` / ``backward`` give those factors with explicit
formulas (no autograd), so the outer model can differentiate through the inner update.

Weights are lists of tensors shaped ``(..., d_out, d_in)`` (leading dims: batch, heads), inputs
``(..., n, d_in)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from olmo_core.config import Config, StrEnum

__all__ = [
    "ActivationName",
    "MemoryArchitectureConfig",
    "MemoryArchitecture",
    "LayerFactors",
]

LayerFactors = Tuple[torch.Tensor, torch.Tensor]
"""``(delta, input)`` of one linear layer: the per-token gradient is ``delta_t ⊗ input_t``."""


class ActivationName(StrEnum):
    gelu = "gelu"
    silu = "silu"


def _activation(h: torch.Tensor, name: ActivationName) -> torch.Tensor:
    if name == ActivationName.gelu:
        return F.gelu(h)
    return F.silu(h)


def _activation_derivative(h: torch.Tensor, name: ActivationName) -> torch.Tensor:
    if name == ActivationName.gelu:
        # d/dh [h Φ(h)] = Φ(h) + h φ(h)  (exact, erf-based GELU)
        cdf = 0.5 * (1.0 + torch.erf(h * (1.0 / math.sqrt(2.0))))
        pdf = torch.exp(-0.5 * h * h) * (1.0 / math.sqrt(2.0 * math.pi))
        return cdf + h * pdf
    s = torch.sigmoid(h)
    return s * (1.0 + h * (1.0 - s))


@dataclass
class MemoryArchitectureConfig(Config):
    """Shape of the memory network of each head.

    ``depth=1`` is a linear memory (one ``head_dim × head_dim`` matrix, the delta-rule / linear
    attention state); ``depth>=2`` is an MLP with hidden width ``expansion * head_dim``.
    ``residual_norm`` makes the memory ``M(x) = x + LayerNorm(f(x))`` (TTT-style), which keeps
    the read-out well scaled while the weights drift.
    """

    depth: int = 2
    expansion: float = 2.0
    activation: ActivationName = ActivationName.gelu
    residual_norm: bool = False
    norm_eps: float = 1e-5

    def validate(self) -> None:
        if not isinstance(self.depth, int) or not 1 <= self.depth <= 4:
            raise ValueError(f"memory depth must be an integer in 1..4, got {self.depth!r}")
        if not self.expansion > 0:
            raise ValueError(f"memory expansion must be > 0, got {self.expansion!r}")
        try:
            ActivationName(self.activation)
        except ValueError:
            valid = ", ".join(a.value for a in ActivationName)
            raise ValueError(f"unknown memory activation {self.activation!r}; valid: {valid}") from None
        if not (self.norm_eps > 0 and math.isfinite(self.norm_eps)):
            raise ValueError(f"norm_eps must be finite and > 0, got {self.norm_eps!r}")

    def layer_shapes(self, head_dim: int) -> List[Tuple[int, int]]:
        """``(d_out, d_in)`` of each weight matrix."""
        self.validate()
        if self.depth == 1:
            return [(head_dim, head_dim)]
        hidden = max(1, int(round(self.expansion * head_dim)))
        dims = [head_dim] + [hidden] * (self.depth - 1) + [head_dim]
        return [(dims[i + 1], dims[i]) for i in range(self.depth)]

    def build(self, head_dim: int) -> "MemoryArchitecture":
        self.validate()
        return MemoryArchitecture(self, head_dim)


class MemoryArchitecture(nn.Module):
    """Stateless functional form of the memory network (weights are passed in)."""

    def __init__(self, config: MemoryArchitectureConfig, head_dim: int):
        super().__init__()
        self.config = config
        self.head_dim = head_dim
        self.activation = ActivationName(config.activation)
        self.shapes = config.layer_shapes(head_dim)

    @property
    def depth(self) -> int:
        return len(self.shapes)

    def init_weight_(self, w: torch.Tensor, layer: int, generator: torch.Generator | None = None) -> None:
        """Initial memory weights (the outer model learns them): scaled so activations stay O(1)."""
        d_out, d_in = self.shapes[layer]
        nn.init.normal_(w, mean=0.0, std=d_in**-0.5, generator=generator)

    # ------------------------------------------------------------------ forward / backward
    def forward(self, weights: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.forward_cached(weights, x)[0]

    def forward_cached(
        self, weights: Sequence[torch.Tensor], x: torch.Tensor
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Returns ``M(x)`` and what :meth:`backward` needs: the layer inputs and pre-activations."""
        cache: List[torch.Tensor] = []
        h = x
        for i, w in enumerate(weights):
            cache.append(h)  # input of layer i
            # shape: (..., n, d_out)
            h = torch.matmul(h, w.transpose(-1, -2))
            if i < len(weights) - 1:
                cache.append(h)  # pre-activation of layer i
                h = _activation(h, self.activation)
        if self.config.residual_norm:
            mu = h.mean(-1, keepdim=True)
            var = h.var(-1, keepdim=True, unbiased=False)
            rstd = torch.rsqrt(var + self.config.norm_eps)
            normed = (h - mu) * rstd
            cache.extend([normed, rstd])
            return x + normed, cache
        return h, cache

    def backward(
        self, weights: Sequence[torch.Tensor], cache: List[torch.Tensor], grad_out: torch.Tensor
    ) -> List[LayerFactors]:
        """Per-layer ``(delta, input)`` with ``∂ℓ_t/∂W_i = delta_t ⊗ input_t`` for every token t."""
        g = grad_out
        cache = list(cache)
        if self.config.residual_norm:
            rstd = cache.pop()
            normed = cache.pop()
            # LayerNorm (no affine) backward: dh = rstd * (g - mean(g) - normed * mean(g * normed))
            g = rstd * (
                g - g.mean(-1, keepdim=True) - normed * (g * normed).mean(-1, keepdim=True)
            )
        factors: List[LayerFactors] = []
        n = len(weights)
        for i in reversed(range(n)):
            if i < n - 1:
                pre = cache.pop()
                if self.activation == ActivationName.gelu:
                    # One fused (and twice-differentiable) kernel for g · GELU'(pre).
                    g = torch.ops.aten.gelu_backward(g, pre)
                else:
                    g = g * _activation_derivative(pre, self.activation)
            inp = cache.pop()
            factors.append((g, inp))
            if i > 0:
                g = torch.matmul(g, weights[i])
        factors.reverse()
        return factors
