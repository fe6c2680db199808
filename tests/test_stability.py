"""The presets' inner step size keeps the *outer* gradients bounded over long sequences.

A chunk's update sums its tokens' gradients at the same weights; when a chunk's keys point the
same way (real hidden states share a large common direction), too large an inner learning rate
makes the chunk-to-chunk map expanding, and the gradients of the gates and projections grow
exponentially with the sequence length while the forward stays finite. OLMo2-1B + MAL at 8k
tokens trained into NaN that way with the earlier titans step size (docs/memory.md, "Inner step
size"). Here: one layer at OLMo2's per-head geometry (128-wide heads, hidden 256, chunk 64) on
2,048 unit-RMS inputs with a shared direction, float32 autograd through the chunked scan.
"""

from __future__ import annotations

import math
from typing import Optional

import pytest
import torch

from olmo_miras_plugin.memory import NeuralMemoryConfig

D_MODEL, T = 512, 2048  # 4 heads × 128


def aligned_inputs(seed: int, shared: float = 3.0, t: int = T) -> torch.Tensor:
    """``(1, t, D_MODEL)`` unit-RMS tokens ``noise + shared · μ`` (cosine ≈ 0.9 between tokens)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, t, D_MODEL, generator=g) + shared * torch.randn(1, 1, D_MODEL, generator=g)
    return x / x.pow(2).mean(-1, keepdim=True).sqrt()


def gradient_ratio(preset: str, seed: int, eta_bias: Optional[float] = None, t: int = T, **overrides: float) -> float:
    """Largest gradient norm among the gate and q/k/v projections over the output projection's
    (``eta_bias``: the momentum gate's bias set to it, e.g. to saturate η)."""
    torch.manual_seed(seed)
    layer = NeuralMemoryConfig.from_preset(preset, d_model=D_MODEL, check_finite=False, **overrides).build()
    torch.nn.init.normal_(layer.w_out.weight, std=0.02)  # zero at init: no gradient would reach the memory
    if eta_bias is not None:
        with torch.no_grad():
            layer.w_eta.bias.fill_(eta_bias)
    x = aligned_inputs(seed, t=t)
    probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1))
    y, _ = layer(x)
    (y * probe).sum().div(math.sqrt(y.numel())).backward()
    inner = [layer.w_theta, layer.w_alpha, layer.w_k, layer.w_v] + ([layer.w_eta] if layer.w_eta is not None else [])
    return max(w.weight.grad.norm().item() for w in inner) / layer.w_out.weight.grad.norm().item()


@pytest.mark.parametrize("preset", ["titans", "yaad", "moneta", "memora"])
@pytest.mark.parametrize("seed", [0, 1])
def test_preset_outer_gradients_stay_bounded_on_aligned_inputs(preset: str, seed: int):
    ratio = gradient_ratio(preset, seed)
    assert math.isfinite(ratio) and ratio < 10, f"{preset}: inner-weight gradients {ratio:.3g}× the output's"


def test_larger_inner_step_explodes_the_outer_gradients():
    """The titans preset's revision-1 values (θ_init 0.01, θ_max 0.1, η uncapped from 0.9) on the
    same inputs: what the bound above guards against (and that the probe can see it)."""
    ratio = gradient_ratio("titans", 0, theta_init=0.01, theta_max=0.1, eta_init=0.9, eta_max=1.0)
    assert not ratio < 1e3, f"expected exploding gradients, got a ratio of {ratio:.3g}"


def test_saturated_momentum_explodes_and_eta_max_bounds_it():
    """On OLMo2 hidden states the outer optimiser drove the momentum gate to η = 1.0 (float32) for
    some tokens within 5 steps at 8k, making θ/(1 − η) unbounded (docs/memory.md). Here the η
    gate's bias is set to saturate it, θ near its cap, 8,192 tokens: without a cap the outer
    gradients explode; a cap of 0.95 (θ/(1 − η) ≤ 0.04) or the preset's 0.9 (≤ 0.02) keeps them at
    the output's scale."""
    kw = dict(eta_bias=20.0, t=8192, theta_init=1.9e-3)
    uncapped = gradient_ratio("titans", 0, eta_init=0.9, eta_max=1.0, **kw)  # revision 2's momentum
    assert not uncapped < 1e6, f"expected exploding gradients, got a ratio of {uncapped:.3g}"
    for cap in (0.95, None):  # None: the preset's
        capped = gradient_ratio("titans", 0, **kw, **({} if cap is None else dict(eta_max=cap)))
        assert math.isfinite(capped) and capped < 10, f"with eta_max={cap or 0.9}: {capped:.3g}"
