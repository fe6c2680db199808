"""The input preparation's kernels (memory/triton_prepare.py) against the eager ``fusion._prepare``.

As in test_triton_linear.py: without a GPU the kernels run in Triton's interpreter, in a
subprocess (:func:`test_interpreted_suite`); the ``gpu`` tests run the compiled kernels.
"""

from __future__ import annotations

from typing import Dict, Optional

import pytest
import torch

triton = pytest.importorskip("triton")

from olmo_miras_plugin.memory import fusion, triton_prepare  # noqa: E402

from miras_test_utils import interpreter_harness, rel_err  # noqa: E402

INTERPRETED = triton_prepare._interpreted()
interpreted, test_interpreted_suite = interpreter_harness(__file__, INTERPRETED)


def make_inputs(b: int, t: int, heads: int, head_dim: int, n_gates: int, kernel: int, z_dtype, device, seed: int = 0,
                zero_rows: bool = False):
    g = torch.Generator().manual_seed(seed)
    n = 3 * heads * head_dim + n_gates * heads
    z = (torch.randn(b, t, n, generator=g) * 1.5).to(z_dtype)
    if zero_rows:  # q and k rows of norm ≈ 1e-14: the norm's clamp (‖u‖ < ε) holds there
        z[:, : t // 2, : 2 * heads * head_dim] *= 1e-14
    weight = context = None
    if kernel:
        weight = torch.randn(3 * heads * head_dim, kernel, generator=g) * 0.5
        context = torch.randn(b, kernel - 1, 3 * heads * head_dim, generator=g)
    return [x if x is None else x.to(device) for x in (z, weight, context)]


def run(fn, z, weight, context, ctx_grad: bool, seed: int = 1, **kw) -> Dict[str, Optional[torch.Tensor]]:
    """Outputs, and the inputs' gradients for a fixed random cotangent of every output."""
    z = z.detach().clone().requires_grad_()
    weight = None if weight is None else weight.detach().clone().requires_grad_()
    context = None if context is None else context.detach().clone().requires_grad_(ctx_grad)
    q, k, v, gates, new_context = fn(z, weight, context, **kw)
    outs = {"q": q, "k": k, "v": v, **{name: getattr(gates, name) for name in gates._fields}}
    if new_context is not None:
        outs["new_context"] = new_context
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=g).to(o.device)).sum() for o in outs.values())
    loss.backward()
    res = {name: o.detach() for name, o in outs.items()}
    res["dz"] = z.grad
    res["dweight"] = None if weight is None else weight.grad
    res["dcontext"] = None if context is None else context.grad
    return res


def assert_match(got: Dict, want: Dict, tol: float) -> None:
    assert got.keys() == want.keys()
    for name in want:
        a, b = got[name], want[name]
        if b is None:
            assert a is None, name
            continue
        assert a is not None, name
        assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape, a.dtype, b.dtype)
        if b.numel() == 0:
            continue
        if b.abs().max() == 0:
            assert a.abs().max() == 0, name
        else:
            assert rel_err(a, b) <= tol, f"{name}: {rel_err(a, b):.2e}"


CASES = [
    # b, t, heads, head_dim, n_gates, kernel, qk_norm, ctx_grad
    (1, 37, 2, 16, 3, 4, True, False),  # the titans layout; T not a multiple of the tile
    (2, 70, 3, 12, 3, 4, True, True),  # head_dim not a power of two; the carried context's gradient
    (1, 2, 2, 16, 3, 4, True, True),  # T < K − 1: the new context keeps old context rows
    (2, 40, 2, 16, 2, 0, False, False),  # no conv, no η, no norm
    (1, 33, 2, 16, 3, 2, False, True),
    (1, 20, 2, 16, 3, 1, True, False),  # a one-tap conv: an empty context
]


@interpreted
@pytest.mark.parametrize("b,t,heads,head_dim,n_gates,kernel,qk_norm,ctx_grad", CASES)
@pytest.mark.parametrize("z_dtype", [torch.float32, torch.bfloat16])
def test_kernels_match_eager(b, t, heads, head_dim, n_gates, kernel, qk_norm, ctx_grad, z_dtype):
    z, weight, context = make_inputs(b, t, heads, head_dim, n_gates, kernel, z_dtype, "cpu", zero_rows=qk_norm)
    kw = dict(n_heads=heads, head_dim=head_dim, qk_norm=qk_norm, theta_max=0.3, eta_max=0.9, dtype=torch.float32)
    got = run(triton_prepare.prepare, z, weight, context, ctx_grad, **kw)
    want = run(fusion._prepare, z, weight, context, ctx_grad, **kw)
    # dz in z's dtype: bf16 rounds once at the end (eager rounds the same float32 sums)
    assert_match(got, want, 1e-5 if z_dtype == torch.float32 else 8e-3)


@interpreted
def test_tile_knob(monkeypatch):
    z, weight, context = make_inputs(1, 50, 2, 16, 3, 4, torch.float32, "cpu", seed=3)
    kw = dict(n_heads=2, head_dim=16, qk_norm=True, theta_max=0.3, eta_max=1.0, dtype=torch.float32)
    want = run(fusion._prepare, z, weight, context, True, **kw)
    monkeypatch.setenv(triton_prepare.ROWS_ENV, "16")
    assert_match(run(triton_prepare.prepare, z, weight, context, True, **kw), want, 1e-5)
    monkeypatch.setenv(triton_prepare.ROWS_ENV, "24")
    with pytest.raises(ValueError, match="power of two >= 16, got '24'"):
        run(triton_prepare.prepare, z, weight, context, True, **kw)


@interpreted
def test_refuses_what_it_cannot_run():
    z, weight, context = make_inputs(1, 8, 2, 16, 3, 4, torch.float32, "cpu")
    kw = dict(n_heads=2, head_dim=16, qk_norm=True, theta_max=0.3)
    with pytest.raises(ValueError, match="inner dtype is torch.float64"):
        triton_prepare.prepare(z.double(), weight, context, dtype=torch.float64, **kw)
    with pytest.raises(ValueError, match=r"expected 3·2·16 \+ \(2 or 3\)·2"):
        triton_prepare.prepare(z[..., :-1], weight, context, dtype=torch.float32, **kw)


# ---------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("b,t,heads,head_dim,n_gates,kernel,qk_norm,ctx_grad", CASES + [(1, 4096, 16, 128, 3, 4, True, False)])
def test_gpu_kernels_match_eager(b, t, heads, head_dim, n_gates, kernel, qk_norm, ctx_grad):
    z, weight, context = make_inputs(b, t, heads, head_dim, n_gates, kernel, torch.bfloat16, "cuda", zero_rows=qk_norm)
    kw = dict(n_heads=heads, head_dim=head_dim, qk_norm=qk_norm, theta_max=0.3, eta_max=0.9, dtype=torch.float32)
    got = run(triton_prepare.prepare, z, weight, context, ctx_grad, **kw)
    want = run(fusion._prepare, z, weight, context, ctx_grad, **kw)
    assert_match(got, want, 8e-3)


@pytest.mark.skipif(INTERPRETED, reason="no kernels here")
def test_prepare_backend_knob(monkeypatch):
    monkeypatch.setenv(fusion.PREPARE_ENV, "inductor")
    with pytest.raises(ValueError, match="OLMO_MIRAS_PREPARE must be one of triton, compiled, got 'inductor'"):
        fusion._prepare_backend()
    monkeypatch.setenv(fusion.PREPARE_ENV, "compiled")
    assert fusion._prepare_backend() == "compiled"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("preset", ["titans", "memora"])
def test_gpu_layer_same_with_either_prepare(monkeypatch, preset):
    """The whole layer under bf16 autocast, two pieces with the state (and conv context) carried
    with gradient: the kernels and the compiled path give the same outputs and gradients."""
    from olmo_miras_plugin.memory import NeuralMemoryConfig

    torch.manual_seed(0)
    m = NeuralMemoryConfig.from_preset(preset, d_model=256, n_heads=2, chunk_size=16).build(init_device="cuda")
    x = torch.randn(2, 100, 256, device="cuda")

    def run_layer():
        m.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y1, state = m(xx[:, :37])
            y2, _ = m(xx[:, 37:], state)
        y = torch.cat([y1, y2], 1).float()
        (y * torch.linspace(-1, 1, y.numel(), device="cuda").view_as(y)).sum().backward()
        return {"y": y.detach(), "x": xx.grad, **{n: p.grad for n, p in m.named_parameters() if p.grad is not None}}

    calls = []
    kernels = triton_prepare.run
    monkeypatch.setattr(triton_prepare, "run", lambda *a, **kw: calls.append(1) or kernels(*a, **kw))
    monkeypatch.setenv(fusion.PREPARE_ENV, "triton")
    got = run_layer()
    assert len(calls) == 2  # both pieces went through the kernels
    monkeypatch.setenv(fusion.PREPARE_ENV, "compiled")
    want = run_layer()
    assert len(calls) == 2
    assert got.keys() == want.keys()
    for name in want:
        assert rel_err(got[name], want[name]) <= 2e-2, f"{name}: {rel_err(got[name], want[name]):.2e}"
