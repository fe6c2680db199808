"""MomentumGD.chunk_coefficients vs independent float64 references: values, gradients, finiteness.

The main reference runs the per-token recurrence itself on coefficient vectors (no closed form):
    S_t = η_t S_{t−1} − θ_t G_t,    A_t = κ_t A_{t−1} + valid_t S_t       (momentum)
    A_t = κ_t A_{t−1} − θ_t G_t                                        (no momentum)
tracking, for A and S, the coefficient of each of A_0, S_0, G_1..G_C. A second reference is the
(C, C) pairwise closed form the optimiser used before its O(C) logcumsumexp form.
"""

from __future__ import annotations

import zlib
from typing import List, Optional, Tuple

import pytest
import torch

from olmo_miras_plugin.memory.optimizer import ChunkCoefficients, MomentumGD

FIELDS = ChunkCoefficients._fields


def recurrence_reference(theta, log_eta, log_keep, valid, momentum: bool) -> ChunkCoefficients:
    """Coefficients by running the recurrence; float64, differentiable, O(C²) memory."""
    *lead, c = theta.shape
    theta, log_eta, log_keep, valid = (t.double() for t in (theta, log_eta, log_keep, valid))
    eta, keep = log_eta.exp(), log_keep.exp()
    # Coefficient vectors over [A_0, S_0, G_1, ..., G_C].
    basis = torch.eye(c + 2, dtype=torch.float64)
    a = basis[0].expand(*lead, c + 2)
    s = basis[1].expand(*lead, c + 2)
    for t in range(c):
        g = basis[2 + t]
        if momentum:
            s = eta[..., t, None] * s - theta[..., t, None] * g
            a = keep[..., t, None] * a + valid[..., t, None] * s
        else:
            a = keep[..., t, None] * a - theta[..., t, None] * g
    if not momentum:
        return ChunkCoefficients(a[..., 0], None, None, -a[..., 2:], None)
    return ChunkCoefficients(a[..., 0], a[..., 1], s[..., 1], -a[..., 2:], -s[..., 2:])


def pairwise_reference(theta, log_eta, log_keep, valid) -> ChunkCoefficients:
    """The previous (…, N, C, C) closed form, in float64 (momentum only)."""
    theta, log_eta, log_keep, valid = (t.double() for t in (theta, log_eta, log_keep, valid))
    c = theta.shape[-1]
    lk, le = log_keep.cumsum(-1), log_eta.cumsum(-1)
    lk_end, le_end = lk[..., -1:], le[..., -1:]
    expo = (lk_end - lk + le).unsqueeze(-2) - le.unsqueeze(-1)
    upper = torch.ones(c, c, dtype=torch.bool).triu()
    pair = expo.masked_fill(~upper, float("-inf")).exp() * valid.unsqueeze(-2)
    return ChunkCoefficients(
        lk_end.squeeze(-1).exp(),
        ((lk_end - lk + le).exp() * valid).sum(-1),
        le_end.squeeze(-1).exp(),
        pair.sum(-1) * theta,
        (le_end - le).exp() * theta,
    )


def make_gates(
    lead: Tuple[int, ...], c: int, regime: str, pad: bool, seed: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random float64 gates ``(..., C)``; padding as the code pads (θ = 0, η = 1, α = 0, valid = 0)."""
    g = torch.Generator().manual_seed(seed)
    shape = (*lead, c)

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(shape, generator=g, dtype=torch.float64)

    theta = u(0.0, 1.0)
    if regime == "moderate":
        log_eta, log_keep = u(-2.0, 0.0), u(-2.0, 0.0)
    elif regime == "near_zero":
        log_eta, log_keep = u(-1e-4, 0.0), u(-1e-4, 0.0)
    elif regime == "extreme":
        log_eta, log_keep = u(-30.0, 0.0), u(-30.0, 0.0)
    elif regime == "mixed":
        # Per token either extreme or ~0: Lη_s is huge while Lη_r − Lη_s ≈ 0 for many r ≥ s,
        # the case where factoring out e^{−Lη_s} would overflow.
        def mix() -> torch.Tensor:
            pick = torch.rand(shape, generator=g, dtype=torch.float64) < 0.3
            return torch.where(pick, u(-30.0, -10.0), u(-1e-3, 0.0))

        log_eta, log_keep = mix(), mix()
    else:
        raise ValueError(regime)
    valid = torch.ones(shape, dtype=torch.float64)
    if pad:
        # A random padded tail per chunk: none, partial, or the whole chunk.
        n_pad = torch.randint(0, c + 1, lead, generator=g)
        n_pad.view(-1)[0] = c  # at least one fully padded chunk
        if n_pad.numel() > 1:
            n_pad.view(-1)[1] = 0  # and one with no padding
        is_pad = torch.arange(c) >= (c - n_pad).unsqueeze(-1)
        valid = valid.masked_fill(is_pad, 0.0)
        theta = theta.masked_fill(is_pad, 0.0)
        log_eta = log_eta.masked_fill(is_pad, 0.0)
        log_keep = log_keep.masked_fill(is_pad, 0.0)
    return theta, log_eta, log_keep, valid


def outputs_and_grads(
    fn, theta, log_eta, log_keep, valid, dtype: torch.dtype, seed: int
) -> Tuple[List[Optional[torch.Tensor]], List[torch.Tensor]]:
    """Coefficients (as float64) and grads of a fixed random linear functional w.r.t. the gates."""
    inputs = [t.to(dtype).requires_grad_(True) for t in (theta, log_eta, log_keep)]
    coef = fn(*inputs, valid.to(dtype))
    g = torch.Generator().manual_seed(seed + 1000)
    loss = torch.zeros((), dtype=torch.float64)
    for out in coef:
        if out is not None:
            w = torch.randn(out.shape, generator=g, dtype=torch.float64)
            loss = loss + (out.double() * w).sum()
    # no momentum: log η is unused, its gradient is zero
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]
    return [None if o is None else o.detach().double() for o in coef], [x.double() for x in grads]


def assert_close(name: str, got: torch.Tensor, ref: torch.Tensor, rtol: float, atol: float) -> None:
    """|got − ref| ≤ rtol·|ref| + atol·max(1, max|ref|) elementwise, and got finite.

    The coefficients (θ ≤ 1) and the gradients of an N(0, 1) functional are O(1) quantities; a
    gradient that is tiny because O(1) terms cancel is only known to O(1)·eps, so the absolute
    tolerance is on that scale (a value that underflows in float32 is then also fine as 0).
    """
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    assert torch.isfinite(ref).all(), f"{name}: non-finite reference"
    scale = ref.abs().max().clamp_min(1.0)
    err = (got - ref).abs()
    bound = rtol * ref.abs() + atol * scale
    worst = (err - bound).argmax()
    assert (err <= bound).all(), (
        f"{name}: err {err.view(-1)[worst]:.3e} at {worst.item()} (ref {ref.view(-1)[worst]:.3e}, "
        f"max rel {(err / ref.abs().clamp_min(1e-300)).max():.3e}, max|ref| {scale:.3e})"
    )


# (rtol, atol): float32 suffers the cancellation Lη_r − Lη_s of cumsums up to ~30·C in size
# (ulp(1920) ≈ 1.2e-4 in the exponent), as the pairwise form did. At C = 64 with extreme gates
# values and d/dθ reach ~2e-5 in both forms; d/dlog η reaches ~1.2e-4 here (logcumsumexp's
# backward works with R_s of size |Lη|) against ~4e-5 for the pairwise form.
TOL = {torch.float64: (1e-9, 1e-11), torch.float32: (1e-4, 3e-4)}

SHAPES = [(2, 3, 5), (2, 3, 1), (1, 1, 1)]
CHUNKS = [1, 4, 64]
REGIMES = ["moderate", "near_zero", "extreme", "mixed"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("pad", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("c", CHUNKS)
@pytest.mark.parametrize("momentum", [True, False], ids=["momentum", "gd"])
def test_chunk_coefficients_match_recurrence(momentum, c, regime, pad, dtype):
    opt = MomentumGD(use_momentum=momentum)
    rtol, atol = TOL[dtype]
    for i, lead in enumerate(SHAPES):
        seed = zlib.crc32(f"{c}/{regime}/{pad}/{i}".encode())
        gates = make_gates(lead, c, regime, pad, seed)
        got, got_grads = outputs_and_grads(opt.chunk_coefficients, *gates, dtype=dtype, seed=seed)
        ref, ref_grads = outputs_and_grads(
            lambda *a: recurrence_reference(*a, momentum=momentum), *gates, dtype=torch.float64, seed=seed
        )
        for name, o, r in zip(FIELDS, got, ref):
            assert (o is None) == (r is None), name
            if o is not None:
                assert o.shape == r.shape, name
                assert_close(f"{lead} {name}", o, r, rtol, atol)
        for name, gg, rg in zip(("theta", "log_eta", "log_keep"), got_grads, ref_grads):
            assert_close(f"{lead} d/d{name}", gg, rg, rtol, atol)


@pytest.mark.parametrize("pad", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("c", CHUNKS)
def test_momentum_matches_pairwise_closed_form(c, regime, pad):
    """float64: the O(C) logcumsumexp form equals the previous (C, C) pairwise form."""
    gates = make_gates((2, 3, 5), c, regime, pad, seed=7)
    got, got_grads = outputs_and_grads(MomentumGD().chunk_coefficients, *gates, dtype=torch.float64, seed=7)
    ref, ref_grads = outputs_and_grads(pairwise_reference, *gates, dtype=torch.float64, seed=7)
    for name, o, r in [*zip(FIELDS, got, ref), *zip(("dtheta", "dlog_eta", "dlog_keep"), got_grads, ref_grads)]:
        assert_close(name, o, r, 1e-10, 1e-11)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
def test_invalid_suffix_gives_exact_zero_and_finite_grads(dtype):
    """valid = 0 on a suffix (even with θ ≠ 0 there): weight exactly 0, no NaN/Inf forward or back."""
    c = 8
    theta = torch.rand(3, c, dtype=torch.float64) + 0.1
    log_eta = -30 * torch.rand(3, c, dtype=torch.float64)
    log_keep = -30 * torch.rand(3, c, dtype=torch.float64)
    valid = torch.ones(3, c, dtype=torch.float64)
    valid[0, 5:] = 0  # invalid tail
    valid[1] = 0  # all invalid
    valid[2, 2:4] = 0  # invalid in the middle (a later valid token remains)
    inputs = [t.to(dtype).requires_grad_(True) for t in (theta, log_eta, log_keep)]
    coef = MomentumGD().chunk_coefficients(*inputs, valid.to(dtype))
    w = coef.accum_token_weight
    assert torch.isfinite(w).all()
    assert (w[0, 5:] == 0).all() and (w[1] == 0).all()
    assert (coef.accum_from_momentum[1] == 0).all()
    loss = sum((o.float() * torch.randn(o.shape)).sum() for o in coef if o is not None)
    for g in torch.autograd.grad(loss, inputs):
        assert torch.isfinite(g).all()
    if dtype != torch.bfloat16:
        ref = recurrence_reference(theta, log_eta, log_keep, valid, momentum=True)
        assert_close("accum_token_weight", w.double(), ref.accum_token_weight, *TOL[dtype])


def test_fractional_valid_matches_reference():
    """``valid`` is a weight on the ``A += S`` term; non-0/1 values are handled exactly."""
    gates = list(make_gates((2, 3, 5), 16, "moderate", False, seed=3))
    gates[3] = torch.rand(gates[3].shape, dtype=torch.float64) * 2
    gates[3][..., -3:] = 0
    got, got_grads = outputs_and_grads(MomentumGD().chunk_coefficients, *gates, dtype=torch.float64, seed=3)
    ref, ref_grads = outputs_and_grads(
        lambda *a: recurrence_reference(*a, momentum=True), *gates, dtype=torch.float64, seed=3
    )
    for name, o, r in [*zip(FIELDS, got, ref), *zip(("dtheta", "dlog_eta", "dlog_keep"), got_grads, ref_grads)]:
        assert_close(name, o, r, 1e-9, 1e-12)


def test_expanded_valid_and_large_chunk_finite():
    """The call sites pass ``torch.ones(1).expand(...)``; a 256-token chunk of extreme gates stays finite."""
    b, h, n, c = 1, 2, 3, 256
    g = torch.Generator().manual_seed(0)
    theta = torch.rand(b, h, n, c, generator=g).requires_grad_(True)
    log_eta = (-30 * torch.rand(b, h, n, c, generator=g)).requires_grad_(True)
    log_keep = (-30 * torch.rand(b, h, n, c, generator=g)).requires_grad_(True)
    valid = torch.ones(1).expand(b, h, n, c)
    coef = MomentumGD().chunk_coefficients(theta, log_eta, log_keep, valid)
    for o in coef:
        assert torch.isfinite(o).all()
    # every term's exponent is ≤ 0 and θ ≤ 1, so each weight is ≤ C
    assert (coef.accum_token_weight <= c).all()
    loss = sum(o.sum() for o in coef)
    for gr in torch.autograd.grad(loss, (theta, log_eta, log_keep)):
        assert torch.isfinite(gr).all()
