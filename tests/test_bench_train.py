"""``scripts/bench_train.py`` on CPU: both rows, their losses in the table and JSON, and a loud
failure when a run diverges (its step times would not be a training result)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from olmo_miras_plugin.benchmarks import train_bench

ARGS = ["--device", "cpu", "--preset", "olmo2_1M", "--vocab-size", "512", "--seq", "64", "--steps", "4", "--impl", "chunked"]


def _strict_json(path: Path):
    """The file as strict JSON: NaN / Infinity refused."""

    def refuse(const: str):
        raise ValueError(f"non-strict JSON constant {const}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_bench_train_reports_losses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    train_bench.main([*ARGS, "--json", str(out)])
    rows = _strict_json(out)["results"]  # no NaN peak on CPU: null
    assert [r["name"].split(" ")[1] for r in rows] == ["base", "+"]
    for r in rows:
        assert len(r["extra"]["losses"]) == 4 and all(math.isfinite(l) for l in r["extra"]["losses"])
        assert r["peak_gib"] is None and r["error"] is None and r["ms"] > 0 and r["extra"]["tok_per_s"] > 0
    assert "of base tok/s" in rows[1]["extra"]["vs_base"]
    assert "losses per step" in capsys.readouterr().out


def test_bench_train_fails_on_a_diverged_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = train_bench.train_steps

    def nan_after_first(*args, **kwargs):
        times, losses = real(*args, **kwargs)
        return times, losses[:1] + [math.nan] * (len(losses) - 1)

    monkeypatch.setattr(train_bench, "train_steps", nan_after_first)
    with pytest.raises(SystemExit, match="non-finite loss"):
        train_bench.main([*ARGS, "--json", str(tmp_path / "bench.json")])


def test_bench_train_diverged_rows_carry_no_timing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The JSON marks a diverged row (error, no ms / tok/s, no vs_base figure) and is strict JSON;
    the finite row keeps its timing; then the run exits with an error."""
    calls = []

    def fake(model, opt, x, steps, device):  # no training: the base row finite, the memory row NaN
        calls.append(steps)
        return [0.01] * steps, ([1.0] if len(calls) == 1 else [math.nan]) * steps

    monkeypatch.setattr(train_bench, "train_steps", fake)
    out = tmp_path / "bench.json"
    with pytest.raises(SystemExit, match="non-finite loss.*diverged"):
        train_bench.main([*ARGS, "--json", str(out)])
    base, mem = _strict_json(out)["results"]
    assert base["error"] is None and base["ms"] == pytest.approx(10.0) and base["extra"]["tok_per_s"] == 6400
    assert mem["error"] == "diverged" and mem["ms"] is None and mem["extra"]["losses"] == [None] * 4
    assert "tok_per_s" not in mem["extra"] and "vs_base" not in mem["extra"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "0"], "--steps: must be an integer >= 4, got 0 (the first 3 steps are untimed warm-up)"),
        (["--steps", "-2"], "--steps: must be an integer >= 4, got -2"),
        (["--steps", "3"], "--steps: must be an integer >= 4, got 3"),
        (["--preset", "bogus"], "--preset: unknown preset 'bogus'; valid: olmo2_1M, "),
        (["--seq", "1"], "--seq: must be an integer >= 2, got 1"),
        (["--fsdp", "--seq", "32", "64"], "--fsdp times one sequence length; got --seq 32 64"),
        (["--fsdp", "--profile"], "--profile is for the single-device run"),
    ],
)
def test_bench_train_refuses_bad_flags(argv, message, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Bad flags: a usage error (exit 2) naming the value and what is valid, before any training."""
    with pytest.raises(SystemExit) as e:
        train_bench.main([*ARGS, *argv, "--json", str(tmp_path / "x.json")])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_write_payload_is_strict_json(tmp_path: Path) -> None:
    """Non-finite floats anywhere in the payload are written as null (strict JSON), atomically."""
    from olmo_miras_plugin.benchmarks.timing import write_payload

    out = tmp_path / "sub" / "p.json"
    write_payload(str(out), {"a": math.nan, "b": [math.inf, 1.5, (-math.inf, 2)], "c": {"d": math.nan, "e": "x"}})
    assert _strict_json(out) == {"a": None, "b": [None, 1.5, [None, 2]], "c": {"d": None, "e": "x"}}
    assert [p.name for p in out.parent.iterdir()] == ["p.json"]


def test_bench_train_memory_backprop_span(tmp_path: Path) -> None:
    """``--memory-backprop-span`` reaches the layers (named in the row) and the run trains;
    ``--profile`` is accepted (it profiles on CUDA only)."""
    out = tmp_path / "bench.json"
    train_bench.main([*ARGS, "--chunk", "16", "--memory-backprop-span", "32", "--profile", "--json", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert "backprop span 32" in rows[1]["name"]
    assert all(math.isfinite(l) for l in rows[1]["extra"]["losses"])
    with pytest.raises(Exception, match="backprop_span must be a positive multiple of chunk_size=16"):
        train_bench.main([*ARGS, "--chunk", "16", "--memory-backprop-span", "24", "--json", str(out)])


def _one_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(k, v)


def test_bench_train_fsdp_one_rank(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--fsdp`` (what ``torchrun`` runs), one CPU rank over gloo: strict JSON with finite losses,
    written atomically into a folder it creates; a diverged run writes a JSON without a step time
    and exits with an error, as the single-device path does."""
    _one_rank(monkeypatch)
    out = tmp_path / "new" / "fsdp.json"
    train_bench.main([*ARGS, "--fsdp", "--json", str(out)])
    data = _strict_json(out)
    assert data["world"] == 1 and len(data["losses"]) == 4 and all(math.isfinite(l) for l in data["losses"])
    assert data["error"] is None and data["step_ms"] > 0 and data["peak_gib"] is None
    monkeypatch.setattr(train_bench, "train_steps", lambda model, opt, x, steps, device: ([0.01] * steps, [math.nan] * steps))
    _one_rank(monkeypatch)
    with pytest.raises(SystemExit, match="non-finite loss"):
        train_bench.main([*ARGS, "--fsdp", "--json", str(out)])
    data = _strict_json(out)
    assert data["error"] == "diverged" and data["step_ms"] is None and data["tok_per_s_per_rank"] is None
