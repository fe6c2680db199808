"""The layer's compiled input preparation and output finish (``memory/fusion.py``) against eager.

CUDA compiles them by default; here ``fusion.compile_mode(True)`` forces CPU inductor, so the
compiled graphs (recomputing backward, zero-padded conv taps, symbolic lengths) are checked on
values and gradients without a GPU. Small shapes; each graph is a few seconds of C++.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import pytest
import torch
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from torch._dynamo.utils import counters

from olmo_miras_plugin.memory import MemoryState, NeuralMemory, NeuralMemoryConfig, fusion
from olmo_miras_plugin.memory.conv import causal_conv_silu

from miras_test_utils import rel_err

D_MODEL, HEADS = 16, 2  # one finish graph serves every layer below (same heads × head_dim)


@pytest.fixture(autouse=True)
def inductor_in_process():
    """Compile the C++ in this process: on 2 cores inductor's worker pool costs more to start
    than it saves on the one kernel per graph here."""
    with torch._inductor.config.patch(compile_threads=1):
        yield


def build(preset: str, **kw) -> NeuralMemory:
    torch.manual_seed(0)
    kw.setdefault("chunk_size", 4)
    m = NeuralMemoryConfig.from_preset(preset, d_model=D_MODEL, n_heads=HEADS, **kw).build()
    with torch.no_grad():  # move the memory and conv within a short sequence
        for w in (m.w_q, m.w_k, m.w_v):
            w.weight.normal_(std=0.3)
        if m.conv is not None:
            m.conv.weight.add_(torch.randn_like(m.conv.weight) * 0.3)
    return m


def forward_backward(
    m: NeuralMemory, x: torch.Tensor, split: Optional[int] = None
) -> Tuple[torch.Tensor, MemoryState, Dict[str, torch.Tensor]]:
    """Output, final state and the gradients of x and every parameter for a fixed cotangent;
    with ``split``, two calls with the state carried (gradients flow through it)."""
    m.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    if split is None:
        y, state = m(x)
    else:
        y1, state = m(x[:, :split])
        y2, state = m(x[:, split:], state)
        y = torch.cat([y1, y2], 1)
    cotangent = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    (y * cotangent).sum().backward()
    grads = {"x": x.grad}
    grads.update({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    return y.detach(), state.detach(), grads


def assert_close(a, b, tol: float = 1e-5) -> None:
    (ya, sa, ga), (yb, sb, gb) = a, b
    assert rel_err(ya, yb) <= tol
    for ta, tb in zip(sa.tensors(), sb.tensors()):
        assert rel_err(ta, tb) <= tol
    assert ga.keys() == gb.keys()
    for name in ga:
        assert rel_err(ga[name], gb[name]) <= tol, name


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def graphs_per_copy() -> List[int]:
    """Graphs held by each compiled copy (prepare or finish of a layer type and call class)."""
    return [len(_debug_get_cache_entry_list(fn._torchdynamo_orig_callable.__code__)) for fn in fusion._COMPILED.values()]


@pytest.mark.parametrize(
    "preset, kw",
    [
        ("titans", {}),  # conv, q/k norm, momentum (the η gate, capped at 0.9)
        ("titans", dict(eta_max=1.0, eta_init=0.9)),  # the uncapped η gate (presets before revision 3)
        ("yaad", dict(conv_kernel=0, qk_norm=False)),  # none of them
    ],
)
def test_compiled_matches_eager(preset: str, kw):
    m = build(preset, **kw)
    m.record_diagnostics = True
    x = torch.randn(2, 11, D_MODEL)
    with fusion.compile_mode(False):
        eager = forward_backward(m, x)
        eager_diag = m.last_diagnostics
    with fusion.compile_mode(True):
        compiled = forward_backward(m, x)
        assert set(graphs_per_copy()) == {1}
        assert m.last_diagnostics.keys() == eager_diag.keys()
        for name, value in m.last_diagnostics.items():
            assert rel_err(value, eager_diag[name]) <= 1e-5
    assert_close(compiled, eager)
    # The conv context is the last inputs themselves: bit-identical.
    if m.conv is not None:
        assert torch.equal(compiled[1].conv, eager[1].conv)


def test_compiled_split_continues_exactly():
    """Two pieces with the state carried (the conv context among it) give the single call's
    output and gradients. The second piece's context requires grad: a compiled copy of its own."""
    m = build("titans")
    x = torch.randn(2, 13, D_MODEL)
    with fusion.compile_mode(False):
        eager = forward_backward(m, x)
    with fusion.compile_mode(True):
        whole = forward_backward(m, x)
        pieces = forward_backward(m, x, split=6)
        assert set(graphs_per_copy()) == {1}
    assert_close(whole, eager)
    assert_close(pieces, eager)


def test_lengths_share_one_graph_and_generation_compiles_once():
    """No-grad evaluation at lengths 7, 64, 4096 reuses one graph per function; 1-token steps
    (generation) compile one more each, once."""
    m = build("titans", chunk_size=64)
    before = graphs()
    with fusion.compile_mode(True), torch.no_grad():
        for t in (7, 64, 4096):
            m(torch.randn(2, t, D_MODEL))
        assert graphs() - before == 2
        state, outs = None, []
        x = torch.randn(2, 9, D_MODEL)
        for i in range(x.shape[1]):
            y, state = m(x[:, i : i + 1], state)
            outs.append(y)
        assert graphs() - before == 4 and set(graphs_per_copy()) == {1}
        y_whole, _ = m(x)
    assert rel_err(torch.cat(outs, 1), y_whole) <= 1e-5


def test_cpu_stays_eager_by_default_and_inside_an_enclosing_compile(monkeypatch):
    x = torch.zeros(1)
    assert not fusion._use_compiled(x)
    with fusion.compile_mode(True):
        assert fusion._use_compiled(x)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert not fusion._use_compiled(x)
    m = build("titans")
    before = graphs()
    m(torch.randn(1, 5, D_MODEL))
    assert graphs() == before


def test_prepare_layouts():
    """q, k, v and the gates come out contiguous in the scan's head-major layout."""
    m = build("titans")
    x = torch.randn(2, 5, D_MODEL)
    q, k, v, gates, ctx = fusion.prepare(
        m._project(x), m.conv.weight, m.init_state(2).conv,
        n_heads=HEADS, head_dim=m.head_dim, qk_norm=True, theta_max=m.config.theta_max, dtype=torch.float32,
    )
    for t in (q, k, v):
        assert t.shape == (2, HEADS, 5, m.head_dim) and t.is_contiguous()
    for g in gates:
        assert g.shape == (2, HEADS, 5) and g.is_contiguous()
    assert ctx.shape == (2, m.conv.kernel_size - 1, 3 * HEADS * m.head_dim)


@pytest.mark.parametrize("kernel", [1, 2, 4])
def test_conv_pieces_shorter_than_the_context(kernel: int):
    """Pieces of 1 and 2 tokens (shorter than K − 1 = 3) carry the context through several
    calls; K = 1 has an empty context. Against ``F.conv1d`` on the whole zero-padded sequence."""
    torch.manual_seed(kernel)
    c = 5
    x = torch.randn(2, 9, c, dtype=torch.float64)
    w = torch.randn(c, kernel, dtype=torch.float64)
    xp = torch.nn.functional.pad(x.transpose(1, 2), (kernel - 1, 0))
    ref = torch.nn.functional.silu(torch.nn.functional.conv1d(xp, w.unsqueeze(1), groups=c)).transpose(1, 2)
    ctx, outs, start = torch.zeros(2, kernel - 1, c, dtype=torch.float64), [], 0
    for n in (1, 2, 1, 5):
        y, ctx = causal_conv_silu(x[:, start : start + n], w, ctx)
        outs.append(y)
        start += n
    assert rel_err(torch.cat(outs, 1), ref) <= 1e-12
    assert torch.equal(ctx, x[:, x.shape[1] - (kernel - 1) :])
