"""Training memory models with OLMo-core's trainer: experiment configs, train module, callbacks.

- ``experiment.py``   ``MirasExperimentConfig``, experiment files, dry-run report, ``train()``
- ``overrides.py``    dotted CLI overrides (OLMo-core ``Config.merge``) with clear errors
- ``train_module.py`` ``MirasTrainModule[Config]``: optimizer groups for memory / gates, segment-
                      stateful training with truncated backprop, checkpoint checks
- ``callbacks.py``    memory diagnostics, W&B (offline-capable), Hugging Face base weights
- ``recipes.py``      data / FSDP / activation checkpointing / callbacks shared by the OLMo experiments
- ``data.py``         the offline stdlib corpus as an OLMo-core dataset config
- ``cli.py``          what ``scripts/train.py`` runs
"""

from .callbacks import HFPretrainedWeightsCallback, MemoryDiagnosticsCallback, MirasWandBCallback
from .data import StdlibFSLDatasetConfig
from .experiment import (
    ExperimentFileError,
    MirasExperimentConfig,
    PretrainedConfig,
    PretrainedFormat,
    dry_run_report,
    load_experiment,
    parameter_counts,
    train,
)
from .overrides import OverrideError, apply_overrides
from .train_module import (
    CheckpointMismatchError,
    MirasTrainModule,
    MirasTrainModuleConfig,
    classify_parameters,
    memory_group_overrides,
)

__all__ = [
    "CheckpointMismatchError",
    "ExperimentFileError",
    "HFPretrainedWeightsCallback",
    "MemoryDiagnosticsCallback",
    "MirasExperimentConfig",
    "MirasTrainModule",
    "MirasTrainModuleConfig",
    "MirasWandBCallback",
    "OverrideError",
    "PretrainedConfig",
    "PretrainedFormat",
    "StdlibFSLDatasetConfig",
    "apply_overrides",
    "classify_parameters",
    "dry_run_report",
    "load_experiment",
    "memory_group_overrides",
    "parameter_counts",
    "train",
]
