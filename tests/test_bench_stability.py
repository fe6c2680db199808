"""``scripts/bench_stability.py`` on CPU: per-step losses and gradient norms, the summary, the
JSON; the memory gradient it reports is the largest memory-parameter gradient norm, checked
against one computed here from the same model and batch."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from olmo_miras_plugin.benchmarks import stability_bench

ARGS = ["--device", "cpu", "--preset", "olmo2_30M", "--vocab-size", "512", "--seq", "96", "--impl", "chunked"]


def test_bench_stability_on_a_text_corpus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "doc.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 20)
    out = tmp_path / "stability.json"
    stability_bench.main([*ARGS, "--steps", "3", "--warmup", "1", "--corpus", str(text), "--json", str(out)])
    data = json.loads(out.read_text())
    assert len(data["steps"]) == 3
    for s in data["steps"]:
        assert all(math.isfinite(s[k]) and s[k] > 0 for k in ("loss", "memory_grad_norm", "total_grad_norm"))
        # The gates: mean θ below θ_max = 2e-3 (titans), η in (0, 1), max θ/(1 − η) past the mean θ.
        assert 0 < s["theta_mean"] < 2e-3 and 0 < s["eta_mean"] < 1 and s["effective_step_max"] > s["theta_mean"]
    mem = [s["memory_grad_norm"] for s in data["steps"]]
    assert data["summary"]["memory_grad_max"] == max(mem) and data["summary"]["memory_grad_median"] == sorted(mem)[1]
    assert data["summary"]["effective_step_max"] == max(s["effective_step_max"] for s in data["steps"])
    assert data["meta"]["args"]["seq"] == 96
    assert "memory grad norm: median" in capsys.readouterr().out


def test_bench_stability_memory_gradient_is_the_largest_memory_parameter_norm(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    import torch.nn.functional as F

    from olmo_miras_plugin.benchmarks.train_bench import build_model

    args = stability_bench.argparse.Namespace(
        device="cpu", preset="olmo2_30M", vocab_size=512, seq=64, steps=1, lr=0.0, warmup=1, clip=0.0, seed=0,
        block_type="mal", every=4, memory_preset="titans", chunk=64, impl="chunked", memory_depth=None,
        memory_max_grad_norm=None, theta_init=None, theta_max=None, corpus=None, random_tokens=True,
        memory_backprop_span=None,
    )
    got = stability_bench.run(args)["steps"][0]["memory_grad_norm"]
    torch.manual_seed(0)
    model = build_model(args, True, "cpu")
    x = torch.randint(0, 512, (1, 64), generator=torch.Generator().manual_seed(0))
    F.cross_entropy(model(x)[0, :-1].float(), x[0, 1:]).backward()
    want = max(p.grad.norm().item() for n, p in model.named_parameters() if ".miras." in f".{n}" and p.grad is not None)
    assert got == pytest.approx(want, rel=1e-5)


def test_bench_stability_refuses_a_short_corpus(tmp_path: Path) -> None:
    text = tmp_path / "short.txt"
    text.write_text("tiny")
    with pytest.raises(ValueError, match="the corpus has 4 tokens; --seq 96 needs more"):
        stability_bench.main([*ARGS, "--steps", "1", "--corpus", str(text), "--json", str(tmp_path / "x.json")])


def test_bench_stability_passes_the_memory_backprop_span() -> None:
    """``--memory-backprop-span`` and ``--eta-init`` / ``--eta-max`` reach every memory layer (what
    they do: tests/test_memory_core.py, tests/test_stability.py)."""
    from olmo_miras_plugin.benchmarks.train_bench import build_model
    from olmo_miras_plugin.memory import NeuralMemory

    args = stability_bench.argparse.Namespace(
        preset="olmo2_30M", vocab_size=512, block_type="mal", every=4, memory_preset="titans", chunk=32,
        impl="chunked", memory_depth=None, memory_max_grad_norm=None, memory_backprop_span=64,
    )
    layers = [m for m in build_model(args, True, "cpu").modules() if isinstance(m, NeuralMemory)]
    assert layers and all(m.config.backprop_span == 64 for m in layers)
    args.eta_init, args.eta_max = 0.7, 0.85  # not the preset's 0.8 / 0.9
    layers = [m for m in build_model(args, True, "cpu").modules() if isinstance(m, NeuralMemory)]
    assert all(m.config.eta_max == 0.85 and m.config.eta_init == 0.7 for m in layers)


TINY = ["--device", "cpu", "--preset", "olmo2_1M", "--vocab-size", "512", "--seq", "32", "--chunk", "16", "--impl", "chunked",
        "--random-tokens"]


def test_nan_max_is_nan_wherever_the_nan_stands() -> None:
    assert stability_bench.nan_max([1.0, 3.0, 2.0]) == 3.0
    for values in ([math.nan, 1.0, 2.0], [1.0, 2.0, math.nan], [1.0, math.nan, 2.0]):
        assert math.isnan(stability_bench.nan_max(values))


def test_bench_stability_fails_on_a_diverged_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A huge learning rate, no clip: the gradients turn NaN; the summary's maximum is NaN (null in
    the strict JSON), not the last finite value, and the run exits with an error, JSON written."""
    out = tmp_path / "stability.json"
    with pytest.raises(SystemExit, match="non-finite loss or gradient norm from step 3: the run diverged"):
        stability_bench.main([*TINY, "--lr", "1e3", "--clip", "0", "--steps", "4", "--warmup", "1", "--json", str(out)])

    def refuse(const: str):
        raise ValueError(const)

    data = json.loads(out.read_text(), parse_constant=refuse)
    assert data["steps"][3]["memory_grad_norm"] is None and data["summary"]["memory_grad_max"] is None
    assert data["summary"]["diverged_at"] == 3


def test_bench_stability_warmup_0_is_no_warmup(tmp_path: Path) -> None:
    """``--warmup 0`` (no warm-up) runs: the full learning rate from the first step."""
    out = tmp_path / "stability.json"
    stability_bench.main([*TINY, "--steps", "1", "--warmup", "0", "--json", str(out)])
    data = json.loads(out.read_text())
    assert len(data["steps"]) == 1 and data["summary"]["diverged_at"] is None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "0"], "--steps: must be an integer >= 1, got 0"),
        (["--warmup", "-1"], "--warmup: must be an integer >= 0, got -1"),
        (["--seq", "1"], "--seq: must be an integer >= 2, got 1"),
        (["--preset", "bogus"], "--preset: unknown preset 'bogus'; valid: olmo2_1M, "),
    ],
)
def test_bench_stability_refuses_bad_flags(argv, message, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as e:
        stability_bench.main([*TINY, *argv, "--json", str(tmp_path / "x.json")])
    assert e.value.code == 2 and message in capsys.readouterr().err
