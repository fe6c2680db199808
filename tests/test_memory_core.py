"""Memory core: chunk-parallel scan vs the autograd reference loop, state carry, errors, numerics."""

from __future__ import annotations

import math

import pytest
import torch

from olmo_miras_plugin.memory import (
    AttentionalBiasConfig,
    MemoryArchitectureConfig,
    MemoryImpl,
    MemoryOptimizerConfig,
    NeuralMemory,
    NeuralMemoryConfig,
    PRESETS,
    RetentionConfig,
)

from miras_test_utils import rel_err

PRESET_NAMES = list(PRESETS)


def build(preset: str = "titans", impl: str = "chunked", seed: int = 0, **kw) -> NeuralMemory:
    kw.setdefault("d_model", 24)
    kw.setdefault("n_heads", 2)
    d_model = kw.pop("d_model")
    torch.manual_seed(seed)
    m = NeuralMemoryConfig.from_preset(preset, d_model=d_model, impl=impl, **kw).build()
    # Larger-than-default projections so the memory actually moves within a short test sequence.
    with torch.no_grad():
        for w in (m.w_q, m.w_k, m.w_v):
            w.weight.normal_(std=0.3)
    return m


def with_impl(m: NeuralMemory, impl: str) -> NeuralMemory:
    m.impl = MemoryImpl(impl)
    return m


# ---------------------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("preset", PRESET_NAMES)
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_matches_reference(preset: str, chunk: int):
    m = build(preset, chunk_size=chunk)
    x = torch.randn(3, 83, 24)  # 83: not a multiple of 7 or 64
    with torch.no_grad():
        y_ref, s_ref = with_impl(m, "reference")(x)
        y_chk, s_chk = with_impl(m, "chunked")(x)
    assert rel_err(y_chk, y_ref) <= 1e-5
    for a, b in zip(s_chk.tensors(), s_ref.tensors()):
        assert rel_err(a, b) <= 1e-5
    assert s_chk.position == s_ref.position == 83


@pytest.mark.parametrize(
    "pieces",
    [
        dict(architecture=MemoryArchitectureConfig(depth=1)),
        dict(architecture=MemoryArchitectureConfig(depth=3, expansion=1.5, activation="silu")),
        dict(architecture=MemoryArchitectureConfig(depth=2, residual_norm=True)),
        dict(architecture=MemoryArchitectureConfig(depth=1, residual_norm=True)),
        dict(objective=AttentionalBiasConfig(name="dot")),
        dict(objective=AttentionalBiasConfig(name="lp", p=1.5)),
        dict(retention=RetentionConfig(name="lq", q=2.5), optimizer=MemoryOptimizerConfig(name="momentum")),
        dict(retention=RetentionConfig(name="kl"), optimizer=MemoryOptimizerConfig(name="momentum")),
        dict(conv_kernel=0, qk_norm=False),
    ],
)
def test_chunked_matches_reference_design_axes(pieces):
    m = build("titans", chunk_size=5, **pieces)
    x = torch.randn(2, 23, 24)
    with torch.no_grad():
        y_ref, _ = with_impl(m, "reference")(x)
        y_chk, _ = with_impl(m, "chunked")(x)
    assert rel_err(y_chk, y_ref) <= 1e-5


def test_chunk_size_one_is_the_sequential_recurrence():
    """C = 1 against a hand-written linear-memory delta rule with momentum and per-token gradient
    clipping (no autograd, no chunks)."""
    torch.manual_seed(1)
    m = build(
        "titans", chunk_size=1, architecture=MemoryArchitectureConfig(depth=1), conv_kernel=0
    )
    x = torch.randn(2, 19, 24)
    with torch.no_grad():
        y, _ = m(x)
        # Independent recurrence: W (b,h,d,d); y_t = W_{t-1} q_t; S = ηS − θ (W k − v) kᵀ; W = (1−α)W + S
        b, t, _ = x.shape
        h, d = m.n_heads, m.head_dim
        split = lambda z: z.view(b, t, h, d).transpose(1, 2)  # noqa: E731
        q = torch.nn.functional.normalize(split(m.w_q(x)), dim=-1)
        k = torch.nn.functional.normalize(split(m.w_k(x)), dim=-1)
        v = split(m.w_v(x))
        g = m.gates(x)
        W = m.memory_init[0].unsqueeze(0).expand(b, h, d, d).clone()
        S = torch.zeros_like(W)
        outs = []
        for i in range(t):
            outs.append(torch.einsum("bhoi,bhi->bho", W, q[:, :, i]))
            err = torch.einsum("bhoi,bhi->bho", W, k[:, :, i]) - v[:, :, i]
            grad = torch.einsum("bho,bhi->bhoi", err, k[:, :, i])
            grad = grad * (1.0 / grad.norm(dim=(-2, -1), keepdim=True)).clamp(max=1.0)  # τ = 1
            S = g.eta[:, :, i, None, None] * S - g.theta[:, :, i, None, None] * grad
            W = (1 - g.alpha[:, :, i, None, None]) * W + S
        o = torch.stack(outs, 2)
        o = torch.nn.functional.rms_norm(o, (d,), weight=m.o_norm_weight, eps=1e-6)
        expected = m.w_out(o.transpose(1, 2).reshape(b, t, h * d))
    assert rel_err(y, expected) <= 1e-5


# ---------------------------------------------------------------------------------------- gradients
def _functional(m: NeuralMemory, names):
    params = dict(m.named_parameters())

    def f(x, *ps):
        p = dict(params)
        p.update(zip(names, ps))
        return torch.func.functional_call(m, p, (x,))[0]

    return f


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_gradcheck_float64_through_inner_updates(preset: str):
    m = build(preset, d_model=8, n_heads=2, chunk_size=3).double()
    names = ["memory_init.0", "w_k.weight", "w_theta.bias", "w_alpha.weight"]
    f = _functional(m, names)
    x = torch.randn(1, 7, 8, dtype=torch.float64, requires_grad=True)
    ps = [dict(m.named_parameters())[n].detach().clone().requires_grad_() for n in names]
    assert torch.autograd.gradcheck(f, (x, *ps), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_outer_gradients_match_reference(preset: str):
    m = build(preset, chunk_size=4).double()
    x = torch.randn(2, 13, 24, dtype=torch.float64)
    grads = {}
    for impl in ("reference", "chunked"):
        m.zero_grad()
        y, _ = with_impl(m, impl)(x)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        grads[impl] = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    assert grads["reference"].keys() == grads["chunked"].keys()
    for n, g in grads["reference"].items():
        if g.norm() > 0:
            assert rel_err(grads["chunked"][n], g) <= 1e-8, n


# ---------------------------------------------------------------------------------------- causality / state
@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_causal(impl: str):
    m = build("titans", impl=impl, chunk_size=4)
    x = torch.randn(2, 21, 24)
    with torch.no_grad():
        y, _ = m(x)
        for t in (0, 3, 4, 10, 20):
            x2 = x.clone()
            x2[:, t + 1 :] = torch.randn_like(x2[:, t + 1 :]) * 5
            y2, _ = m(x2)
            assert torch.equal(y[:, : t + 1], y2[:, : t + 1]), t
            if t < 16:
                assert not torch.allclose(y[:, t + 5 :], y2[:, t + 5 :])


@pytest.mark.parametrize("preset", PRESET_NAMES)
@pytest.mark.parametrize("splits", [[5, 17, 64, 100], [1, 2, 3, 70], [63, 64, 65]])
def test_segmented_equals_whole(preset: str, splits):
    m = build(preset, chunk_size=7)
    x = torch.randn(2, 130, 24)
    with torch.no_grad():
        y_whole, s_whole = m(x)
        state, outs = None, []
        bounds = [0] + splits + [x.shape[1]]
        for a, b in zip(bounds[:-1], bounds[1:]):
            y, state = m(x[:, a:b], state)
            outs.append(y)
    assert rel_err(torch.cat(outs, 1), y_whole) <= 1e-5
    for a, b in zip(state.tensors(), s_whole.tensors()):
        assert rel_err(a, b) <= 1e-5
    assert state.position == 130


def test_detached_state_keeps_forward_values_and_cuts_graph():
    m = build("titans", chunk_size=8)
    x = torch.randn(2, 40, 24)
    y1, s = m(x[:, :19])
    y2, _ = m(x[:, 19:], s)
    y2d, _ = m(x[:, 19:], s.detach())
    assert torch.equal(y2, y2d)
    assert all(t.grad_fn is None for t in s.detach().tensors())
    # gradient through the detached state reaches only the second segment's direct inputs
    m.zero_grad()
    y2d.sum().backward()
    g_detached = m.memory_init[0].grad
    assert g_detached is None or g_detached.abs().sum() == 0
    m.zero_grad()
    y2.sum().backward()
    assert m.memory_init[0].grad.abs().sum() > 0


def _grads(m: NeuralMemory) -> dict:
    return {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in m.named_parameters()}


@pytest.mark.parametrize("impl", ["reference", "chunked"])
@pytest.mark.parametrize("preset", ["titans", "memora"])
def test_backprop_span_equals_detached_pieces(impl: str, preset: str):
    """``backprop_span`` cuts the state's graph at absolute multiples of the span: one call on the
    whole sequence gives the outputs and parameter gradients of calls on the pieces between the
    cuts with the state detached in between (``MemoryState.detach``, tested above). Without the
    conv, whose 3-token context ``detach`` also cuts and the layer's span does not."""
    torch.manual_seed(1)
    x = torch.randn(2, 50, 24)
    dy = torch.randn(2, 50, 24)
    cut = build(preset, impl, chunk_size=4, conv_kernel=0, backprop_span=16)
    ref = build(preset, impl, chunk_size=4, conv_kernel=0)
    ref.load_state_dict(cut.state_dict())
    y, state = cut(x)
    (y * dy).sum().backward()
    state_ref, outs = None, []
    for a, b in [(0, 16), (16, 32), (32, 48), (48, 50)]:
        y_piece, state_ref = ref(x[:, a:b], None if state_ref is None else state_ref.detach())
        outs.append(y_piece)
    (torch.cat(outs, 1) * dy).sum().backward()
    assert rel_err(y, torch.cat(outs, 1)) <= 1e-6
    g, g_ref = _grads(cut), _grads(ref)
    for name in g:
        assert rel_err(g[name], g_ref[name]) <= 1e-5, name
    # Not a no-op: without the cut the initial memory also gets the later pieces' gradients.
    whole = build(preset, impl, chunk_size=4, conv_kernel=0)
    whole.load_state_dict(cut.state_dict())
    (whole(x)[0] * dy).sum().backward()
    assert rel_err(whole.memory_init[0].grad, g["memory_init.0"]) > 1e-2
    # Where the sequence is split between calls does not move the cuts (absolute positions),
    # a split on a cut included (the state handed over is cut there).
    for split in (23, 16):
        cut.zero_grad()
        y1, s1 = cut(x[:, :split])
        y2, _ = cut(x[:, split:], s1)
        assert rel_err(torch.cat([y1, y2], 1), y) <= 1e-6
        (torch.cat([y1, y2], 1) * dy).sum().backward()
        for name, grad in _grads(cut).items():
            assert rel_err(grad, g[name]) <= 1e-5, (split, name)


def test_backprop_span_keeps_forward_and_conv():
    """With the conv and no gradient the span changes nothing; the forward values never change."""
    m = build("titans", chunk_size=8, backprop_span=16)
    plain = build("titans", chunk_size=8)
    plain.load_state_dict(m.state_dict())
    x = torch.randn(2, 40, 24)
    y, s = m(x)
    y_plain, s_plain = plain(x)
    assert torch.equal(y, y_plain)
    with torch.no_grad():
        assert torch.equal(m(x)[0], y_plain)
    y.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_detach_keeps_read_weights_the_accumulator():
    """At a chunk boundary (identity retention) the read weights *are* the accumulator; detaching
    and mapping the state keep them one tensor (the Triton kernels take a piece's first chunk only
    then), and keep separate ones separate."""
    m = build("titans", chunk_size=8)
    _, s = m(torch.randn(2, 16, 24))
    assert all(r is a for r, a in zip(s.read_weights, s.accum))
    for mapped in (s.detach(), s.map_tensors(torch.clone)):
        assert all(r is a for r, a in zip(mapped.read_weights, mapped.accum))
        assert all(torch.equal(r, a) for r, a in zip(mapped.read_weights, s.read_weights))
    _, mid = m(torch.randn(2, 5, 24), s)  # ends inside a chunk: the read weights are the chunk start's
    assert not any(r is a for r, a in zip(mid.read_weights, mid.accum))
    d = mid.detach()
    assert not any(r is a for r, a in zip(d.read_weights, d.accum))
    assert all(torch.equal(r, r0) for r, r0 in zip(d.read_weights, mid.read_weights))


@pytest.mark.parametrize("preset", ["titans", "yaad"])
def test_diagnostics_effective_step_max(preset: str):
    """``effective_step_max`` is the largest θ/(1 − η) over tokens and heads (θ without momentum),
    from the gates of :meth:`NeuralMemory.gates` (the unfused gate path)."""
    m = build(preset, chunk_size=8)
    with torch.no_grad():
        m.w_eta is None or m.w_eta.weight.normal_(std=0.5)
        m.w_theta.weight.normal_(std=0.5)
    m.record_diagnostics = True
    x = torch.randn(2, 40, 24)
    m(x)
    g = m.gates(x)
    want = (g.theta if m.w_eta is None else g.theta / (1 - g.eta)).max()
    assert rel_err(m.last_diagnostics["effective_step_max"], want) <= 1e-5


def test_eta_max_caps_the_momentum_gate():
    """η = eta_max · σ(·): starts at eta_init, never reaches eta_max however large the logit, and
    log η matches η (the scans use both); effective_step_max ≤ theta_max / (1 − eta_max)."""
    m = build("titans", chunk_size=8, eta_max=0.95, eta_init=0.9)
    x = torch.randn(2, 40, 24)
    with torch.no_grad():
        m.w_eta.weight.zero_()
        assert torch.allclose(m.gates(x).eta, torch.full((2, 2, 40), 0.9))
        m.w_eta.weight.normal_(std=50.0)
        g = m.gates(x)
    assert g.eta.max() <= 0.95 and g.eta.max() > 0.94  # saturated, at the cap
    assert torch.allclose(g.log_eta.exp(), g.eta, rtol=1e-6)
    m.record_diagnostics = True
    m(x)
    assert m.last_diagnostics["effective_step_max"] <= m.config.theta_max / (1 - 0.95) * (1 + 1e-6)
    with pytest.raises(ValueError, match="eta_init must be below eta_max=0.8, got 0.8"):
        build("titans", eta_max=0.8)
    with pytest.raises(ValueError, match=r"eta_max must be in \(0, 1\] \(1: no cap\), got 1.5"):
        build("titans", eta_max=1.5)


# ---------------------------------------------------------------------------------------- numerics
def test_bf16_autocast_close_to_fp32():
    m = build("titans", d_model=64, n_heads=4, chunk_size=16)
    x = torch.randn(2, 96, 64)
    with torch.no_grad():
        y32, s32 = m(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y16, s16 = m(x)
    assert y16.dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in s16.tensors())
    assert rel_err(y16.float(), y32) < 3e-2


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_long_stream_bf16_stays_finite(preset: str):
    """65,536 tokens streamed in 8k pieces under bf16 autocast: no NaN/Inf anywhere."""
    torch.manual_seed(0)
    m = NeuralMemoryConfig.from_preset(preset, d_model=16, n_heads=2, chunk_size=64).build()
    state = None
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(8):
            x = torch.randn(1, 8192, 16) * 3
            y, state = m(x, state)
            assert torch.isfinite(y.float()).all()
    assert state.position == 65536
    assert state.is_finite()


# ---------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(chunk_size=0), "chunk_size must be a positive integer, got 0"),
        (dict(chunk_size=-3), "chunk_size must be a positive integer, got -3"),
        (dict(d_model=30, n_heads=4), "d_model=30 is not divisible by n_heads=4"),
        (dict(objective=AttentionalBiasConfig(name="lp", p=0.5)), "p >= 1, got p=0.5"),
        (dict(objective=AttentionalBiasConfig(name="huber", delta=0.0)), "delta > 0, got delta=0.0"),
        (dict(objective=AttentionalBiasConfig(name="cosine")), "unknown attentional bias 'cosine'"),
        (dict(retention=RetentionConfig(name="lq", q=0.5)), "q >= 1, got q=0.5"),
        (dict(impl="cuda-magic"), "unknown memory impl 'cuda-magic'"),
        (dict(architecture=MemoryArchitectureConfig(depth=7)), "depth must be an integer in 1..4, got 7"),
        (dict(alpha_init=1.5), "alpha_init must be in \\(0, 1\\), got 1.5"),
        (dict(backprop_span=100), "backprop_span must be a positive multiple of chunk_size=64 .* got 100"),
        (dict(backprop_span=0), "backprop_span must be a positive multiple of chunk_size=64 .* got 0"),
        (dict(theta_max=math.inf), "theta_max must be finite and > 0 .* got inf"),
        (dict(architecture=MemoryArchitectureConfig(residual_norm=True, norm_eps=-1.0)), "norm_eps must be finite and > 0, got -1.0"),
        (dict(architecture=MemoryArchitectureConfig(activation="relu")), "unknown memory activation 'relu'; valid: gelu, silu"),
        (dict(dtype="float8"), "unknown parameter dtype 'float8'; valid: .*bfloat16"),
    ],
)
def test_bad_config_errors(kwargs, match):
    kwargs = dict(kwargs)
    d_model = kwargs.pop("d_model", 32)
    with pytest.raises(ValueError, match=match):
        NeuralMemoryConfig(d_model=d_model, **kwargs).build()


def test_dtype_as_string_and_eta_ignored_without_momentum():
    """A string dtype works like the enum; the gd presets have no η gate, so η values aren't checked."""
    m = NeuralMemoryConfig(d_model=32, dtype="bfloat16").build()
    assert m.w_q.weight.dtype == torch.bfloat16
    cfg = NeuralMemoryConfig.from_preset("yaad", d_model=32, eta_max=0.5)
    assert not cfg.optimizer.uses_momentum
    assert cfg.build().w_eta is None
    with pytest.raises(ValueError, match="eta_init must be below eta_max=0.5, got 0.8"):
        NeuralMemoryConfig.from_preset("titans", d_model=32, eta_max=0.5).build()


def test_state_dtype_and_device_checked():
    m = build("titans", chunk_size=8).double()
    x = torch.randn(1, 10, 24, dtype=torch.float64)
    with pytest.raises(ValueError, match="memory state is torch.float32 on cpu, but torch.float64 input on cpu needs a torch.float64 state"):
        m(x, m.init_state(1))
    y, s = m(x, m.init_state(1, dtype=torch.float64))
    assert s.accum[0].dtype == torch.float64


def test_reference_impl_refuses_inference_mode():
    m = build("titans", chunk_size=8, impl="reference")
    x = torch.randn(1, 10, 24)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode.*torch.no_grad"):
        m(x)
    with torch.no_grad():
        y, _ = m(x)
    assert torch.isfinite(y).all()


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown memory preset 'atlas'; valid presets: titans, moneta, yaad, memora"):
        NeuralMemoryConfig.from_preset("atlas", d_model=32)


def test_state_from_other_config_rejected():
    a = build("titans", chunk_size=8)
    b = build("titans", chunk_size=16)
    x = torch.randn(1, 10, 24)
    _, s = a(x)
    with pytest.raises(ValueError, match="different config"):
        b(x, s)
    with pytest.raises(ValueError, match="batch size 1 but the input has 2"):
        a(torch.randn(2, 4, 24), s)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_input_rejected(bad):
    m = build("titans")
    x = torch.randn(1, 10, 24)
    x[0, 3, 5] = bad
    with pytest.raises(ValueError, match="non-finite input"):
        m(x)


def test_wrong_input_shape():
    m = build("titans")
    with pytest.raises(ValueError, match=r"expected input of shape \(batch, seq, 24\), got \(10, 24\)"):
        m(torch.randn(10, 24))


def test_token_by_token_streaming_equals_whole():
    """Streaming inference path: one token per call, state carried, same outputs as one call."""
    m = build("titans", chunk_size=7)
    x = torch.randn(2, 40, 24)
    with torch.no_grad():
        y_whole, _ = m(x)
        state, outs = None, []
        for i in range(x.shape[1]):
            y, state = m(x[:, i : i + 1], state)
            outs.append(y)
    assert rel_err(torch.cat(outs, 1), y_whole) <= 1e-5


def test_short_conv_matches_conv1d_and_continues_across_pieces():
    """The token-major shifted-sum conv against ``F.conv1d`` (a different algorithm and layout),
    value and gradients, and split into two pieces with the context carried."""
    from olmo_miras_plugin.memory.conv import ShortCausalConv

    torch.manual_seed(3)
    conv = ShortCausalConv(6, 4).double()
    x = torch.randn(2, 11, 6, dtype=torch.float64, requires_grad=True)
    y, ctx = conv(x, None)
    # Reference: left-pad K−1 zeros, depthwise conv1d in (batch, channels, seq).
    xp = torch.nn.functional.pad(x.transpose(1, 2), (3, 0))
    ref = torch.nn.functional.silu(torch.nn.functional.conv1d(xp, conv.weight.unsqueeze(1), groups=6)).transpose(1, 2)
    assert rel_err(y, ref) <= 1e-12
    g = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, conv.weight), g)
    rx, rw = torch.autograd.grad(ref, (x, conv.weight), g)
    assert rel_err(gx, rx) <= 1e-12 and rel_err(gw, rw) <= 1e-12
    y1, ctx1 = conv(x[:, :5], None)
    y2, ctx2 = conv(x[:, 5:], ctx1)
    assert rel_err(torch.cat([y1, y2], 1), y) <= 1e-12 and torch.equal(ctx2, ctx)
