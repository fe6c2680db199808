"""``scripts/bench_train.py`` on CPU: both rows, their losses in the table and JSON, and a loud
failure when a run diverges (its step times would not be a training result)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from olmo_miras_plugin.benchmarks import train_bench

ARGS = ["--device", "cpu", "--preset", "olmo2_30M", "--vocab-size", "512", "--seq", "64", "--steps", "2", "--impl", "chunked"]


def test_bench_train_reports_losses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    train_bench.main([*ARGS, "--json", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert [r["name"].split(" ")[1] for r in rows] == ["base", "+"]
    for r in rows:
        assert len(r["extra"]["losses"]) == 2 and all(math.isfinite(l) for l in r["extra"]["losses"])
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
    """``--fsdp`` (what ``torchrun`` runs), one CPU rank over gloo: JSON with finite losses; a
    diverged run exits with an error, as the single-device path does."""
    _one_rank(monkeypatch)
    out = tmp_path / "fsdp.json"
    train_bench.main([*ARGS, "--fsdp", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["world"] == 1 and len(data["losses"]) == 2 and all(math.isfinite(l) for l in data["losses"])
    real = train_bench.train_steps
    monkeypatch.setattr(train_bench, "train_steps", lambda *a, **k: (real(*a, **k)[0], [math.nan, math.nan]))
    _one_rank(monkeypatch)
    with pytest.raises(SystemExit, match="non-finite loss"):
        train_bench.main([*ARGS, "--fsdp", "--json", str(out)])
