"""``scripts/bench_memory.py`` end to end on CPU with tiny shapes: the table, the JSON, the
reference check (with and without gradients) and streaming per impl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from olmo_miras_plugin.benchmarks.memory_bench import main
from olmo_miras_plugin.benchmarks.timing import kernel_summary


def test_bench_memory_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    main([
        "--device", "cpu", "--seq", "64", "--d-model", "32", "--heads", "2", "--chunk", "16",
        "--impl", "chunked", "triton", "--no-sdpa", "--check", "--stream-tokens", "16384",
        "--stream-segment", "8192", "--json", str(out),
    ])
    stdout = capsys.readouterr().out
    assert "miras/titans/chunked" in stdout and "stream/titans/triton" in stdout
    res = json.loads(out.read_text())
    checks = res["meta"]["checks"]
    assert {(c["impl"], c["preset"]) for c in checks} == {
        (i, p) for i in ("chunked", "triton") for p in ("titans", "moneta", "yaad", "memora")
    }
    for c in checks:  # fp32 reference vs bf16 autocast on CPU: a few e-3
        assert c["finite"] and c["out_rel_err"] < 5e-2 and c["no_grad_out_rel_err"] < 5e-2, c
    streams = [r for r in res["results"] if r["name"] == "stream"]
    assert [(r["params"]["layer"], r["params"]["seq"]) for r in streams] == [
        ("stream/titans/chunked", 8192), ("stream/titans/chunked", 16384),
        ("stream/titans/triton", 8192), ("stream/titans/triton", 16384),
    ]
    assert all(r["extra"]["tok_per_s"] > 0 for r in streams)
    layers = [r for r in res["results"] if r["name"] == "miras"]
    assert len(layers) == 2 and all(r["ms"] > 0 for r in layers)
    # the table and JSON say what a row really ran on this machine
    assert [r["extra"].get("path") for r in layers] == [None, "ran chunked: triton needs CUDA"]
    assert "ran chunked: triton needs CUDA" in stdout
    assert all(c["chunk_size"] == 16 and c["dtype"] == "torch.bfloat16" and c["failures"] == [] for c in checks)
    assert all(r["profile"] is None for r in res["results"])  # only with --profile (CUDA)


def test_kernel_summary_totals_and_ranks_gpu_kernels() -> None:
    """What ``--profile`` writes to the JSON: total GPU time and op count over every kernel, the
    top kernels by time with their launch counts (profiler times are µs, the summary's ms)."""
    from types import SimpleNamespace as Event

    events = [
        Event(key="_split_fwd_kernel", count=129, self_device_time_total=2310.0),
        Event(key="_split_bwd_finish_kernel", count=128, self_device_time_total=3680.0),
        Event(key="fill", count=24, self_device_time_total=150.0),
    ]
    summary = kernel_summary(events, top=2)
    assert summary["gpu_ms"] == pytest.approx(6.14) and summary["gpu_ops"] == 281
    assert summary["kernels"] == [
        {"name": "_split_bwd_finish_kernel", "ms": pytest.approx(3.68), "count": 128},
        {"name": "_split_fwd_kernel", "ms": pytest.approx(2.31), "count": 129},
    ]


def test_check_fails_on_a_wrong_implementation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--check`` is a gate: an implementation that disagrees with the reference stops the run
    before any timing is written."""
    import olmo_miras_plugin.memory.layer as layer_mod
    from olmo_miras_plugin.memory import scan

    real = scan.chunked_scan

    def broken(*args, **kwargs):
        y, state = real(*args, **kwargs)
        return y.flip(-1), state  # wrong read-outs (a scale would be undone by the output norm)

    monkeypatch.setattr(layer_mod, "chunked_scan", broken)
    out = tmp_path / "bench.json"
    with pytest.raises(SystemExit, match=r"--check failed for chunked/titans, chunked/moneta, chunked/yaad"):
        main(["--device", "cpu", "--seq", "32", "--d-model", "32", "--heads", "2", "--chunk", "8",
              "--impl", "chunked", "--no-sdpa", "--check", "--json", str(out)])
    assert not out.exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seq", "0"], "argument --seq: must be an integer >= 1, got 0"),
        (["--batch", "0"], "argument --batch: must be an integer >= 1, got 0"),
        (["--stream-segment", "0"], "argument --stream-segment: must be an integer >= 1, got 0"),
        (["--stream-tokens", "-5"], "argument --stream-tokens: must be an integer >= 0, got -5"),
        (["--impl", "chunkd"], "argument --impl: invalid choice: 'chunkd'"),
        (["--preset", "atlas"], "argument --preset: invalid choice: 'atlas'"),
        (["--profile"], "--profile reads GPU kernel times: it needs --device cuda"),
    ],
)
def test_bad_arguments_are_refused_up_front(argv, message, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--device", "cpu", "--no-sdpa", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err
