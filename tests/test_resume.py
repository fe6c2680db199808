"""Checkpoints (OLMo-core's distributed checkpointer): stop + resume reproduces an uninterrupted run
step by step (losses and data order), pretrained base checkpoints load, mismatches fail clearly."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Dict, Tuple

import pytest
import torch

from olmo_core.distributed.checkpoint import load_keys
from olmo_core.exceptions import OLMoConfigurationError
from olmo_core.train.callbacks import Callback

from olmo_miras_plugin.models import MirasMemoryConfig, tiny_miras
from olmo_miras_plugin.train import CheckpointMismatchError, MirasExperimentConfig, load_experiment, train

from miras_test_utils import save_tiny_hf_olmo2

STEPS = 6
STOP_AT = 3

RECORDS: Dict[str, Dict[str, Any]] = {}


@dataclass
class Recorder(Callback):
    """Per step: the CE loss and the instance indices of the batch (the data order), plus the model
    right after a checkpoint load. Kept in a module global: the trainer works on a copy."""

    key: str = "default"

    def _rec(self) -> Dict[str, Any]:
        return RECORDS.setdefault(self.key, {"loss": {}, "index": {}, "loaded": None})

    def pre_step(self, batch: Dict[str, Any]) -> None:
        self._rec()["index"][self.step] = batch["index"].tolist()

    def log_metrics(self, step: int, metrics: Dict[str, float]) -> None:
        if "train/CE loss" in metrics:
            self._rec()["loss"][step] = metrics["train/CE loss"]

    def post_checkpoint_loaded(self, path: Any) -> None:
        model = self.trainer.train_module.model  # type: ignore[attr-defined]
        self._rec()["loaded"] = {n: p.detach().clone() for n, p in model.state_dict().items()}


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stdlib")


def experiment(corpus: Path, run_dir: Path, key: str, *extra: str) -> MirasExperimentConfig:
    overrides = [
        f"--dataset.data_dir={corpus / 'tokens'}",
        f"--dataset.work_dir={corpus / 'cache'}",
        "--dataset.max_bytes=300000",
        "--dataset.sequence_length=128",
        "--train_module.max_sequence_length=128",
        "--train_module.rank_microbatch_size=256",
        "--train_module.segment_length=32",
        "--data_loader.global_batch_size=256",
        f"--trainer.save_folder={run_dir}",
        f"--trainer.max_duration.value={STEPS}",
        "--trainer.metrics_collect_interval=1",
        f"--trainer.callbacks.checkpointer.save_interval={STOP_AT}",
        "--trainer.callbacks.memory_diagnostics.interval=2",
        "--train_module.scheduler.warmup=2",
        *extra,
    ]
    config = load_experiment("tiny_miras", overrides)
    config.trainer.callbacks["recorder"] = Recorder(key=key)
    return config


@pytest.fixture(scope="module")
def runs(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Tuple[Path, Path]:
    """An uninterrupted run, and a run stopped after step 3 then resumed to step 6."""
    straight = tmp_path_factory.mktemp("straight")
    train(experiment(corpus_dir, straight, "straight"))
    resumed = tmp_path_factory.mktemp("resumed")
    train(experiment(corpus_dir, resumed, "first", f"--trainer.hard_stop={{value: {STOP_AT}, unit: steps}}"))
    assert not (resumed / f"step{STEPS}").exists()
    train(experiment(corpus_dir, resumed, "second"))
    return straight, resumed


def test_resume_matches_uninterrupted_run_step_by_step(runs: Tuple[Path, Path]) -> None:
    straight, first, second = RECORDS["straight"], RECORDS["first"], RECORDS["second"]
    assert sorted(first["loss"]) == list(range(1, STOP_AT + 1))
    assert sorted(second["loss"]) == list(range(STOP_AT + 1, STEPS + 1)), "resume must continue at step 4"
    assert second["loaded"] is not None
    stitched_loss = {**first["loss"], **second["loss"]}
    stitched_index = {**first["index"], **second["index"]}
    for step in range(1, STEPS + 1):
        assert stitched_index[step] == straight["index"][step], f"data order differs at step {step}"
        assert stitched_loss[step] == straight["loss"][step], f"loss differs at step {step}"


def test_rerunning_a_finished_run_does_nothing(
    runs: Tuple[Path, Path], corpus_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A requeued or repeated command (``make demo`` twice) must not fail re-saving the last step."""
    straight, _ = runs
    before = sorted(p.name for p in straight.iterdir())
    with caplog.at_level("INFO", logger="olmo_miras_plugin.train.experiment"):
        train(experiment(corpus_dir, straight, "rerun"))
    assert f"already holds the final checkpoint (step {STEPS} of {STEPS})" in caplog.text
    assert not RECORDS.get("rerun", {}).get("loss")  # no step trained
    assert sorted(p.name for p in straight.iterdir()) == before


def test_checkpoint_holds_memory_weights_and_optimizer_state(runs: Tuple[Path, Path]) -> None:
    straight, resumed = runs
    keys = [
        "model.blocks.1.attention.miras.memory.memory_init.0",
        "model.blocks.1.attention.miras.memory.w_theta.weight",
        "optim.state.blocks.1.attention.miras.memory.memory_init.0.exp_avg",
        "optim.state.blocks.1.attention.miras.gate.weight.exp_avg_sq",
    ]
    a = list(load_keys(straight / f"step{STEPS}" / "model_and_optim", keys))
    b = list(load_keys(resumed / f"step{STEPS}" / "model_and_optim", keys))
    for k, x, y in zip(keys, a, b):
        assert torch.equal(x, y), k
    assert a[2].abs().sum() > 0  # real optimizer state, not zeros


def test_mismatched_model_config_fails_naming_the_mismatch(
    runs: Tuple[Path, Path], corpus_dir: Path, tmp_path: Path
) -> None:
    straight, _ = runs
    # a memory layer the checkpoint doesn't have
    config = experiment(
        corpus_dir,
        tmp_path / "a",
        "mismatch",
        f"--trainer.load_path={straight}/step{STEPS}",
        "--model.memory.layers=[1,3]",
    )
    with pytest.raises(
        CheckpointMismatchError, match=r"missing from the checkpoint: model\.blocks\.3\.attention\.miras"
    ) as err:
        train(config)
    assert "model.memory.layers: checkpoint [1] vs now [1, 3]" in str(err.value)  # from the saved config.json
    # same parameters, different memory sizes
    config = experiment(
        corpus_dir, tmp_path / "b", "mismatch", f"--trainer.load_path={straight}/step{STEPS}", "--model.memory.depth=3"
    )
    with pytest.raises(CheckpointMismatchError, match=r"memory_init"):
        train(config)
    # resuming a memory-only run with the base unfrozen: no optimizer state for the base
    frozen_run = tmp_path / "frozen"
    train(experiment(corpus_dir, frozen_run, "frozen", "--model.freeze_base=true", "--trainer.max_duration.value=1"))
    config = experiment(
        corpus_dir, frozen_run, "mismatch", "--model.freeze_base=false", "--trainer.max_duration.value=2"
    )
    with pytest.raises(CheckpointMismatchError, match=r"no optimizer state for .*blocks\.0\.attention.*freeze_base"):
        train(config)


def test_resume_with_other_preset_values_is_refused(runs: Tuple[Path, Path], corpus_dir: Path) -> None:
    """A preset revision changes the preset's numbers, not a shape: the checkpoint would load and
    train on with other gates. Where the values differ, resuming needs the saved revision (the
    error names the values and the fix); explicit fields that make them equal, or a preset the
    revision did not change, resume."""
    from olmo_core.exceptions import OLMoConfigurationError

    from olmo_miras_plugin.models import PRESET_REVISION
    from olmo_miras_plugin.train.experiment import check_preset_revision

    _, resumed = runs
    before = sorted(p.name for p in resumed.iterdir())
    old = f"--model.memory.preset_revision={PRESET_REVISION - 1}"
    config = experiment(corpus_dir, resumed, "revision", old)
    with pytest.raises(
        OLMoConfigurationError,
        match=rf"trained with memory.preset_revision={PRESET_REVISION} .*this run's config has {PRESET_REVISION - 1}"
        rf".*eta_init 0.8 vs 0.9, eta_max 0.9 vs 1.0.*--model.memory.preset_revision={PRESET_REVISION}",
    ):
        train(config)
    assert sorted(p.name for p in resumed.iterdir()) == before  # refused before writing anything

    class Trainer:  # what check_preset_revision reads: the checkpoint it would load
        def __init__(self, folder: Path):
            self.save_folder, self.load_path = str(folder), None
            from olmo_core.train.checkpoint import CheckpointerConfig

            self.checkpointer = CheckpointerConfig().build(work_dir=str(folder))

    # the same values through explicit fields: accepted
    same = experiment(corpus_dir, resumed, "revision", old, "--model.memory.eta_init=0.8", "--model.memory.eta_max=0.9")
    check_preset_revision(Trainer(resumed), same)
    # the current revision: accepted (the resume test above trains through it)
    check_preset_revision(Trainer(resumed), experiment(corpus_dir, resumed, "revision"))
    # which values each revision builds: yaad's did not change from 2 to 3, titans' momentum did
    from olmo_miras_plugin.train.experiment import _revision_values

    def values(preset: str, revision: int, **explicit: float) -> dict:
        return _revision_values({"preset": preset, "preset_revision": revision, **explicit})

    assert values("yaad", 2) == values("yaad", 3) != values("yaad", 1)
    assert values("titans", 2) != values("titans", 3) == values("titans", 2, eta_init=0.8, eta_max=0.9)


def test_pretrained_base_checkpoint_loads_base_and_keeps_memory_init(corpus_dir: Path, tmp_path: Path) -> None:
    # a "pretrained OLMo": the tiny model's base (plain OLMo-core transformer, no memory) trained 2 steps
    base_run = tmp_path / "base"
    config = experiment(
        corpus_dir,
        base_run,
        "base",
        "--trainer.max_duration.value=2",
        "--trainer.callbacks.checkpointer.save_interval=2",
    )
    config.model = config.model.base  # type: ignore[attr-defined]
    config.train_module.segment_length = None
    config.trainer.callbacks.pop("memory_diagnostics")
    train(config)
    base_ckpt = base_run / "step2"

    # memory model from it: base weights from the checkpoint, memory as initialised, base frozen
    mem = experiment(
        corpus_dir,
        tmp_path / "mem",
        "from_base",
        f"--pretrained.path={base_ckpt}",
        "--model.freeze_base=true",
        "--trainer.max_duration.value=1",
    )
    train(mem)
    loaded = RECORDS["from_base"]["loaded"]
    names = sorted(loaded)
    base_names = [n for n in names if ".miras." not in n]
    saved = dict(zip(base_names, load_keys(base_ckpt / "model_and_optim", [f"model.{n}" for n in base_names])))
    for n in base_names:
        assert torch.equal(loaded[n], saved[n]), n
    fresh = experiment(corpus_dir, tmp_path / "fresh", "fresh").model.build(init_device="cpu")
    fresh.init_weights(device=torch.device("cpu"))
    mem_init = {n: p for n, p in fresh.state_dict().items() if ".miras." in n}
    assert mem_init
    for n, p in mem_init.items():
        assert torch.equal(loaded[n], p), n
    # the MAG branch starts at exactly zero output: the memory model starts as the base model
    assert torch.count_nonzero(loaded["blocks.1.attention.miras.memory.w_out.weight"]) == 0


def test_pretrained_required_for_pretrained_experiments() -> None:
    config = load_experiment("olmo3_7b_miras")
    with pytest.raises(Exception, match=r"--pretrained.path"):
        config.check_ready_to_train()
    ok = load_experiment("olmo3_7b_miras", ["--pretrained.path=/ckpt/olmo3-7b/step1000"])
    ok.check_ready_to_train()
    trainer = ok.resolved_trainer()
    assert trainer.load_path == "/ckpt/olmo3-7b/step1000"
    assert trainer.load_trainer_state is False and trainer.load_optim_state is False
    hf = load_experiment("olmo3_7b_miras", ["--pretrained.path=allenai/Olmo-3-1025-7B", "--pretrained.format=hf"])
    assert "pretrained_hf" in hf.resolved_trainer().callbacks
    with pytest.raises(Exception, match="both pretrained.path"):
        load_experiment("olmo3_7b_miras", ["--pretrained.path=/a", "--trainer.load_path=/b"])


def test_converted_checkpoint_dir_loads_and_a_missing_one_is_an_error(
    runs: Tuple[Path, Path], corpus_dir: Path, tmp_path: Path
) -> None:
    """convert_from_hf writes config.json + model_and_optim/ (no trainer state): --pretrained.path
    may name that directory. A load path without any checkpoint is an error, not a run from scratch."""
    straight, _ = runs
    converted = tmp_path / "from_hf"
    converted.mkdir()
    (converted / "model_and_optim").symlink_to(straight / f"step{STEPS}" / "model_and_optim")
    config = experiment(corpus_dir, tmp_path / "run", "converted", f"--pretrained.path={converted}")
    assert config.resolved_trainer().load_path == f"{converted}/model_and_optim"
    empty = tmp_path / "empty"
    empty.mkdir()
    for flag in (f"--pretrained.path={empty}", f"--trainer.load_path={empty}"):
        with pytest.raises(OLMoConfigurationError, match=f"no OLMo-core checkpoint at '{empty}'"):
            train(experiment(corpus_dir, tmp_path / "run2", "missing", flag))
    assert not (tmp_path / "run2").exists()


@dataclass
class Snapshot(Callback):
    """The model's weights when training starts (after pretrained weights were loaded)."""

    priority: ClassVar[int] = 50  # after HFPretrainedWeightsCallback (100)
    key: str = "snapshot"

    def pre_train(self) -> None:
        model = self.trainer.train_module.model  # type: ignore[attr-defined]
        RECORDS[self.key] = {n: p.detach().clone() for n, p in model.state_dict().items()}


def test_pretrained_hugging_face_checkpoint(corpus_dir: Path, tmp_path: Path) -> None:
    """An HF-format OLMo 2 checkpoint (random weights, tiny) converted by OLMo-core: the memory model
    starts out computing exactly the HF model's logits (memory branch at zero)."""
    pytest.importorskip("transformers")
    hf_dir = tmp_path / "hf"
    hf = save_tiny_hf_olmo2(hf_dir)

    config = experiment(
        corpus_dir,
        tmp_path / "run",
        "hf",
        f"--pretrained.path={hf_dir}",
        "--pretrained.format=hf",
        "--trainer.max_duration.value=1",
    )
    config.model = tiny_miras(
        window=None, memory=MirasMemoryConfig(layers=[1], chunk_size=32), freeze_base=True
    )  # OLMo 2
    config.trainer.callbacks["snapshot"] = Snapshot()
    train(config)

    model = config.model.build(init_device="cpu")
    model.load_state_dict(RECORDS["snapshot"])
    ids = torch.randint(0, 256, (2, 64))
    with torch.no_grad():
        ours = model(ids)
        theirs = hf(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
