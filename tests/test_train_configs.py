"""The experiment files build and validate without weights, data, GPUs or network (``--dry-run``):
models are built on the meta device only to count parameters."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from olmo_core.data import DataMix, NumpyPackedFSLDatasetConfig
from olmo_core.distributed.parallel import DataParallelType
from olmo_core.exceptions import OLMoConfigurationError
from olmo_core.train.callbacks import CheckpointerCallback

from olmo_miras_plugin.models import MirasModelConfig
from olmo_miras_plugin.train import (
    MemoryDiagnosticsCallback,
    MirasWandBCallback,
    StdlibFSLDatasetConfig,
    dry_run_report,
    load_experiment,
    parameter_counts,
)
from olmo_miras_plugin.train.experiment import STABLE_BACKPROP_SPAN, backprop_span

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = ["tiny_miras", "olmo2_1b_miras", "olmo3_7b_miras", "olmo3_32b_miras"]
PRETRAINED = ["olmo2_1b_miras", "olmo3_7b_miras", "olmo3_32b_miras"]

# Parameter counts of the released OLMo models each experiment starts from.
BASE_PARAMS = {
    "olmo2_1b_miras": 1_484_916_736,  # OLMo-2-0425-1B
    "olmo3_7b_miras": 7_298_617_344,  # OLMo 3 7B
    "olmo3_32b_miras": 32_234_279_936,  # OLMo 3 32B
}


def test_every_experiment_file_is_tested() -> None:
    assert sorted(p.stem for p in (REPO / "train_configs").glob("*.py")) == sorted(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_dry_run_builds_and_validates(name: str) -> None:
    config = load_experiment(name)
    assert config.run_name == name
    assert isinstance(config.model, MirasModelConfig)
    counts = parameter_counts(config)  # meta device: nothing allocated
    assert counts["total"] == counts["base"] + counts["memory"]
    assert counts["memory"] > 0 and counts["gates"] > 0
    report = dry_run_report(config)
    assert f"run_name='{name}'" in report
    assert f"total {counts['total']:,d} = base {counts['base']:,d} + memory {counts['memory']:,d}" in report
    assert "Trainable:" in report and "Segments:" in report


@pytest.mark.parametrize("name", PRETRAINED)
def test_pretrained_experiments_follow_the_recipe(name: str) -> None:
    config = load_experiment(name)
    counts = parameter_counts(config)
    assert counts["base"] == BASE_PARAMS[name]
    # base frozen by default: only memory + gates train
    assert counts["trainable"] == counts["memory"] and counts["frozen"] == counts["base"]
    assert config.pretrained.required and config.pretrained.path is None
    tm = config.train_module
    assert tm.dp_config is not None and tm.dp_config.name == DataParallelType.fsdp
    assert tm.dp_config.param_dtype == "bfloat16" and tm.dp_config.reduce_dtype == "float32"
    assert tm.ac_config is not None
    assert tm.segment_length is not None and tm.max_sequence_length >= 8 * tm.segment_length
    assert tm.memory_lr is not None and tm.gate_weight_decay == 0.0
    ds = config.dataset
    assert isinstance(ds, NumpyPackedFSLDatasetConfig)
    assert DataMix(ds.mix) == DataMix.OLMo_longmino_mix_0925
    assert ds.sequence_length == tm.max_sequence_length and not ds.generate_doc_lengths
    assert ds.tokenizer.identifier == "allenai/dolma2-tokenizer"
    cbs = config.trainer.callbacks
    ckpt = cbs["checkpointer"]
    assert isinstance(ckpt, CheckpointerCallback) and ckpt.save_interval and ckpt.ephemeral_save_interval
    assert isinstance(cbs["wandb"], MirasWandBCallback) and cbs["wandb"].enabled
    assert isinstance(cbs["memory_diagnostics"], MemoryDiagnosticsCallback)
    assert "memory/*" in cbs["console_logger"].metrics  # type: ignore[attr-defined]
    with pytest.raises(OLMoConfigurationError, match="--pretrained.path"):
        config.check_ready_to_train()
    # Backprop through the memory stays where it trained cleanly (docs/memory.md).
    assert backprop_span(config) == tm.segment_length * tm.bptt_segments <= STABLE_BACKPROP_SPAN


def test_long_backprop_span_warns(caplog: pytest.LogCaptureFixture) -> None:
    """Past the span measured stable, validation warns with the span and the fields to change;
    within it (the recipes), it says nothing."""
    with caplog.at_level("WARNING"):
        load_experiment("olmo2_1b_miras").validate()
    assert "backprops through" not in caplog.text
    config = load_experiment("olmo2_1b_miras", ["--train_module.bptt_segments=4"])
    assert backprop_span(config) == 8192
    with caplog.at_level("WARNING"):
        config.validate()
    assert "backprops through 8,192 tokens" in caplog.text and "--train_module.bptt_segments" in caplog.text
    whole = load_experiment("olmo2_1b_miras", ["--train_module.bptt_segments=null"])
    assert backprop_span(whole) == whole.dataset.sequence_length
    # The layer's own cut bounds the span too, and silences the warning.
    cut = load_experiment("olmo2_1b_miras", ["--train_module.bptt_segments=4", "--model.memory.backprop_span=1024"])
    assert backprop_span(cut) == 1024
    caplog.clear()
    with caplog.at_level("WARNING"):
        cut.validate()
    assert "backprops through" not in caplog.text
    assert cut.model.memory.neural_memory(2048, 16).backprop_span == 1024
    # The README's full-attention variant: no segments, the layer cuts.
    whole_cut = load_experiment("olmo2_1b_miras", ["--train_module.segment_length=null", "--model.memory.backprop_span=2048"])
    assert backprop_span(whole_cut) == 2048 and whole_cut.train_module.segment_length is None
    caplog.clear()
    with caplog.at_level("WARNING"):
        whole_cut.validate()
    assert "backprops through" not in caplog.text
    capped = load_experiment("olmo2_1b_miras", ["--model.memory.eta_max=0.95"])
    assert capped.model.memory.neural_memory(2048, 16).eta_max == 0.95
    assert config.model.memory.neural_memory(2048, 16).eta_max == 0.9  # the preset's cap


def test_tiny_is_offline_and_small() -> None:
    config = load_experiment("tiny_miras")
    assert isinstance(config.dataset, StdlibFSLDatasetConfig)
    assert config.dataset.tokenizer.vocab_size == 259
    assert not config.pretrained.required and config.train_module.dp_config is None
    assert config.trainer.save_folder.startswith("runs/")
    assert not config.trainer.callbacks["wandb"].enabled
    assert parameter_counts(config)["total"] < 2_000_000


def test_overrides_on_pretrained_experiments() -> None:
    config = load_experiment(
        "olmo3_7b_miras",
        [
            "--model.freeze_base=false",
            "--model.memory.layers=[1,5]",
            "--train_module.segment_length=8192",
            "--pretrained.path=/ckpts/olmo3-7b",
        ],
    )
    counts = parameter_counts(config)
    assert counts["trainable"] == counts["total"] and counts["frozen"] == 0
    assert config.model.memory_layers() == [1, 5]  # type: ignore[attr-defined]
    with pytest.raises(OLMoConfigurationError, match="segment_length=5000 must divide"):
        load_experiment("olmo3_7b_miras", ["--train_module.segment_length=5000"])
    with pytest.raises(OLMoConfigurationError, match="intra-document masking"):
        load_experiment("olmo3_7b_miras", ["--dataset.generate_doc_lengths=true"])
    with pytest.raises(OLMoConfigurationError, match="memory layer 40 out of range"):
        parameter_counts(load_experiment("olmo3_7b_miras", ["--model.memory.layers=[40]"]))


def test_cli_dry_run_of_a_pretrained_experiment() -> None:
    """The real CLI, in a fresh process, with the network unusable: must print and exit 0."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "https_proxy": "http://127.0.0.1:9",
        "http_proxy": "http://127.0.0.1:9",
    }
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/train.py",
            "train_configs/olmo3_32b_miras.py",
            "--dry-run",
            "--trainer.max_duration.value=1000",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Parameters: total 33,309,318,080" in proc.stdout or "Parameters: total" in proc.stdout
    assert "base 32,234,279,936" in proc.stdout
    assert "Pretrained: REQUIRED" in proc.stdout and "Duration:   1,000 tokens" in proc.stdout


def test_fast_linear_memory_overrides() -> None:
    """The README's fastest-GPU-path overrides reach the built memory: linear, no inner clip, the
    Triton kernels under CUDA graphs."""
    import math

    from olmo_miras_plugin.memory import MemoryImpl

    config = load_experiment(
        "olmo2_1b_miras",
        ["--model.memory.depth=1", "--model.memory.max_grad_norm=inf", "--model.memory.impl=triton_graphed"],
    )
    assert config.model.memory.depth == 1 and math.isinf(config.model.memory.max_grad_norm)
    nm = config.model.memory.neural_memory(2048, 16)
    assert nm.architecture.depth == 1 and nm.optimizer.max_grad_norm is None
    assert MemoryImpl(nm.impl) == MemoryImpl.triton_graphed
