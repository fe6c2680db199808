"""Training entry point: CLI, overrides, train-module hooks, diagnostics and W&B on the tiny
experiment shrunk to a few-second run (same code path as ``python scripts/train.py tiny_miras``)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch

from olmo_core.data.utils import get_labels
from olmo_core.exceptions import OLMoConfigurationError, OLMoEnvironmentError
from olmo_core.train.callbacks import Callback
from olmo_core.train.train_module import TransformerActivationCheckpointingConfig

from olmo_miras_plugin.train import (
    MirasExperimentConfig,
    MirasWandBCallback,
    OverrideError,
    classify_parameters,
    load_experiment,
    train,
)
from olmo_miras_plugin.train.cli import main
from olmo_miras_plugin.train.experiment import ExperimentFileError, single_process

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

METRICS: Dict[str, Dict[int, Dict[str, float]]] = {}


@dataclass
class MetricsRecorder(Callback):
    """Keeps every logged metric by step (in a module global: the trainer works on a copy)."""

    key: str = "default"

    def log_metrics(self, step: int, metrics: Dict[str, float]) -> None:
        METRICS.setdefault(self.key, {}).setdefault(step, {}).update(metrics)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stdlib")


def micro_overrides(corpus: Path, run_dir: Path, steps: int = 4, **extra: Any) -> List[str]:
    """tiny_miras shrunk: 128-token instances as 4 segments of 32, 2 instances per step."""
    ov = {
        "dataset.data_dir": corpus / "tokens",
        "dataset.work_dir": corpus / "cache",
        "dataset.max_bytes": 300_000,
        "dataset.sequence_length": 128,
        "train_module.max_sequence_length": 128,
        "train_module.rank_microbatch_size": 256,
        "train_module.segment_length": 32,
        "data_loader.global_batch_size": 256,
        "trainer.save_folder": run_dir,
        "trainer.max_duration.value": steps,
        "trainer.metrics_collect_interval": 1,
        "trainer.callbacks.console_logger.log_interval": 1,
        "trainer.callbacks.console_logger.metrics_log_interval": 1,
        "trainer.callbacks.memory_diagnostics.interval": 1,
        "trainer.callbacks.checkpointer.save_interval": 1000,
        "train_module.scheduler.warmup": 2,
    }
    ov.update(extra)
    return [f"--{k}={v}" for k, v in ov.items()]


def micro_experiment(corpus: Path, run_dir: Path, key: str, steps: int = 4, **extra: Any) -> MirasExperimentConfig:
    config = load_experiment("tiny_miras", micro_overrides(corpus, run_dir, steps, **extra))
    config.trainer.callbacks["recorder"] = MetricsRecorder(key=key)
    return config


def build_train_module(config: MirasExperimentConfig):
    model = config.model.build(init_device="meta")
    return config.train_module.build(model)


def one_batch(config: MirasExperimentConfig, n: int = 2, seed: int = 0) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (n, config.train_module.max_sequence_length), generator=g)
    return {"input_ids": ids}


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_runs_tiny_for_a_few_steps_and_checkpoints(corpus_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = micro_overrides(corpus_dir, run, steps=3)
    proc = subprocess.run(
        [PYTHON, "scripts/train.py", "tiny_miras", *args, "--trainer.callbacks.checkpointer.save_interval=3"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "WANDB_MODE": "disabled"},
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Training complete" in out
    assert "memory/layer1/theta" in out and "train/CE loss" in out
    assert (run / "step3" / "model_and_optim" / ".metadata").is_file()
    assert (run / "step3" / "config.json").is_file()


def test_cli_errors_name_the_bad_value(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["no_such_experiment"]) == 2
    err = capsys.readouterr().err
    assert "unknown experiment file 'no_such_experiment'" in err and "tiny_miras" in err

    assert main(["tiny_miras", "--dry-run", "--trainer.max_duraton.value=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown override key 'trainer.max_duraton.value'" in err and "max_duration" in err

    assert main(["tiny_miras", "--dry-run", "--nope.x=1"]) == 2
    assert "'experiment' (MirasExperimentConfig) has no field 'nope'" in capsys.readouterr().err

    assert main(["tiny_miras", "--dry-run", "--trainer.max_duration.unit=fortnights"]) == 2
    assert "trainer.max_duration.unit=fortnights" in capsys.readouterr().err

    assert main(["tiny_miras", "--dry-run", "--train_module.segment_length=100"]) == 2
    assert "segment_length=100 must divide" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        main(["--dry-run"])


def test_overrides_use_olmo_core_merge(corpus_dir: Path, tmp_path: Path) -> None:
    config = load_experiment(
        "tiny_miras",
        [
            "--model.memory.layers=[1,3]",
            "--model.memory.preset=yaad",
            "--train_module.optim.lr=1e-4",
            "--trainer.callbacks.wandb.enabled=true",
            "--train_module.dp_config={name: fsdp}",
        ],
    )
    assert config.model.memory.layers == [1, 3] and config.model.memory.preset == "yaad"  # type: ignore[attr-defined]
    assert config.train_module.optim.lr == 1e-4  # type: ignore[attr-defined]
    assert config.trainer.callbacks["wandb"].enabled
    assert config.train_module.dp_config is not None and config.train_module.dp_config.name == "fsdp"
    assert single_process(config).train_module.dp_config is None
    with pytest.raises(OverrideError, match=r"'trainer.callbacks' has no entry 'wandbb'.*did you mean 'wandb'"):
        load_experiment("tiny_miras", ["--trainer.callbacks.wandbb.enabled=true"])
    with pytest.raises(OLMoConfigurationError, match="doesn't work with DDP"):
        load_experiment("tiny_miras", ["--train_module.dp_config={name: ddp}"])
    with pytest.raises(OverrideError, match=r"'train_module.dp_config' is None"):
        load_experiment("tiny_miras", ["--train_module.dp_config.name=fsdp"])
    # A bare --key is True to OLMo-core, which an int or float field would take as 1.
    with pytest.raises(OverrideError, match=r"'--train_module.optim.lr' has no value: write --train_module.optim.lr=VALUE"):
        load_experiment("tiny_miras", ["--train_module.optim.lr"])
    assert not load_experiment("tiny_miras", ["--trainer.callbacks.wandb.enabled=false"]).trainer.callbacks["wandb"].enabled
    assert load_experiment(
        "tiny_miras", ["--trainer.callbacks.wandb.enabled=false", "--trainer.callbacks.wandb.enabled"]
    ).trainer.callbacks["wandb"].enabled  # a boolean may be a bare flag


def test_experiment_file_convention(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n")
    with pytest.raises(ExperimentFileError, match="defines no build_experiment"):
        load_experiment(str(bad))
    wrong = tmp_path / "wrong.py"
    wrong.write_text("def build_experiment(overrides):\n    return 42\n")
    with pytest.raises(ExperimentFileError, match="returned int"):
        load_experiment(str(wrong))
    own = tmp_path / "own.py"
    own.write_text(
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('tiny', {str(REPO / 'train_configs' / 'tiny_miras.py')!r})\n"
        "tiny = importlib.util.module_from_spec(spec); spec.loader.exec_module(tiny)\n"
        "def build_experiment(overrides):\n"
        "    c = tiny.build_experiment(overrides)\n"
        "    c.run_name = 'own'\n"
        "    return c\n"
    )
    config = load_experiment(str(own), ["--trainer.max_duration.value=7"])
    assert config.run_name == "own" and config.trainer.max_duration.value == 7


# ---------------------------------------------------------------------------------------------- training
def test_tiny_training_lowers_loss_and_records_memory_diagnostics(corpus_dir: Path, tmp_path: Path) -> None:
    config = micro_experiment(corpus_dir, tmp_path / "run", key="loss", steps=25)
    train(config)
    metrics = METRICS["loss"]
    losses = [metrics[s]["train/CE loss"] for s in sorted(metrics) if "train/CE loss" in metrics[s]]
    assert len(losses) == 25 and all(math.isfinite(x) for x in losses)
    assert losses[0] > 5.0  # ~ln(259) at init
    assert sum(losses[-5:]) / 5 < losses[0] - 1.5, losses
    last = metrics[25]
    for name in ("surprise_norm", "theta", "eta", "alpha", "weight_norm", "mag_gate", "grad_norm"):
        value = last[f"memory/layer1/{name}"]
        assert math.isfinite(value), name
    assert 0 < last["memory/layer1/theta"] < 1 and 0 < last["memory/layer1/alpha"] < 1
    assert last["memory/layer1/surprise_norm"] > 0 and last["memory/layer1/weight_norm"] > 0
    assert last["memory/layer1/grad_norm"] > 0
    assert 0 < last["memory/layer1/effective_step_max"] < math.inf  # its value: test_memory_core.py
    # one LR per optimizer group: embeddings (no decay), memory, gates, base
    assert {f"optim/LR (group {i})" for i in range(4)} <= set(last)


def test_param_groups_freeze_and_only_trainable_in_optimizer(corpus_dir: Path, tmp_path: Path) -> None:
    config = load_experiment(
        "tiny_miras",
        micro_overrides(corpus_dir, tmp_path / "run")
        + [
            "--model.freeze_base=true",
            "--train_module.memory_lr=1e-3",
            "--train_module.memory_weight_decay=0.05",
            "--train_module.gate_lr=2e-3",
            "--train_module.gate_weight_decay=0.0",
        ],
    )
    # activation checkpointing renames parameters (_checkpoint_wrapped_module); groups must survive it
    config.train_module.ac_config = TransformerActivationCheckpointingConfig()
    tm = build_train_module(config)
    groups = classify_parameters(tm.model)
    assert groups.base == [] and groups.frozen and groups.memory and groups.gates
    assert all(".miras." in n for n in groups.memory + groups.gates)
    assert any("_checkpoint_wrapped_module" in n for n in groups.memory)
    assert any(n.endswith("w_theta.weight") for n in groups.gates) and any("miras.gate." in n for n in groups.gates)
    params = dict(tm.model.named_parameters())
    in_optim = {id(p) for g in tm.optim.param_groups for p in g["params"]}
    assert in_optim == {id(params[n]) for n in groups.memory + groups.gates}
    by_id = {id(p): g for g in tm.optim.param_groups for p in g["params"]}
    mem_group, gate_group = by_id[id(params[groups.memory[0]])], by_id[id(params[groups.gates[0]])]
    assert (mem_group["lr"], mem_group["weight_decay"]) == (1e-3, 0.05)
    assert (gate_group["lr"], gate_group["weight_decay"]) == (2e-3, 0.0)
    assert all(by_id[id(params[n])] is gate_group for n in groups.gates)

    # The config's own override on some memory parameters changes only the options it names; they
    # keep memory_lr (it used to hand them the base LR silently).
    from dataclasses import replace

    from olmo_core.optim import OptimGroupOverride

    from olmo_miras_plugin.train.train_module import memory_group_overrides

    own = list(config.train_module.optim.group_overrides or [])
    optim = replace(config.train_module.optim, lr=2e-5, group_overrides=own + [
        OptimGroupOverride(params=["*.miras.norm.weight"], opts={"weight_decay": 0.0})
    ])
    kw = dict(memory_lr=1e-3, memory_weight_decay=0.05, gate_lr=2e-3, gate_weight_decay=0.0)
    built = memory_group_overrides(tm.model, optim, **kw).build(tm.model)
    by_id = {id(p): g for g in built.param_groups for p in g["params"]}
    norms = [n for n in groups.memory if n.endswith(".miras.norm.weight")]
    assert norms and all((by_id[id(params[n])]["lr"], by_id[id(params[n])]["weight_decay"]) == (1e-3, 0.0) for n in norms)
    others = [n for n in groups.memory if n not in norms]
    assert all((by_id[id(params[n])]["lr"], by_id[id(params[n])]["weight_decay"]) == (1e-3, 0.05) for n in others)
    assert sum(len(g["params"]) for g in built.param_groups) == len(groups.memory + groups.gates)
    bad = replace(optim, group_overrides=[OptimGroupOverride(params=["*.miras.norm.weight", "nope*"], opts={})])
    with pytest.raises(OLMoConfigurationError, match="pattern 'nope\\*' does not match any parameters"):
        memory_group_overrides(tm.model, bad, **kw)

    # one step: the frozen base doesn't move, the memory does
    before = {n: p.detach().clone() for n, p in tm.model.named_parameters()}

    class _Trainer:
        global_batch_size = 256
        dp_process_group = None
        global_step = 1
        max_steps = 10

        def record_metric(self, *args: Any, **kwargs: Any) -> None:
            pass

        record_ce_loss = record_metric

    tm._trainer = _Trainer()  # type: ignore[assignment]
    tm.train_batch(one_batch(config))
    tm.optim_step()
    moved = {n for n, p in tm.model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved and moved <= set(groups.memory + groups.gates)
    assert not moved & set(groups.frozen)


def _grads_after(config: MirasExperimentConfig, batch: Dict[str, torch.Tensor]):
    torch.manual_seed(0)
    tm = build_train_module(config)
    tm._trainer = type("T", (), {"record_metric": lambda *a, **k: None, "record_ce_loss": lambda *a, **k: None})()  # type: ignore[assignment]
    tm._set_model_mode("train")
    b = {"input_ids": batch["input_ids"].clone()}
    b["labels"] = get_labels(b)
    num = (b["labels"] != -100).sum()
    with tm._train_microbatch_context(0, 1):
        ids, labels, kw = tm._prepare_batch(b)
        out = tm.model_forward(ids, labels=labels, loss_reduction="sum", loss_div_factor=num, return_logits=False, **kw)
        out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in tm.model.named_parameters() if p.grad is not None}
    return float(out.ce_loss), {n.replace("_checkpoint_wrapped_module.", ""): g for n, g in grads.items()}


def test_segment_training_equals_whole_sequence_with_full_backprop(corpus_dir: Path, tmp_path: Path) -> None:
    base = micro_overrides(corpus_dir, tmp_path / "run")
    whole = load_experiment("tiny_miras", base + ["--train_module.segment_length=null"])
    segmented = load_experiment("tiny_miras", base + ["--train_module.bptt_segments=null"])
    truncated = load_experiment("tiny_miras", base + ["--train_module.bptt_segments=1"])
    with_ac = load_experiment("tiny_miras", base + ["--train_module.bptt_segments=2"])
    with_ac.train_module.ac_config = TransformerActivationCheckpointingConfig()
    no_ac = load_experiment("tiny_miras", base + ["--train_module.bptt_segments=2"])
    batch = one_batch(whole)

    loss_w, g_w = _grads_after(whole, batch)
    loss_s, g_s = _grads_after(segmented, batch)
    loss_t, g_t = _grads_after(truncated, batch)
    loss_a, g_a = _grads_after(with_ac, batch)
    loss_n, g_n = _grads_after(no_ac, batch)
    # 4 segments with the state carried and one graph == the whole sequence at once
    assert loss_s == pytest.approx(loss_w, rel=1e-5)
    assert g_s.keys() == g_w.keys()
    for n in g_w:
        torch.testing.assert_close(g_s[n], g_w[n], rtol=1e-4, atol=1e-6, msg=n)
    # truncated backprop: same forward, different (but finite) memory gradients
    assert loss_t == pytest.approx(loss_w, rel=1e-5)
    # (the carried keys/values of the full-attention layer no longer pass gradient back)
    carried = "blocks.3.attention.w_k.weight"
    assert not torch.allclose(g_t[carried], g_w[carried], rtol=1e-3, atol=1e-7)
    assert all(torch.isfinite(g).all() for g in g_t.values())
    # activation checkpointing replays each block from the carried state: identical gradients
    assert loss_a == pytest.approx(loss_n, rel=1e-6)
    for n in g_n:
        torch.testing.assert_close(g_a[n], g_n[n], rtol=1e-5, atol=1e-7, msg=n)


def test_segment_mode_eval_concatenates_segments(corpus_dir: Path, tmp_path: Path) -> None:
    base = micro_overrides(corpus_dir, tmp_path / "run")
    batch = one_batch(load_experiment("tiny_miras", base))
    outs = []
    for seg in ("null", "32"):
        torch.manual_seed(0)
        tm = build_train_module(load_experiment("tiny_miras", base + [f"--train_module.segment_length={seg}"]))
        out = tm.eval_batch({"input_ids": batch["input_ids"].clone()}, labels=get_labels(batch))
        outs.append(out.ce_loss)
    assert outs[1].shape == outs[0].shape == batch["input_ids"].shape
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)


def _torchrun_losses(corpus: Path, run_dir: Path, *extra: str) -> List[float]:
    saver = (
        "--trainer.callbacks.metric_saver={_CLASS_: olmo_core.train.callbacks.MetricSaverCallback, "
        "save_interval: 1, metrics_to_capture: ['train/CE loss']}"
    )
    cmd = [
        PYTHON, "-m", "torch.distributed.run", "--nproc-per-node=2", "scripts/train.py", "tiny_miras",
        *micro_overrides(corpus, run_dir, steps=3),
        "--train_module.rank_microbatch_size=128",  # 2 micro-batches per rank and step
        "--data_loader.global_batch_size=512",
        "--train_module.dp_config={name: fsdp}",
        saver,
        *extra,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return [json.loads((run_dir / f"metrics_step{s}.json").read_text())["train/CE loss"] for s in (1, 2, 3)]


@pytest.mark.slow
def test_fsdp_two_ranks_with_activation_checkpointing_and_segments(corpus_dir: Path, tmp_path: Path) -> None:
    """FSDP2 over 2 CPU ranks (gloo) with full activation checkpointing: every block is recomputed
    in backward from the memory state its segment started with, so the run matches one without
    checkpointing."""
    plain = _torchrun_losses(corpus_dir, tmp_path / "plain")
    ckpt = _torchrun_losses(corpus_dir, tmp_path / "ac", "--train_module.ac_config={mode: full}")
    assert plain[0] > plain[-1]
    assert ckpt == pytest.approx(plain, rel=1e-6, abs=0)


# ---------------------------------------------------------------------------------------------- W&B
def test_wandb_offline_run(corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    config = micro_experiment(corpus_dir, run, key="wandb", steps=2, **{"trainer.callbacks.wandb.enabled": "true"})
    train(config)
    runs = list((run / "wandb").glob("wandb/offline-run-*"))
    assert runs, list((run / "wandb").rglob("*"))[:20]
    assert any(runs[0].glob("*.wandb"))


def test_wandb_online_without_credentials_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cb = MirasWandBCallback(enabled=True, name="x")
    assert cb.resolved_mode() == "online"
    monkeypatch.setattr(MirasWandBCallback, "_logged_in", lambda self: False)
    with pytest.raises(OLMoEnvironmentError, match="wandb login"):
        cb.pre_train()
    assert MirasWandBCallback(mode="offline").resolved_mode() == "offline"
    with pytest.raises(OLMoConfigurationError, match="unknown W&B mode"):
        MirasWandBCallback(mode="sometimes").resolved_mode()
