"""The MLP memory's kernels (memory/triton_mlp.py, memory/triton_mlp_split.py) against the PyTorch
chunked scan.

As in test_triton_linear.py: without a GPU the kernel runs in Triton's interpreter, in a subprocess
(:func:`test_interpreted_suite`); the ``gpu`` tests run the compiled kernel where CUDA is present.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from olmo_miras_plugin.memory import (  # noqa: E402
    MemoryArchitectureConfig,
    MemoryOptimizerConfig,
    NeuralMemoryConfig,
)
from olmo_miras_plugin.memory import triton_linear, triton_mlp, triton_mlp_split, triton_scan  # noqa: E402
from olmo_miras_plugin.memory.scan import Gates, ScanState, chunked_scan  # noqa: E402

from miras_test_utils import interpreter_harness, rel_err  # noqa: E402

INTERPRETED = triton_linear._interpreted()
interpreted, test_interpreted_suite = interpreter_harness(__file__, INTERPRETED)


def mlp_rule(head_dim: int, chunk: int, max_grad_norm, expansion: float = 2.0, activation: str = "gelu",
             optimizer: str = "momentum"):
    cfg = NeuralMemoryConfig.from_preset(
        "titans", d_model=2 * head_dim, n_heads=2, chunk_size=chunk,
        architecture=MemoryArchitectureConfig(depth=2, expansion=expansion, activation=activation),
        optimizer=MemoryOptimizerConfig(name=optimizer, max_grad_norm=max_grad_norm),
    )
    return cfg.build().rule


def make_inputs(rule, b: int, h: int, t: int, d: int, seed: int = 0, theta_max: float = 0.5):
    """k, v, q, gates and an initial state, without gradients (see :func:`leaf_inputs`)."""
    leaves, theta_max = leaf_inputs(rule, b, h, t, d, seed, theta_max)
    k, v, q, zt, ze, za, a1, a2, *mom = (x.detach() for x in leaves)
    return k, v, q, gates_of(zt, ze, za, theta_max), ScanState([a1, a2], mom or None, [a1, a2], 0)


def assert_states_close(got: ScanState, want: ScanState, tol: float) -> None:
    assert got.position == want.position
    for name, a_list, b_list in (("accum", got.accum, want.accum), ("momentum", got.momentum, want.momentum)):
        if b_list is None:
            assert a_list is None
            continue
        for i, (a, b) in enumerate(zip(a_list, b_list)):
            assert rel_err(a, b) <= tol, f"{name}[{i}]: {rel_err(a, b):.2e}"
    for a, b in zip(got.read_weights, want.read_weights):
        assert rel_err(a, b) <= tol


# ---------------------------------------------------------------------------------------- kernel = chunked
@interpreted
@pytest.mark.parametrize(
    "head_dim,expansion,chunk,tau,activation,optimizer,block",
    [
        (16, 2.0, 4, 1.0, "gelu", "momentum", None),  # the titans default clip
        (16, 2.0, 8, 0.05, "gelu", "momentum", "16"),  # clipping on almost every token; two hidden blocks
        (32, 2.0, 8, None, "gelu", "momentum", None),  # no clip
        (24, 2.0, 4, 0.3, "silu", "momentum", "16"),  # d padded to 32; hidden 48 = 16 + 16 + 16
        (16, 1.5, 4, 1.0, "gelu", "gd", None),  # no momentum; hidden 24: a partly padded block
    ],
)
def test_kernel_matches_chunked(monkeypatch, head_dim, expansion, chunk, tau, activation, optimizer, block):
    if block:
        monkeypatch.setenv("OLMO_MIRAS_TRITON_MLP_BLOCK", block)
    rule = mlp_rule(head_dim, chunk, tau, expansion, activation, optimizer)
    k, v, q, gates, state = make_inputs(rule, 2, 2, 5 * chunk, head_dim)
    with torch.no_grad():
        y_w, s_w = chunked_scan(rule, state, k, v, q, gates, chunk)
        y_g, s_g = triton_mlp.mlp_scan(rule, state, k, v, q, gates, chunk)
    assert rel_err(y_g, y_w) <= 1e-5
    assert_states_close(s_g, s_w, 1e-5)
    assert all(r is a for r, a in zip(s_g.read_weights, s_g.accum))
    # the caller's state is untouched (the kernel updates fresh copies in place)
    assert all(a is b for a, b in zip(state.accum, state.read_weights))


def leaf_inputs(rule, b: int, h: int, t: int, d: int, seed: int = 0, theta_max: float = 0.5):
    """Leaves for a gradient check: normalised k, q (as the layer makes them), v, the gate logits,
    a nonzero initial accumulator and momentum. (Without the clip, an MLP memory at θ ~ 0.5
    diverges within a few hundred tokens: pass a smaller ``theta_max``.)"""
    g = torch.Generator().manual_seed(seed)
    k = F.normalize(torch.randn(b, h, t, d, generator=g), dim=-1)
    q = F.normalize(torch.randn(b, h, t, d, generator=g), dim=-1)
    v = torch.randn(b, h, t, d, generator=g)
    z = [torch.randn(b, h, t, generator=g) for _ in range(3)]
    accum = [torch.randn(b, h, o, i, generator=g) * i**-0.5 for o, i in rule.architecture.shapes]
    mom = [torch.randn(a.shape, generator=g) * 0.05 for a in accum] if rule.optimizer.uses_momentum else []
    return [x.requires_grad_() for x in (k, v, q, *z, *accum, *mom)], theta_max


def gates_of(zt: torch.Tensor, ze: torch.Tensor, za: torch.Tensor, theta_max: float) -> Gates:
    ze, za = ze + 2.0, za - 3.0  # η around 0.9, α around 0.05
    return Gates(theta_max * torch.sigmoid(zt), torch.sigmoid(ze), torch.sigmoid(za), F.logsigmoid(ze), F.logsigmoid(-za))


def run_with_grads(fn, rule, leaves, chunk, segments=None):
    """Outputs, final state, and the gradients of a random projection of all of them w.r.t. every
    leaf; ``segments`` splits the sequence into pieces (state carried)."""
    (k, v, q, zt, ze, za, a1, a2, *mom), theta_max = leaves[0], leaves[1]
    gates = gates_of(zt, ze, za, theta_max)
    accum = [a1 * 1.0, a2 * 1.0]
    state = ScanState(accum, [m * 1.0 for m in mom] or None, accum, 0)
    t = k.shape[2]
    outs, start = [], 0
    for n in segments or [t]:
        sl = slice(start, start + n)
        y, state = fn(rule, state, k[:, :, sl], v[:, :, sl], q[:, :, sl], Gates(*(g[:, :, sl] for g in gates)), chunk)
        outs.append(y)
        start += n
    results = [torch.cat(outs, dim=2), *state.accum, *(state.momentum or [])]
    g = torch.Generator().manual_seed(1)
    loss = sum((r * torch.randn(r.shape, generator=g).to(r.device)).sum() for r in results)
    return results, torch.autograd.grad(loss, leaves[0], allow_unused=True)  # gd: η unused


def assert_grads_close(got, want, tol: float) -> None:
    names = ["y", "W1", "W2", "S1", "S2"]
    for name, a, b in zip(names, got[0], want[0]):
        assert rel_err(a, b) <= tol, f"{name}: {rel_err(a, b):.2e}"
    names = ["k", "v", "q", "theta", "eta", "alpha", "W1_0", "W2_0", "S1_0", "S2_0"]
    for name, a, b in zip(names, got[1], want[1]):
        assert (a is None) == (b is None), name
        if b is not None:
            assert rel_err(a, b) <= tol, f"grad {name}: {rel_err(a, b):.2e}"


@interpreted
@pytest.mark.parametrize(
    "head_dim,expansion,chunk,tau,activation,optimizer,block",
    [
        (16, 2.0, 4, 1.0, "gelu", "momentum", None),  # the titans default clip
        (16, 2.0, 8, 0.05, "gelu", "momentum", "16"),  # clipping on almost every token; two hidden blocks
        (16, 2.0, 4, None, "gelu", "momentum", None),  # no clip
        (24, 2.0, 4, 0.3, "silu", "momentum", "16"),  # d padded to 32; hidden 48 = 3 blocks
        (16, 1.5, 4, 1.0, "gelu", "gd", None),  # no momentum; hidden 24: a partly padded block
    ],
)
def test_backward_matches_chunked(monkeypatch, head_dim, expansion, chunk, tau, activation, optimizer, block):
    """Outputs, final state and the gradients w.r.t. k, v, q, every gate and the initial state
    equal autograd through the chunked scan."""
    monkeypatch.setenv(triton_mlp.TRAIN_ENV, "1")
    if block:
        monkeypatch.setenv("OLMO_MIRAS_TRITON_MLP_BLOCK", block)
    rule = mlp_rule(head_dim, chunk, tau, expansion, activation, optimizer)
    leaves = leaf_inputs(rule, 2, 2, 4 * chunk, head_dim, theta_max=0.5 if tau else 0.05)
    want = run_with_grads(chunked_scan, rule, leaves, chunk)
    got = run_with_grads(triton_mlp.mlp_scan, rule, leaves, chunk)
    assert_grads_close(got, want, 1e-4)


@interpreted
def test_backward_segments_with_partial_chunks(monkeypatch):
    """Through the dispatcher, in pieces that start and end inside chunks: the gradient crosses
    kernel and PyTorch pieces and the separate read weights of each kernel piece's first chunk."""
    monkeypatch.setenv(triton_mlp.TRAIN_ENV, "1")
    monkeypatch.setenv(triton_mlp_split.SPLIT_ENV, "0")  # these kernels, not the hidden-split ones
    rule = mlp_rule(16, 8, 1.0)
    leaves = leaf_inputs(rule, 2, 2, 45, 16)
    want = run_with_grads(chunked_scan, rule, leaves, 8)
    got = run_with_grads(triton_scan.scan, rule, leaves, 8, segments=[5, 19, 3, 18])
    assert_grads_close(got, want, 1e-4)


@interpreted
def test_clip_cases_are_what_they_claim():
    """τ = 0.05 clips (the output differs from no clip) and the default τ = 1 is exercised."""
    rule_args = dict(head_dim=16, chunk=8)
    ys = {}
    for tau in (None, 0.05, 1.0):
        rule = mlp_rule(max_grad_norm=tau, **rule_args)
        k, v, q, gates, state = make_inputs(rule, 2, 2, 40, 16)
        with torch.no_grad():
            ys[tau] = chunked_scan(rule, state, k, v, q, gates, 8)[0]
    assert rel_err(ys[0.05], ys[None]) > 1e-2
    assert rel_err(ys[1.0], ys[None]) > 1e-5


@interpreted
def test_segments_with_partial_chunks(monkeypatch):
    """The dispatcher cuts pieces that start/end inside a chunk (PyTorch) around the whole chunks
    (the kernel); the result equals one chunked scan over the whole sequence."""
    monkeypatch.setenv(triton_mlp_split.SPLIT_ENV, "0")  # these kernels, not the hidden-split ones
    calls = []
    kernel = triton_mlp.mlp_scan
    monkeypatch.setattr(triton_mlp, "mlp_scan", lambda *a: calls.append(a[2].shape[2]) or kernel(*a))
    rule = mlp_rule(16, 8, 1.0)
    k, v, q, gates, state = make_inputs(rule, 2, 2, 45, 16)
    with torch.no_grad():
        y_w, s_w = chunked_scan(rule, state, k, v, q, gates, 8)
        outs, start, st = [], 0, state
        for n in (5, 19, 3, 18):
            sl = slice(start, start + n)
            y, st = triton_scan.scan(rule, st, k[:, :, sl], v[:, :, sl], q[:, :, sl], Gates(*(g[:, :, sl] for g in gates)), 8)
            outs.append(y)
            start += n
    assert calls == [16, 8]  # [8, 24) of the second piece, [32, 40) of the fourth
    assert rel_err(torch.cat(outs, dim=2), y_w) <= 1e-5
    assert_states_close(st, s_w, 1e-5)


@interpreted
def test_mlp_scan_refuses():
    rule = mlp_rule(16, 4, 1.0)
    k, v, q, gates, state = make_inputs(rule, 1, 2, 10, 16)
    with torch.no_grad(), pytest.raises(ValueError, match="whole chunks"):
        triton_mlp.mlp_scan(rule, state, k, v, q, gates, 4)
    with torch.no_grad(), pytest.raises(ValueError, match="chunk boundary"):
        triton_mlp.mlp_scan(rule, state._replace(position=2), k[:, :, :8], v[:, :, :8], q[:, :, :8],
                            Gates(*(g[:, :, :8] for g in gates)), 4)
    # training a clipped memory through these kernels is opt-in (slower than the compiled scan)
    with pytest.raises(ValueError, match=triton_mlp.TRAIN_ENV):
        triton_mlp.mlp_scan(rule, state, k[:, :, :8].requires_grad_(), v[:, :, :8], q[:, :, :8],
                            Gates(*(g[:, :, :8] for g in gates)), 4)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(architecture=MemoryArchitectureConfig(depth=3)), "depth-2"),
        (dict(architecture=MemoryArchitectureConfig(depth=2, residual_norm=True)), "residual_norm"),
        (dict(preset="yaad"), "l2 attentional bias"),
        (dict(preset="memora"), "decay retention"),
    ],
)
def test_fallback_reasons(kw, match):
    preset = kw.pop("preset", "titans")
    rule = NeuralMemoryConfig.from_preset(preset, d_model=32, n_heads=2, **kw).build().rule
    k = torch.zeros(1, 2, 8, 16)
    accum = [torch.zeros(1, 2, o, i) for o, i in rule.architecture.shapes]
    state = ScanState(accum, None, accum, 0)
    gates = Gates(*[torch.zeros(1, 2, 8)] * 5)
    reason = triton_mlp.unsupported_reason(rule, state, k, k, k, gates, 4)
    assert reason is not None and match in reason, reason
    kernel, why = triton_scan.kernel_for(rule, state, k, k, k, gates, 4)
    assert kernel is None and why == reason


@interpreted
@pytest.mark.parametrize("kernel_impl", ["triton", "triton_graphed"])
@pytest.mark.parametrize("split", [True, False])
def test_layer_uses_kernel(monkeypatch, kernel_impl, split):
    """``NeuralMemory(impl="triton")`` with the default MLP memory (the clip at τ = 1) equals
    ``chunked`` (outputs, carried state, every parameter's gradient) with the whole chunks through
    the kernels (by default the hidden-split ones; ``OLMO_MIRAS_TRITON_SPLIT=0``: one program per
    head, training opted in), in two segments; and under ``no_grad``. (Off CUDA,
    ``triton_graphed`` runs the kernels without graphs.)"""
    module, name = (triton_mlp_split, "split_mlp_scan") if split else (triton_mlp, "mlp_scan")
    if not split:
        monkeypatch.setenv(triton_mlp_split.SPLIT_ENV, "0")
        monkeypatch.setenv(triton_mlp.TRAIN_ENV, "1")
    calls = []
    kernel = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a: calls.append(a[2].shape[2]) or kernel(*a))

    def build(impl):
        torch.manual_seed(0)
        m = NeuralMemoryConfig.from_preset("titans", d_model=32, n_heads=2, chunk_size=8, impl=impl).build()
        with torch.no_grad():
            for w in (m.w_q, m.w_k, m.w_v):
                w.weight.normal_(std=0.3)
        return m

    x = torch.randn(2, 29, 32, generator=torch.Generator().manual_seed(3))
    results = {}
    for impl in ("chunked", kernel_impl):
        m = build(impl)
        y1, st = m(x[:, :13])
        y2, st = m(x[:, 13:], st)
        y = torch.cat([y1, y2], dim=1)
        loss = (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum() + st.accum[0].sum()
        loss.backward()
        results[impl] = (y, st, {n: p.grad for n, p in m.named_parameters()}, m)
    # 13 + 16 tokens, C = 8: the kernel gets [0, 8) and [16, 24); the rest is partial chunks
    assert calls == [8, 8]
    (y_c, s_c, g_c, ref), (y_t, s_t, g_t, fast) = results["chunked"], results[kernel_impl]
    assert rel_err(y_t, y_c) <= 1e-5
    for a, b in zip(s_t.tensors(), s_c.tensors()):
        assert rel_err(a, b) <= 1e-5
    for n in g_c:
        assert rel_err(g_t[n], g_c[n]) <= 1e-4, n
    calls.clear()
    with torch.no_grad():
        y_c, _ = ref(x)
        y_t, _ = fast(x)
    assert calls == [24]
    assert rel_err(y_t, y_c) <= 1e-5


# ---------------------------------------------------------------------------------------- hidden-split kernels
def record_clip(monkeypatch, rule) -> list:
    """The per-token clip factors σ the chunked scan computes with ``rule`` from now on (appended
    to the returned list), to check that a case clips some tokens and not others."""
    scales: list = []
    inner = rule.optimizer.clip_scale

    def clip_scale(sq_norm):
        scale = inner(sq_norm)
        scales.append(scale.detach().flatten())
        return scale

    monkeypatch.setattr(rule.optimizer, "clip_scale", clip_scale)
    return scales


def assert_clips_some(scales: list) -> None:
    clipped = (torch.cat(scales) < 1).float().mean().item()
    assert 0.1 <= clipped <= 0.9, f"{clipped:.0%} of the tokens clipped: the case does not test the clip"


@interpreted
@pytest.mark.parametrize(
    "head_dim,expansion,chunk,activation,optimizer,block,rows,tau,read",
    [
        (16, 2.0, 8, "gelu", "momentum", None, None, None, None),  # one program per head (hidden 32), all rows at once
        (16, 2.0, 8, "gelu", "momentum", "16", "4", None, None),  # two programs per head; two row passes per chunk
        (24, 2.0, 4, "silu", "momentum", "16", None, None, None),  # d padded to 32; hidden 48 = 3 programs
        (16, 1.5, 4, "gelu", "gd", "16", None, None, None),  # no momentum; hidden 24: a partly padded slice
        # the read-outs' kernels (off the chain) with their own hidden units per step: one chunk per
        # backward launch, all 32 units in one step (the chain: two programs), then groups of 3
        # chunks (4 = 1 + 3) and two steps of 16
        (16, 2.0, 8, "gelu", "momentum", "16", None, None, dict(GROUP="1", BLOCK="32")),
        # with the clip (τ: about half the tokens clipped, checked)
        (16, 2.0, 8, "gelu", "momentum", None, None, 6.0, None),
        (16, 2.0, 8, "gelu", "momentum", "16", "4", 6.0, None),
        (24, 2.0, 4, "silu", "momentum", "16", None, 6.0, None),
        (16, 1.5, 4, "gelu", "gd", "16", None, 2.0, None),
        (16, 2.0, 8, "gelu", "momentum", "16", None, 6.0, dict(GROUP="3", BLOCK="16")),
    ],
)
def test_split_matches_chunked(monkeypatch, head_dim, expansion, chunk, activation, optimizer, block, rows, tau, read):
    """Hidden units split over programs (sums by atomics, one launch per chunk; two forward
    launches with the clip; the read-outs' backward a group of chunks at a time off the chain):
    outputs, final state and every gradient equal autograd through the chunked scan."""
    knobs = [("BLOCK", block), ("BWD_BLOCK", block), ("FWD_ROWS", rows), ("NORM_ROWS", rows)]
    knobs += [("BWD_START_ROWS", rows), ("BWD_FINISH_ROWS", rows)]
    knobs += [(f"READ_{k}", v) for k, v in (read or {}).items()]
    for env, value in knobs:
        if value:
            monkeypatch.setenv(f"OLMO_MIRAS_TRITON_SPLIT_{env}", value)
    rule = mlp_rule(head_dim, chunk, tau, expansion, activation, optimizer)
    theta_max = 0.5 if tau else 0.05
    scales = record_clip(monkeypatch, rule) if tau else None
    leaves = leaf_inputs(rule, 2, 2, 4 * chunk, head_dim, theta_max=theta_max)
    want = run_with_grads(chunked_scan, rule, leaves, chunk)
    if tau:
        assert_clips_some(scales)
    got = run_with_grads(triton_mlp_split.split_mlp_scan, rule, leaves, chunk)
    assert_grads_close(got, want, 1e-4)
    # without a gradient the forward keeps two state slots instead of one per chunk
    k, v, q, gates, state = make_inputs(rule, 2, 2, 5 * chunk, head_dim, theta_max=theta_max)
    with torch.no_grad():
        y_w, s_w = chunked_scan(rule, state, k, v, q, gates, chunk)
        y_g, s_g = triton_mlp_split.split_mlp_scan(rule, state, k, v, q, gates, chunk)
    assert rel_err(y_g, y_w) <= 1e-5
    assert_states_close(s_g, s_w, 1e-5)


@interpreted
@pytest.mark.parametrize("tau", [None, 6.0])
def test_split_backward_kernels_take_their_own_tiles(monkeypatch, tau):
    """The backward's start and finish kernels each with their own hidden units per program and
    rows per pass (start: 16 units and 4-row passes, 4 programs per head; finish: 32 units and
    8-row passes, 2 programs): what one writes for the other goes through memory, so the
    gradients still equal autograd through the chunked scan."""
    for env, value in (("BWD_BLOCK", "16"), ("BWD_FINISH_BLOCK", "32"), ("BWD_START_ROWS", "4"), ("BWD_FINISH_ROWS", "8")):
        monkeypatch.setenv(f"OLMO_MIRAS_TRITON_SPLIT_{env}", value)
    rule = mlp_rule(16, 8, tau, 4.0)
    theta_max = 0.5 if tau else 0.05
    scales = record_clip(monkeypatch, rule) if tau else None
    leaves = leaf_inputs(rule, 1, 2, 3 * 8, 16, theta_max=theta_max)
    want = run_with_grads(chunked_scan, rule, leaves, 8)
    if tau:
        assert_clips_some(scales)
    got = run_with_grads(triton_mlp_split.split_mlp_scan, rule, leaves, 8)
    assert_grads_close(got, want, 1e-4)


@interpreted
@pytest.mark.parametrize("tau", [None, 1.0])
def test_dispatcher_picks_split(monkeypatch, tau):
    """With or without the clip (τ = 1: the titans default), whole chunks go to the hidden-split
    kernels (also when training, no opt-in), in pieces that start and end inside chunks; with
    ``OLMO_MIRAS_TRITON_SPLIT=0`` to the one-program kernels."""
    monkeypatch.delenv(triton_mlp.TRAIN_ENV, raising=False)
    calls = []
    for module, name in ((triton_mlp_split, "split_mlp_scan"), (triton_mlp, "mlp_scan")):
        fn = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _fn=fn, _n=name: calls.append((_n, a[2].shape[2])) or _fn(*a))
    rule = mlp_rule(16, 8, tau)
    leaves = leaf_inputs(rule, 2, 2, 45, 16, theta_max=0.5 if tau else 0.05)
    want = run_with_grads(chunked_scan, rule, leaves, 8)
    got = run_with_grads(triton_scan.scan, rule, leaves, 8, segments=[5, 19, 3, 18])
    assert calls == [("split_mlp_scan", 16), ("split_mlp_scan", 8)]
    assert_grads_close(got, want, 1e-4)
    calls.clear()
    monkeypatch.setenv(triton_mlp_split.SPLIT_ENV, "0")
    k, v, q, gates, state = make_inputs(rule, 1, 2, 16, 16)
    with torch.no_grad():
        triton_scan.scan(rule, state, k, v, q, gates, 8)
    assert calls == [("mlp_scan", 16)]
    assert "OLMO_MIRAS_TRITON_SPLIT=0" in triton_mlp_split.unsupported_reason(rule, state, k, v, q, 8)


def test_split_refuses_bad_input(monkeypatch):
    rule = mlp_rule(16, 4, None)
    k, v, q, gates, state = make_inputs(rule, 1, 2, 8, 16)
    if INTERPRETED:  # the clip is no reason (on CPU without the interpreter: "needs CUDA")
        assert triton_mlp_split.unsupported_reason(mlp_rule(16, 4, 1.0), state, k, v, q, 4) is None
    # the backward's start kernel: 64-row passes, except with bf16 operands (16, larger refused)
    assert triton_mlp_split._backward_chain_tiles(64, "tf32")[::2] == (64, 16)
    assert triton_mlp_split._backward_chain_tiles(64, "bf16")[::2] == (16, 16)
    monkeypatch.setenv("OLMO_MIRAS_TRITON_SPLIT_BWD_START_ROWS", "32")
    with pytest.raises(ValueError, match="OLMO_MIRAS_TRITON_PRECISION=bf16 runs the backward start kernel at 16 rows"):
        triton_mlp_split._backward_chain_tiles(64, "bf16")
    monkeypatch.setenv("OLMO_MIRAS_TRITON_SPLIT_BWD_FINISH_ROWS", "3")
    with pytest.raises(ValueError, match="OLMO_MIRAS_TRITON_SPLIT_BWD_FINISH_ROWS must be a power of two dividing the chunk"):
        triton_mlp_split._backward_chain_tiles(64, "tf32")
    monkeypatch.delenv("OLMO_MIRAS_TRITON_SPLIT_BWD_FINISH_ROWS")
    monkeypatch.delenv("OLMO_MIRAS_TRITON_SPLIT_BWD_START_ROWS")
    # the single backward kernel's knobs are refused, naming what replaced them
    for old, new in [("ROWS", "_BWD_FINISH_ROWS"), ("BWD_WARPS", "_BWD_FINISH_WARPS"), ("BWD_STAGES", "_BWD_FINISH_STAGES")]:
        monkeypatch.setenv(f"OLMO_MIRAS_TRITON_SPLIT_{old}", "16")
        with pytest.raises(ValueError, match=f"OLMO_MIRAS_TRITON_SPLIT_{old} is no longer read.*{new}"):
            triton_mlp_split._backward_chain_tiles(64, "tf32")
        monkeypatch.delenv(f"OLMO_MIRAS_TRITON_SPLIT_{old}")
    assert triton_mlp_split._backward_chain_tiles(64, "tf32")[::2] == (64, 16)
    for bad in ("0", "two"):
        monkeypatch.setenv("OLMO_MIRAS_TRITON_SPLIT_READ_GROUP", bad)
        with pytest.raises(ValueError, match=f"OLMO_MIRAS_TRITON_SPLIT_READ_GROUP must be a positive number of chunks, got '{bad}'"):
            triton_mlp_split._read_group(8)
    monkeypatch.setenv("OLMO_MIRAS_TRITON_SPLIT_READ_ROWS", "16")  # replaced: a whole chunk per program
    with pytest.raises(ValueError, match="OLMO_MIRAS_TRITON_SPLIT_READ_ROWS is no longer read.*_READ_BLOCK"):
        triton_mlp_split._read_block(64)
    monkeypatch.delenv("OLMO_MIRAS_TRITON_SPLIT_READ_ROWS")
    # bf16 operands: the read-outs (whole 64-row chunks) keep tf32 dots; other precisions pass through
    assert [triton_mlp_split._read_precision(p) for p in ("bf16", "tf32", "ieee")] == ["tf32", "tf32", "ieee"]
    # the forward chain: 64-row passes, except the bf16-operand mode, which refuses larger tiles
    assert triton_mlp_split._forward_chain_tiles(64, "tf32")[::2] == (64, 64)
    assert triton_mlp_split._forward_chain_tiles(64, "bf16")[::2] == (16, 64)
    monkeypatch.setenv("OLMO_MIRAS_TRITON_SPLIT_FWD_ROWS", "64")
    with pytest.raises(ValueError, match="OLMO_MIRAS_TRITON_PRECISION=bf16 runs the forward update kernel at 16 rows"):
        triton_mlp_split._forward_chain_tiles(64, "bf16")
    if INTERPRETED:
        with torch.no_grad(), pytest.raises(ValueError, match="whole chunks"):
            triton_mlp_split.split_mlp_scan(rule, state, k[:, :, :6], v[:, :, :6], q[:, :, :6],
                                            Gates(*(g[:, :, :6] for g in gates)), 4)


def test_split_programmatic_dependent_launch_knob(monkeypatch):
    """Plain launches wherever the device can't wait on the previous launch (CPU tensors, the
    interpreter: the kernels must then be built without ``griddepcontrol``); a bad setting is
    refused, not read as either value."""
    cpu = torch.device("cpu")
    assert triton_mlp_split._launch_pdl(cpu) == {"PDL": False}
    monkeypatch.setenv("OLMO_MIRAS_TRITON_PDL", "0")
    assert triton_mlp_split._launch_pdl(cpu) == {"PDL": False}
    if torch.cuda.is_available() and not INTERPRETED:
        assert triton_mlp_split._launch_pdl(torch.device("cuda")) == {"PDL": False}
    for bad in ("yes", "2", ""):  # an empty value too: it is neither 0 nor 1
        monkeypatch.setenv("OLMO_MIRAS_TRITON_PDL", bad)
        with pytest.raises(ValueError, match=f"OLMO_MIRAS_TRITON_PDL must be 0 .* or 1 .*got '{bad}'"):
            triton_mlp_split._launch_pdl(cpu)
    monkeypatch.delenv("OLMO_MIRAS_TRITON_PDL")
    if torch.cuda.is_available() and not INTERPRETED and torch.cuda.get_device_capability()[0] >= 9:
        assert triton_mlp_split._launch_pdl(torch.device("cuda")) == {"PDL": True, "launch_pdl": True}


# ---------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="needs a CUDA device")
@pytest.mark.parametrize("precision,tol,tau", [("ieee", 1e-4, 1.0), ("tf32", 2e-2, 1.0), ("tf32", 2e-2, None)])
def test_gpu_kernel_matches_chunked(monkeypatch, precision: str, tol: float, tau):
    """The compiled kernel at OLMo2-1B memory shapes (d = 128, hidden 256, C = 64) against the
    chunked scan in fp32 (IEEE matmuls)."""
    monkeypatch.setenv("OLMO_MIRAS_TRITON_PRECISION", precision)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    rule = mlp_rule(128, 64, tau)
    k, v, q, gates, state = make_inputs(rule, 2, 4, 8 * 64, 128, theta_max=0.5 if tau else 0.02)
    to = lambda x: x.cuda()  # noqa: E731
    k, v, q = to(k), to(v), to(q)
    gates = Gates(*map(to, gates))
    state = ScanState([to(a) for a in state.accum], [to(s) for s in state.momentum], None, 0)
    state = state._replace(read_weights=state.accum)
    with torch.no_grad():
        y_w, s_w = chunked_scan(rule, state, k, v, q, gates, 64)
        y_g, s_g = triton_mlp.mlp_scan(rule, state, k.bfloat16(), v.bfloat16(), q.bfloat16(), gates, 64)
    assert torch.isfinite(y_w).all()
    # bf16 inputs vs fp32: tolerance of bf16 rounding of k, v, q
    assert rel_err(y_g.float(), y_w) <= max(tol, 2e-2)
    assert_states_close(s_g, s_w, max(tol, 2e-2))


def _gpu_grads_match_chunked(scan_fn, rule, batch: int, n_chunks: int, theta_max: float, tol: float) -> None:
    """``scan_fn`` on CUDA at d = 128, 4 heads, C = 64: outputs, state and every gradient against
    autograd through the chunked scan (fp32 inputs)."""
    leaves, theta_max = leaf_inputs(rule, batch, 4, n_chunks * 64, 128, theta_max=theta_max)
    leaves = ([x.detach().cuda().requires_grad_() for x in leaves], theta_max)
    want = run_with_grads(chunked_scan, rule, leaves, 64)
    assert all(torch.isfinite(r).all() for r in want[0])
    got = run_with_grads(scan_fn, rule, leaves, 64)
    assert_grads_close(got, want, tol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="needs a CUDA device")
@pytest.mark.parametrize("precision,tol,tau", [("ieee", 1e-3, 1.0), ("tf32", 3e-2, 1.0), ("ieee", 1e-3, None)])
def test_gpu_backward_matches_chunked(monkeypatch, precision: str, tol: float, tau):
    """Forward and backward kernels at OLMo2-1B memory shapes (d = 128, hidden 256, C = 64), fp32
    inputs, against autograd through the chunked scan (IEEE matmuls)."""
    monkeypatch.setenv("OLMO_MIRAS_TRITON_PRECISION", precision)
    monkeypatch.setenv(triton_mlp.TRAIN_ENV, "1")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    _gpu_grads_match_chunked(triton_mlp.mlp_scan, mlp_rule(128, 64, tau), 1, 6, 0.5 if tau else 0.02, tol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="needs a CUDA device")
@pytest.mark.parametrize(
    "precision,tol,optimizer,tau,groups",
    [
        ("ieee", 1e-4, "momentum", None, None), ("tf32", 3e-2, "momentum", None, None), ("tf32", 3e-2, "gd", None, None),
        # the clip (tolerances as the one-program kernels')
        ("ieee", 1e-3, "momentum", 1.0, None), ("tf32", 3e-2, "momentum", 1.0, None),
        ("bf16", 5e-2, "momentum", 1.0, None), ("bf16", 5e-2, "momentum", None, None),  # bfloat16 operands
        ("ieee", 1e-3, "momentum", 1.0, "3"),  # the read-outs' backward 3 chunks at a time: its ring wraps
    ],
)
def test_gpu_split_matches_chunked(monkeypatch, precision: str, tol: float, optimizer: str, tau, groups):
    """The hidden-split kernels at OLMo2-1B memory shapes (d = 128, hidden 256, C = 64), fp32
    inputs, against autograd through the chunked scan (IEEE matmuls): outputs, state, gradients."""
    if groups:
        monkeypatch.setenv("OLMO_MIRAS_TRITON_SPLIT_READ_GROUP", groups)
    monkeypatch.setenv("OLMO_MIRAS_TRITON_PRECISION", precision)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    rule = mlp_rule(128, 64, tau, optimizer=optimizer)
    _gpu_grads_match_chunked(triton_mlp_split.split_mlp_scan, rule, 2, 8, 0.5 if tau else 0.05, tol)
