"""``impl="triton"`` (memory/triton_linear.py) against the PyTorch chunked scan.

Without a GPU the kernels run in Triton's interpreter. Triton reads ``TRITON_INTERPRET`` when it
is first imported (its own library functions are built then), and setting it for a whole test
session would also turn every other Triton kernel (inductor's, on a GPU machine) into the
interpreter. So :func:`test_interpreted_suite` reruns this file in a subprocess with
``TRITON_INTERPRET=1``, where the ``interpreted`` tests run; in the main session they are skipped.
The ``gpu`` tests at the end run the compiled kernels where CUDA is present. Everything is
skipped where triton is not installed.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from olmo_miras_plugin.memory import (  # noqa: E402
    MemoryArchitectureConfig,
    MemoryImpl,
    MemoryOptimizerConfig,
    NeuralMemoryConfig,
)
from olmo_miras_plugin.memory import triton_linear, triton_scan  # noqa: E402
from olmo_miras_plugin.memory.scan import Gates, ScanState, chunked_scan  # noqa: E402

from miras_test_utils import interpreter_harness, rel_err  # noqa: E402

INTERPRETED = triton_linear._interpreted()
interpreted, test_interpreted_suite = interpreter_harness(__file__, INTERPRETED)


# ---------------------------------------------------------------------------------------- helpers
def linear_titans(head_dim: int, chunk: int, max_grad_norm, n_heads: int = 2):
    cfg = NeuralMemoryConfig.from_preset(
        "titans",
        d_model=head_dim * n_heads,
        n_heads=n_heads,
        chunk_size=chunk,
        architecture=MemoryArchitectureConfig(depth=1),
        optimizer=MemoryOptimizerConfig(max_grad_norm=max_grad_norm),
    )
    return cfg.build().rule


def make_inputs(b: int, h: int, t: int, d: int, seed: int = 0):
    """Leaf tensors: normalised k, q (as the layer makes them), v, gate pre-activations, a
    nonzero initial accumulator and momentum."""
    g = torch.Generator().manual_seed(seed)
    k = F.normalize(torch.randn(b, h, t, d, generator=g), dim=-1)
    q = F.normalize(torch.randn(b, h, t, d, generator=g), dim=-1)
    v = torch.randn(b, h, t, d, generator=g)
    z = torch.randn(3, b, h, t, generator=g)
    a0 = torch.randn(b, h, d, d, generator=g) * d**-0.5
    s0 = torch.randn(b, h, d, d, generator=g) * 0.1
    return [x.requires_grad_() for x in (k, v, q, z[0].clone(), z[1].clone(), z[2].clone(), a0, s0)]


def gates_of(zt, ze, za) -> Gates:
    theta = 0.5 * torch.sigmoid(zt)
    ze, za = ze + 2.0, za - 3.0  # η around 0.9, α around 0.05
    return Gates(theta, torch.sigmoid(ze), torch.sigmoid(za), F.logsigmoid(ze), F.logsigmoid(-za))


def run(fn, rule, inputs, chunk, segments=None, separate_read=False):
    """Outputs, final state and the gradients of a random projection of both w.r.t. every input.
    ``segments``: split the sequence into pieces of these lengths, carrying the state."""
    k, v, q, zt, ze, za, a0, s0 = inputs
    gates = gates_of(zt, ze, za)
    accum, mom = a0 * 1.0, s0 * 1.0
    read = accum * 1.0 if separate_read else accum
    state = ScanState([accum], [mom], [read], 0)
    t = k.shape[2]
    segments = segments or [t]
    assert sum(segments) == t
    outs, start = [], 0
    for n in segments:
        sl = slice(start, start + n)
        y, state = fn(rule, state, k[:, :, sl], v[:, :, sl], q[:, :, sl], Gates(*(g[:, :, sl] for g in gates)), chunk)
        outs.append(y)
        start += n
    y = torch.cat(outs, dim=2)
    results = [y, state.accum[0], state.momentum[0], state.read_weights[0]]
    g = torch.Generator().manual_seed(1)
    loss = sum((r * torch.randn(r.shape, generator=g).to(r.device)).sum() for r in results)
    grads = torch.autograd.grad(loss, inputs)
    return results, grads, state.position


def assert_close(got, want, tol=1e-4):
    (res_g, grads_g, pos_g), (res_w, grads_w, pos_w) = got, want
    assert pos_g == pos_w
    names = ["y", "accum", "momentum", "read"]
    for name, a, b in zip(names, res_g, res_w):
        assert rel_err(a, b) <= tol, f"{name}: {rel_err(a, b):.2e}"
    names = ["k", "v", "q", "theta", "eta", "alpha", "accum0", "momentum0"]
    for name, a, b in zip(names, grads_g, grads_w):
        assert rel_err(a, b) <= tol, f"grad {name}: {rel_err(a, b):.2e}"


# ---------------------------------------------------------------------------------------- kernel = chunked
@interpreted
@pytest.mark.parametrize(
    "head_dim,chunk,tau",
    [
        (16, 4, 1.0),  # the titans default clip
        (32, 8, 1.0),
        (32, 4, 0.05),  # clipping on almost every token
        (16, 8, None),  # no clipping
        (16, 4, 100.0),  # clipping never active
        (24, 8, 0.3),  # head_dim padded to 32 inside the kernel
        (64, 8, 0.3),  # the backward visits the state's rows in two blocks, with the clip
    ],
)
def test_kernel_matches_chunked(head_dim: int, chunk: int, tau):
    rule = linear_titans(head_dim, chunk, tau)
    inputs = make_inputs(2, 2, 4 * chunk, head_dim)
    want = run(chunked_scan, rule, inputs, chunk)
    got = run(triton_linear.linear_scan, rule, inputs, chunk)
    assert_close(got, want)


@interpreted
@pytest.mark.parametrize("head_dim,block_rows", [(32, 16), (40, 16), (64, 32)])
def test_row_split_kernel_matches_chunked(monkeypatch, head_dim: int, block_rows: int):
    """Without the clip, each program owns ``block_rows`` rows of the state (40: the last row
    block is partly padding); outputs, state and every gradient equal the chunked scan."""
    monkeypatch.setenv("OLMO_MIRAS_TRITON_BLOCK_ROWS", str(block_rows))
    rule = linear_titans(head_dim, 8, None)
    inputs = make_inputs(2, 2, 32, head_dim)
    want = run(chunked_scan, rule, inputs, 8)
    got = run(triton_linear.linear_scan, rule, inputs, 8)
    assert_close(got, want)


def test_block_rows_choice(monkeypatch):
    """The clip couples all rows of a token's error: whole rows then, whatever is asked for."""
    cpu = torch.device("cpu")
    monkeypatch.setenv("OLMO_MIRAS_TRITON_BLOCK_ROWS", "16")
    assert triton_linear._block_rows(128, 16, cpu, clip=True) == 128
    assert triton_linear._block_rows(128, 16, cpu, clip=False) == 16
    monkeypatch.setenv("OLMO_MIRAS_TRITON_BLOCK_ROWS", "24")
    with pytest.raises(ValueError, match="power of two in 16..128, got '24'"):
        triton_linear._block_rows(128, 16, cpu, clip=False)
    monkeypatch.setenv("OLMO_MIRAS_TRITON_BLOCK_ROWS", "sixteen")
    with pytest.raises(ValueError, match="got 'sixteen'"):
        triton_linear._block_rows(128, 16, cpu, clip=False)
    monkeypatch.setenv("OLMO_MIRAS_TRITON_PAR_ROWS", "256")
    with pytest.raises(ValueError, match="OLMO_MIRAS_TRITON_PAR_ROWS must be a power of two in 16..128, got '256'"):
        triton_linear._env_rows("OLMO_MIRAS_TRITON_PAR_ROWS", 16, 128)
    monkeypatch.delenv("OLMO_MIRAS_TRITON_BLOCK_ROWS")
    assert triton_linear._block_rows(128, 16, cpu, clip=False) == 128  # one "SM": no split


@interpreted
def test_clip_cases_are_what_they_claim():
    """The parametrisation above covers active and inactive clipping (checked on the oracle)."""
    inputs = make_inputs(2, 2, 32, 32)
    y = {tau: run(chunked_scan, linear_titans(32, 8, tau), inputs, 8)[0][0] for tau in (None, 0.05, 1.0, 100.0)}
    assert rel_err(y[0.05], y[None]) > 1e-2
    assert rel_err(y[1.0], y[None]) > 1e-4
    assert rel_err(y[100.0], y[None]) < 1e-7


@interpreted
def test_no_grad_forward():
    rule = linear_titans(16, 4, 1.0)
    inputs = make_inputs(2, 2, 16, 16)
    k, v, q, zt, ze, za, a0, s0 = (x.detach() for x in inputs)
    with torch.no_grad():
        state = ScanState([a0], [s0], [a0], 0)
        y_w, s_w = chunked_scan(rule, state, k, v, q, gates_of(zt, ze, za), 4)
        y_g, s_g = triton_linear.linear_scan(rule, state, k, v, q, gates_of(zt, ze, za), 4)
    assert rel_err(y_g, y_w) <= 1e-5
    assert rel_err(s_g.accum[0], s_w.accum[0]) <= 1e-5
    assert rel_err(s_g.momentum[0], s_w.momentum[0]) <= 1e-5
    assert s_g.read_weights[0] is s_g.accum[0]


# ---------------------------------------------------------------------------------------- dispatcher
@interpreted
def test_segments_with_partial_chunks():
    """``scan`` cuts pieces that start/end inside a chunk: PyTorch for the partial chunks, the
    kernel for the whole ones; the state (and its gradient) carries across segments."""
    rule = linear_titans(16, 8, 1.0)
    inputs = make_inputs(2, 2, 45, 16)
    want = run(chunked_scan, rule, inputs, 8)
    got = run(triton_scan.scan, rule, inputs, 8, segments=[5, 19, 3, 18])
    assert_close(got, want)


@interpreted
def test_separate_read_weights():
    """A state whose read weights are a different tensor from the accumulator (equal values, own
    gradient) gets its first chunk from PyTorch, then the kernel; ``linear_scan`` refuses it."""
    rule = linear_titans(16, 4, 1.0)
    inputs = make_inputs(2, 2, 16, 16)
    want = run(chunked_scan, rule, inputs, 4, separate_read=True)
    got = run(triton_scan.scan, rule, inputs, 4, separate_read=True)
    assert_close(got, want)
    with pytest.raises(ValueError, match="read_weights"):
        run(triton_linear.linear_scan, rule, inputs, 4, separate_read=True)


@interpreted
def test_linear_scan_refuses_partial_chunks():
    rule = linear_titans(16, 4, 1.0)
    inputs = make_inputs(1, 2, 10, 16)
    with pytest.raises(ValueError, match="whole chunks"):
        run(triton_linear.linear_scan, rule, inputs, 4)
    k, v, q, zt, ze, za, a0, s0 = (x.detach() for x in inputs)
    k, v, q = k[:, :, :8], v[:, :, :8], q[:, :, :8]
    gates = Gates(*(g[:, :, :8] for g in gates_of(zt, ze, za)))
    with pytest.raises(ValueError, match="chunk boundary"):
        triton_linear.linear_scan(rule, ScanState([a0], [s0], [a0], 2), k, v, q, gates, 4)


def _rule(**kw):
    kw.setdefault("architecture", MemoryArchitectureConfig(depth=1))
    preset = kw.pop("preset", "titans")
    return NeuralMemoryConfig.from_preset(preset, d_model=32, n_heads=2, **kw).build().rule


@pytest.mark.parametrize(
    "kw,dtype,chunk,match",
    [
        (dict(architecture=MemoryArchitectureConfig(depth=2)), torch.float32, 4, "linear memory"),
        (dict(preset="moneta"), torch.float32, 4, "l2 attentional bias"),
        (dict(preset="memora"), torch.float32, 4, "decay retention"),
        (dict(optimizer=MemoryOptimizerConfig(name="gd")), torch.float32, 4, "momentum"),
        ({}, torch.float64, 4, "float32"),
        ({}, torch.float32, 6, "power-of-two chunk"),
    ],
)
@interpreted
def test_fallback_reasons(kw, dtype, chunk, match):
    rule = _rule(**kw)
    d = 16
    k = torch.zeros(1, 2, 8, d, dtype=dtype)
    a = torch.zeros(1, 2, d, d, dtype=dtype)
    mom = None if match == "momentum" else [a]
    state = ScanState([a], mom, [a], 0)
    reason = triton_linear.unsupported_reason(rule, state, k, chunk)
    assert reason is not None and match in reason
    assert not triton_linear.supports(rule, state, k, chunk)
    assert triton_linear.supports(_rule(), ScanState([a.float()], [a.float()], [a.float()], 0), k.float(), 4)


@pytest.mark.skipif(INTERPRETED, reason="the interpreter runs CPU tensors")
def test_cpu_needs_interpreter():
    rule, d = _rule(), 16
    a = torch.zeros(1, 2, d, d)
    reason = triton_linear.unsupported_reason(rule, ScanState([a], [a], [a], 0), torch.zeros(1, 2, 8, d), 4)
    assert reason is not None and "CUDA" in reason


@interpreted
@pytest.mark.parametrize("kernel_impl", ["triton", "triton_graphed"])
@pytest.mark.parametrize("depth,max_grad_norm", [(1, 1.0), (2, 1.0)])
def test_layer_impl_triton(monkeypatch, depth: int, max_grad_norm, kernel_impl: str):
    """``NeuralMemoryConfig(impl="triton")``: the linear titans layer equals ``chunked`` (outputs,
    carried state, parameter gradients); a depth-2 memory falls back to ``chunked``. (Off CUDA,
    ``triton_graphed`` runs the same kernels without graphs.)"""

    def build(impl: str):
        torch.manual_seed(0)
        cfg = NeuralMemoryConfig.from_preset(
            "titans", d_model=32, n_heads=2, chunk_size=8, impl=impl,
            architecture=MemoryArchitectureConfig(depth=depth),
            optimizer=MemoryOptimizerConfig(max_grad_norm=max_grad_norm),
        )
        m = cfg.build()
        with torch.no_grad():
            for w in (m.w_q, m.w_k, m.w_v):
                w.weight.normal_(std=0.3)
        return m

    calls = []
    kernel = triton_linear.linear_scan
    monkeypatch.setattr(triton_linear, "linear_scan", lambda *a: calls.append(a[4].shape[2]) or kernel(*a))
    x = torch.randn(2, 29, 32, generator=torch.Generator().manual_seed(3))
    results = {}
    for impl in ("chunked", kernel_impl):
        m = build(impl)
        assert m.impl == MemoryImpl(impl)
        y1, st = m(x[:, :13])
        y2, st = m(x[:, 13:], st)
        y = torch.cat([y1, y2], dim=1)
        loss = (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum() + st.accum[0].sum()
        loss.backward()
        results[impl] = (y, st, {n: p.grad for n, p in m.named_parameters()})
    # 13 + 16 tokens, C = 8: the kernel gets [0, 8) and [16, 24); the rest is partial chunks
    assert calls == ([8, 8] if depth == 1 else [])
    (y_c, s_c, g_c), (y_t, s_t, g_t) = results["chunked"], results[kernel_impl]
    assert rel_err(y_t, y_c) <= 1e-5
    for a, b in zip(s_t.tensors(), s_c.tensors()):
        assert rel_err(a, b) <= 1e-5
    assert s_t.position == s_c.position == 29
    for n in g_c:
        assert rel_err(g_t[n], g_c[n]) <= 1e-4, n


# ---------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="needs a CUDA device")
@pytest.mark.parametrize(
    "head_dim,chunk,precision,tol,tau",
    [(64, 16, "ieee", 1e-4, 1.0), (128, 64, "tf32", 2e-2, 1.0), (128, 64, "ieee", 1e-4, None), (128, 64, "tf32", 2e-2, None)],
)
def test_gpu_kernel_matches_chunked(monkeypatch, head_dim: int, chunk: int, precision: str, tol: float, tau):
    """The compiled kernels on the GPU (fp32 inputs), against the chunked scan in fp32; without
    the clip (``tau=None``) the row-split launch (several programs per head)."""
    monkeypatch.setenv("OLMO_MIRAS_TRITON_PRECISION", precision)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    rule = linear_titans(head_dim, chunk, tau)
    inputs = [x.detach().cuda().requires_grad_() for x in make_inputs(2, 4, 8 * chunk, head_dim)]
    want = run(chunked_scan, rule, inputs, chunk)
    got = run(triton_linear.linear_scan, rule, inputs, chunk)
    assert_close(got, want, tol)
