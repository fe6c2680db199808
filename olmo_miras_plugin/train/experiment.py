"""Experiments: the config, experiment files, the dry-run report and the training run.

Experiment-file convention
--------------------------
An experiment is a Python file (``train_configs/<name>.py``) defining::

    def build_experiment(overrides: List[str]) -> MirasExperimentConfig: ...

It returns the whole experiment as OLMo-core config objects. The loader (:func:`load_experiment`)
then applies the CLI overrides on top with OLMo-core's dotted syntax (``Config.merge``), so the
file need not merge them itself; ``overrides`` is passed so a file *can* derive values from them
(OLMo-core's own scripts take overrides the same way). Names resolve as a path, or as a file in
``train_configs/`` (``tiny_miras`` -> ``train_configs/tiny_miras.py``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from olmo_core.config import Config, StrEnum
from olmo_core.data import DataMix, NumpyDataLoaderConfig, NumpyDatasetConfig
from olmo_core.distributed.utils import get_world_size
from olmo_core.exceptions import OLMoConfigurationError
from olmo_core.nn.config import ModelConfig
from olmo_core.train import LoadStrategy, TrainerConfig
from olmo_core.train.callbacks import ConfigSaverCallback
from olmo_core.train.checkpoint import Checkpointer
from olmo_core.utils import seed_all

from ..blocks import MemoryBlockType
from .callbacks import HFPretrainedWeightsCallback
from .overrides import apply_overrides
from .train_module import CheckpointMismatchError, MirasTrainModuleConfig, classify_parameters

__all__ = [
    "EXPERIMENT_FUNCTION",
    "ExperimentFileError",
    "MirasExperimentConfig",
    "PretrainedConfig",
    "PretrainedFormat",
    "dry_run_report",
    "load_experiment",
    "parameter_counts",
    "resolve_experiment_path",
    "train",
]

log = logging.getLogger(__name__)

EXPERIMENT_FUNCTION = "build_experiment"
REPO_ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS_DIR = "train_configs"


class ExperimentFileError(OLMoConfigurationError):
    """The experiment file can't be found, imported, or doesn't follow the convention."""


class PretrainedFormat(StrEnum):
    olmo_core = "olmo_core"
    """An OLMo-core (distributed) checkpoint: a step directory, or its ``model_and_optim``."""
    hf = "hf"
    """A Hugging Face ``transformers`` checkpoint (local directory or hub id)."""


@dataclass
class PretrainedConfig(Config):
    """Where the base weights come from when a run starts fresh (a resume always loads the save
    folder's latest checkpoint instead). The checkpoint holds no memory: the memory keeps its
    initialisation, which makes the model start exactly as the pretrained OLMo."""

    path: Optional[str] = None
    format: PretrainedFormat = PretrainedFormat.olmo_core
    required: bool = False
    """Refuse to train without ``path`` (experiments that only make sense from pretrained weights)."""
    revision: str = "main"
    """Hugging Face hub revision (``format=hf`` with a hub id)."""


@dataclass
class MirasExperimentConfig(Config):
    """A complete training experiment, as OLMo-core config objects."""

    run_name: str
    model: ModelConfig
    """Usually a :class:`~olmo_miras_plugin.models.MirasModelConfig`; a plain OLMo-core
    ``TransformerConfig`` works too (a no-memory baseline)."""
    dataset: NumpyDatasetConfig
    data_loader: NumpyDataLoaderConfig
    train_module: MirasTrainModuleConfig
    trainer: TrainerConfig
    pretrained: PretrainedConfig = field(default_factory=PretrainedConfig)
    init_seed: int = 12536
    backend: Optional[str] = None
    """Distributed backend under torchrun; ``None``: ``cpu:gloo,cuda:nccl`` with CUDA, else ``gloo``."""

    def validate(self) -> None:
        """Cross-field checks, with errors naming the fields involved."""
        tm = self.train_module
        tm.validate()
        seq = getattr(self.dataset, "sequence_length", None)
        if seq is not None:
            if seq > tm.max_sequence_length:
                raise OLMoConfigurationError(
                    f"dataset.sequence_length={seq} exceeds train_module.max_sequence_length={tm.max_sequence_length}"
                )
            if tm.segment_length is not None and seq != tm.max_sequence_length:
                raise OLMoConfigurationError(
                    f"segment-stateful training needs dataset.sequence_length ({seq}) == "
                    f"train_module.max_sequence_length ({tm.max_sequence_length})"
                )
            if self.data_loader.global_batch_size % seq != 0:
                raise OLMoConfigurationError(
                    f"data_loader.global_batch_size={self.data_loader.global_batch_size} (tokens) must be a "
                    f"multiple of dataset.sequence_length={seq}"
                )
        if getattr(self.dataset, "generate_doc_lengths", False) and _has_memory(self.model):
            raise OLMoConfigurationError(
                "dataset.generate_doc_lengths=true (intra-document masking) is not supported by memory "
                "blocks: the memory would carry across documents regardless; set it to false"
            )
        if tm.segment_length is not None and not _has_memory(self.model):
            raise OLMoConfigurationError(
                "train_module.segment_length needs a memory model (MirasModelConfig); "
                f"model is a {type(self.model).__name__}"
            )
        span = backprop_span(self)
        if span is not None and span > STABLE_BACKPROP_SPAN:
            log.warning(
                "the neural memory backprops through %s tokens (train_module.segment_length × bptt_segments, "
                "else the whole sequence); past ~%s its outer gradients were measured to explode on OLMo hidden "
                "states (docs/memory.md, 'Inner step size and backprop span'): watch memory/layer<i>/grad_norm, "
                "or set --train_module.segment_length / --train_module.bptt_segments so the product is <= %s "
                "(or --model.memory.backprop_span=%s: cuts inside each sequence, attention unchanged)",
                f"{span:,d}", f"{STABLE_BACKPROP_SPAN:,d}", f"{STABLE_BACKPROP_SPAN:,d}", STABLE_BACKPROP_SPAN,
            )
        vocab = getattr(self.model, "vocab_size", None) or getattr(
            getattr(self.model, "base", None), "vocab_size", None
        )
        tok_vocab = self.dataset.tokenizer.vocab_size
        if vocab is not None and tok_vocab > vocab:
            raise OLMoConfigurationError(f"tokenizer vocab_size={tok_vocab} exceeds the model's vocab_size={vocab}")
        if self.dataset.mix is not None and not isinstance(self.dataset.mix, DataMix):
            try:
                DataMix(self.dataset.mix)
            except ValueError:
                raise OLMoConfigurationError(
                    f"unknown data mix {self.dataset.mix!r}; valid: {', '.join(m.value for m in DataMix)}"
                ) from None
        if self.pretrained.path is not None:
            if self.pretrained.format not in set(PretrainedFormat):
                raise OLMoConfigurationError(
                    f"unknown pretrained.format {self.pretrained.format!r}; valid: "
                    + ", ".join(f.value for f in PretrainedFormat)
                )
            if self.pretrained.format == PretrainedFormat.olmo_core and self.trainer.load_path not in (
                None,
                self.pretrained.path,
            ):
                raise OLMoConfigurationError(
                    f"both pretrained.path ({self.pretrained.path}) and trainer.load_path "
                    f"({self.trainer.load_path}) are set; use one"
                )

    def check_ready_to_train(self) -> None:
        """What a dry run tolerates but a real run can't."""
        if self.pretrained.required and self.pretrained.path is None and self.trainer.load_path is None:
            raise OLMoConfigurationError(
                f"experiment '{self.run_name}' starts from pretrained OLMo weights: pass "
                "--pretrained.path=<OLMo-core checkpoint dir> (or a Hugging Face checkpoint with "
                "--pretrained.format=hf)"
            )

    def resolved_trainer(self) -> TrainerConfig:
        """``trainer`` with the pretrained source wired in: an OLMo-core checkpoint becomes the
        trainer's ``load_path`` (model weights only; used only when the save folder has no
        checkpoint, so resumes are unaffected), a Hugging Face one a loading callback."""
        trainer = self.trainer.copy()
        pre = self.pretrained
        if pre.path is None:
            if trainer.load_path is not None:
                trainer.load_path = _weights_dir(trainer.load_path)
            return trainer
        if pre.format == PretrainedFormat.olmo_core:
            trainer.load_path = _weights_dir(pre.path)
            trainer.load_strategy = LoadStrategy.always
            trainer.load_trainer_state = False
            trainer.load_optim_state = False
        else:
            trainer.add_callback("pretrained_hf", HFPretrainedWeightsCallback(path=pre.path, revision=pre.revision))
        return trainer


def _weights_dir(path: str) -> str:
    """``path``, or its ``model_and_optim/`` where only that is an OLMo-core checkpoint: the layout
    ``convert_from_hf`` writes (``config.json`` + ``model_and_optim/``, no trainer state), which
    OLMo-core would not recognise as a checkpoint one level up."""
    sub = f"{str(path).rstrip('/')}/model_and_optim"
    if not Checkpointer.dir_is_checkpoint(path) and Checkpointer.dir_is_checkpoint(sub):
        return sub
    return path


def _has_memory(model: ModelConfig) -> bool:
    return hasattr(model, "memory") and hasattr(model, "base")


STABLE_BACKPROP_SPAN = 2048
"""Tokens of backprop through the neural memory that trained cleanly on real text with the titans
preset (OLMo2-1B + MAL, H100, 2026-11-26: memory gradients ~1 at 1–2K, 1e4–1e17 at 4–8K)."""


def backprop_span(config: "MirasExperimentConfig") -> Optional[int]:
    """How many tokens gradients flow back through a neural memory's state in one training
    instance (``None``: the model has no neural memory, or the sequence length is unknown)."""
    model = config.model
    if not _has_memory(model) or model.memory.resolved_block_type() == MemoryBlockType.lm2:
        return None
    tm = config.train_module
    if tm.segment_length is not None and tm.bptt_segments is not None:
        span: Optional[int] = tm.segment_length * tm.bptt_segments
    else:
        span = getattr(config.dataset, "sequence_length", None)  # backprop through the whole instance
    layer_span = model.memory.backprop_span  # the layer's own cut inside each call
    if layer_span is not None:
        span = layer_span if span is None else min(span, layer_span)
    return span


# ---------------------------------------------------------------------------------------------- loading
def resolve_experiment_path(name: str) -> Path:
    """A path to an experiment file, or a name in ``train_configs/`` (cwd first, then the repo)."""
    candidates = [Path(name)]
    if not name.endswith(".py") and os.sep not in name and "/" not in name:
        candidates += [Path.cwd() / EXPERIMENTS_DIR / f"{name}.py", REPO_ROOT / EXPERIMENTS_DIR / f"{name}.py"]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    known = sorted(
        {
            p.stem
            for d in (Path.cwd() / EXPERIMENTS_DIR, REPO_ROOT / EXPERIMENTS_DIR)
            if d.is_dir()
            for p in d.glob("*.py")
        }
    )
    raise ExperimentFileError(
        f"unknown experiment file '{name}': no such file"
        + (f"; available experiments: {', '.join(known)} (in {EXPERIMENTS_DIR}/)" if known else "")
    )


def load_experiment(name: str, overrides: Optional[Sequence[str]] = None) -> MirasExperimentConfig:
    """Import an experiment file, call its ``build_experiment(overrides)``, apply the overrides
    (OLMo-core dotted syntax) and validate the result."""
    overrides = list(overrides or [])
    path = resolve_experiment_path(name)
    module_name = f"olmo_miras_experiments.{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ExperimentFileError(f"can't import experiment file '{path}'")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # so Config.merge can resolve classes defined in the file
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(module_name, None)
        raise ExperimentFileError(f"error importing experiment file '{path}': {type(e).__name__}: {e}") from e
    fn = getattr(module, EXPERIMENT_FUNCTION, None)
    if not callable(fn):
        raise ExperimentFileError(
            f"experiment file '{path}' defines no {EXPERIMENT_FUNCTION}(overrides) -> MirasExperimentConfig"
        )
    config = fn(list(overrides)) if inspect.signature(fn).parameters else fn()
    if not isinstance(config, MirasExperimentConfig):
        raise ExperimentFileError(
            f"{path.name}: {EXPERIMENT_FUNCTION}() returned {type(config).__name__}, expected MirasExperimentConfig"
        )
    config = apply_overrides(config, overrides, root_name="experiment")
    config.validate()
    return config


# ---------------------------------------------------------------------------------------------- reports
def parameter_counts(config: MirasExperimentConfig) -> Dict[str, int]:
    """Parameter counts from a model built on the meta device (nothing allocated, no weights):
    ``total``, ``base``, ``memory`` (memory weights + gates), ``gates``, ``trainable``, ``frozen``."""
    model = config.model.build(init_device="meta")
    groups = classify_parameters(model)
    sizes = groups.count(model)
    memory = sizes["memory"] + sizes["gates"]
    frozen_memory = sum(p.numel() for n, p in model.named_parameters() if ".miras." in n and not p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return dict(
        total=total,
        base=total - memory - frozen_memory,
        memory=memory + frozen_memory,
        gates=sizes["gates"],
        trainable=memory + sizes["base"],
        trainable_base=sizes["base"],
        frozen=sizes["frozen"],
    )


def _fmt_opts(lr: Optional[float], wd: Optional[float], optim: Any) -> str:
    lr = lr if lr is not None else getattr(optim, "lr", None)
    wd = wd if wd is not None else getattr(optim, "weight_decay", None)
    return f"lr={lr:g}, weight_decay={wd:g}" if lr is not None and wd is not None else f"lr={lr}, weight_decay={wd}"


def summary_lines(config: MirasExperimentConfig, counts: Dict[str, int]) -> List[str]:
    tm, tr, dl, ds = config.train_module, config.trainer, config.data_loader, config.dataset
    seq = getattr(ds, "sequence_length", tm.max_sequence_length)
    lines = [
        f"Parameters: total {counts['total']:,d} = base {counts['base']:,d} + memory {counts['memory']:,d}",
        f"Trainable:  {counts['trainable']:,d} (memory {counts['memory'] - counts['gates']:,d}, gates "
        f"{counts['gates']:,d}, base {counts['trainable_base']:,d}); frozen {counts['frozen']:,d}",
        f"Optimizer:  {type(tm.optim).__name__}; memory: {_fmt_opts(tm.memory_lr, tm.memory_weight_decay, tm.optim)}; "
        f"gates: {_fmt_opts(tm.gate_lr, tm.gate_weight_decay, tm.optim)}; base: {_fmt_opts(None, None, tm.optim)}",
    ]
    if tm.segment_length is not None:
        bptt = "the whole instance" if tm.bptt_segments is None else f"every {tm.bptt_segments} segment(s)"
        lines.append(
            f"Segments:   {seq:,d}-token instances as {tm.num_segments} segments of {tm.segment_length:,d} "
            f"(memory state carried across them; backprop truncated {bptt})"
        )
    lines.append(
        f"Batch:      {dl.global_batch_size:,d} tokens/step = {dl.global_batch_size // seq:,d} instances of "
        f"{seq:,d}; micro-batch {tm.rank_microbatch_size // tm.max_sequence_length} instance(s)/rank"
    )
    lines.append(f"Duration:   {tr.max_duration.value:,} {tr.max_duration.unit}")
    if ds.mix is not None:
        lines.append(f"Data:       mix {DataMix(ds.mix).value} under {ds.mix_base_dir}")
    elif ds.paths is not None:
        lines.append(f"Data:       {len(ds.paths)} path(s), e.g. {ds.paths[0]}")
    else:
        lines.append(f"Data:       {type(ds).__name__}")
    pre = config.pretrained
    if pre.path is not None:
        lines.append(f"Pretrained: {pre.format} checkpoint {pre.path}")
    elif pre.required:
        lines.append("Pretrained: REQUIRED to train: pass --pretrained.path=... (dry run only without it)")
    lines.append(f"Save:       {tr.save_folder}")
    return lines


def dry_run_report(config: MirasExperimentConfig) -> str:
    """The resolved config (as OLMo-core's scripts print it) and the parameter summary."""
    from rich.pretty import pretty_repr

    counts = parameter_counts(config)
    return pretty_repr(config, max_width=110) + "\n\n" + "\n".join(summary_lines(config, counts))


# ---------------------------------------------------------------------------------------------- training
def train(config: MirasExperimentConfig) -> None:
    """Build model, train module, data loader and trainer (OLMo-core), then ``Trainer.fit()``.
    Call inside ``prepare_training_environment`` / ``teardown_training_environment``."""
    config.check_ready_to_train()
    tm = config.train_module
    if get_world_size() > 1 and all(c is None for c in (tm.dp_config, tm.tp_config, tm.cp_config, tm.pp_config)):
        raise OLMoConfigurationError(
            f"running on {get_world_size()} ranks without a parallelism config would train unsynchronised "
            "replicas; set one, e.g. --train_module.dp_config='{name: fsdp}'"
        )
    resolved = config.resolved_trainer()
    if (
        resolved.load_path is not None
        and not Checkpointer.contains_checkpoint(resolved.save_folder)
        and not Checkpointer.contains_checkpoint(resolved.load_path)
    ):
        # OLMo-core would log "no checkpoint found" and train from random weights.
        raise OLMoConfigurationError(
            f"no OLMo-core checkpoint at '{resolved.load_path}' (pretrained.path / trainer.load_path): expected a "
            "step directory (model_and_optim/ + train/), a model_and_optim/ directory, a convert_from_hf output, "
            "or a folder of stepN directories"
        )
    seed_all(config.init_seed)
    model = config.model.build(init_device="meta")
    train_module = config.train_module.build(model)
    dataset = config.dataset.build()
    data_loader = config.data_loader.build(dataset, dp_process_group=train_module.dp_process_group)
    trainer = resolved.build(train_module, data_loader)
    for callback in trainer.callbacks.values():
        if isinstance(callback, ConfigSaverCallback):
            callback.config = config.as_config_dict()
            break
    check_preset_revision(trainer, config)
    done = _completed_step(trainer)
    if done is not None:
        # OLMo-core would load it, train no step, then fail re-saving the same final step.
        log.info(f"'{trainer.save_folder}' already holds the final checkpoint (step {done:,d} of "
                 f"{trainer.max_steps:,d}): training is complete, nothing to do. Raise "
                 "--trainer.max_duration.value to train further, or pick another --trainer.save_folder.")
        return
    try:
        trainer.fit()
    except CheckpointMismatchError as e:
        hint = _checkpoint_config_diff(trainer, config)
        if hint:
            raise CheckpointMismatchError(f"{e}\n{hint}") from e
        raise


def _completed_step(trainer: Any) -> Optional[int]:
    """The step of the save folder's latest checkpoint if it is at or past the run's last step."""
    if not trainer.checkpointer.contains_checkpoint(trainer.save_folder):
        return None
    name = str(trainer.checkpointer.latest_checkpoint(trainer.save_folder)).rstrip("/").rsplit("/", 1)[-1]
    try:
        step, max_steps = int(name[len("step"):]), trainer.max_steps
    except (ValueError, RuntimeError):  # not a stepN folder, or a duration in tokens
        return None
    return step if max_steps is not None and step >= max_steps else None


def _flatten(d: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(d, dict):
        out: Dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def _saved_model_config(trainer: Any) -> Optional[tuple]:
    """The model config saved next to the checkpoint the trainer will load (``config.json``,
    written by OLMo-core's ``ConfigSaverCallback``) and its path; None if there is none."""
    import json

    from olmo_core.io import join_path, resource_path

    ckpt = None
    if trainer.checkpointer.contains_checkpoint(trainer.save_folder):
        ckpt = trainer.checkpointer.latest_checkpoint(trainer.save_folder)
    elif trainer.load_path is not None:
        ckpt = trainer.load_path
        if not trainer.checkpointer.dir_is_checkpoint(ckpt):
            ckpt = trainer.checkpointer.latest_checkpoint(ckpt)
    if ckpt is None:
        return None
    try:
        with open(resource_path(ckpt, "config.json")) as f:
            saved = json.load(f).get("model", {})
    except FileNotFoundError:
        return None
    return saved, join_path(ckpt, "config.json")


_REVISED_FIELDS = ("theta_init", "theta_max", "eta_init", "eta_max")
"""The ``NeuralMemoryConfig`` fields that preset revisions have changed."""


def _revision_values(memory: Dict[str, Any]) -> Dict[str, Any]:
    """The revised fields' values a memory config (as a dict) builds, through the same
    resolution as the model (``MirasMemoryConfig.neural_memory``: explicit fields, else the
    revision's values, else the current preset's); the sizes don't affect them."""
    from ..models import MirasMemoryConfig

    given = {k: memory[k] for k in ("preset", "preset_revision", *_REVISED_FIELDS) if memory.get(k) is not None}
    built = MirasMemoryConfig(**given).neural_memory(d_model=64, attn_heads=1)
    return {k: getattr(built, k) for k in _REVISED_FIELDS}


def check_preset_revision(trainer: Any, config: MirasExperimentConfig) -> None:
    """Refuse to load a checkpoint whose memory was trained with other preset values.

    A config names its preset, not the preset's numbers, and revisions change the numbers
    (``models.PRESET_REVISION``) without changing any shape, so the checkpoint would load and
    silently train on with other gates. The saved config (marked revision 1 when it predates the
    field) says which revision it was; where that revision's values differ from this run's for
    the preset (and no explicit field makes them equal), the user passes it to resume exactly."""
    from ..models import upgrade_saved_config

    memory = getattr(config.model, "memory", None)
    if memory is None:
        return
    try:
        found = _saved_model_config(trainer)
    except Exception as e:  # noqa: BLE001 - OLMo-core reports an unreadable checkpoint itself
        log.warning("Could not read the config saved with the checkpoint (%s); memory.preset_revision not checked", e)
        return
    if found is None:
        return
    saved, where = found
    saved_memory = upgrade_saved_config(saved).get("memory")
    if not isinstance(saved_memory, dict) or "preset_revision" not in saved_memory:
        return  # a base model without memory (e.g. the pretrained OLMo being extended)
    if saved_memory["preset_revision"] == memory.preset_revision or saved_memory.get("preset") != memory.preset:
        return  # same revision; or another preset, which the user chose explicitly
    ours = _revision_values(dataclasses.asdict(memory))
    theirs = _revision_values(saved_memory)
    differ = [k for k in _REVISED_FIELDS if ours[k] != theirs[k]]
    if differ:
        listed = ", ".join(f"{k} {theirs[k]} vs {ours[k]}" for k in differ)
        raise OLMoConfigurationError(
            f"the checkpoint's memory was trained with memory.preset_revision={saved_memory['preset_revision']} "
            f"({where}), this run's config has {memory.preset_revision}, and the {memory.preset} preset's values "
            f"differ ({listed}; checkpoint vs now). Resume with "
            f"--model.memory.preset_revision={saved_memory['preset_revision']}, or start in a new save folder"
        )


def _checkpoint_config_diff(trainer: Any, config: MirasExperimentConfig, limit: int = 12) -> str:
    """How the model config differs from the one saved next to the checkpoint being loaded; empty
    if unknown."""
    try:
        found = _saved_model_config(trainer)
        if found is None:
            return ""
        saved, where = found
    except Exception:  # noqa: BLE001 - the hint is best-effort; the mismatch error stands on its own
        return ""
    ours, theirs = _flatten(config.as_config_dict()["model"]), _flatten(saved)
    diffs = [
        f"model.{k}: checkpoint {theirs.get(k, '<unset>')!r} vs now {ours.get(k, '<unset>')!r}"
        for k in sorted(set(ours) | set(theirs))
        if ours.get(k) != theirs.get(k)
    ]
    if not diffs:
        return ""
    more = f"\n  ... (+{len(diffs) - limit} more)" if len(diffs) > limit else ""
    return f"model config differences vs {where}:\n  " + "\n  ".join(diffs[:limit]) + more


def single_process(config: MirasExperimentConfig) -> MirasExperimentConfig:
    """Drop the parallelism configs for a single-process run (as OLMo-core's ``train_single``)."""
    tm = config.train_module
    dropped = [name for name in ("dp_config", "tp_config", "cp_config", "ep_config") if getattr(tm, name) is not None]
    if dropped:
        log.warning("Single process: ignoring train_module.%s (run with torchrun to use them)", ", ".join(dropped))
        tm = dataclasses.replace(tm, **{name: None for name in dropped})
        config = dataclasses.replace(config, train_module=tm)
    return config


def default_backend(config: MirasExperimentConfig) -> str:
    if config.backend is not None:
        return config.backend
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
