"""``scripts/train.py``: run or dry-run an experiment file with OLMo-core's trainer.

Usage::

    python scripts/train.py EXPERIMENT [--dry-run] [--dotted.key=value ...]
    torchrun --nproc-per-node=N scripts/train.py EXPERIMENT [--dotted.key=value ...]

``EXPERIMENT`` is a file path or a name in ``train_configs/``. Overrides use OLMo-core's dotted
syntax (``--trainer.max_duration.value=100``, ``--train_module.optim.lr=1e-3``,
``--model.memory.layers=[1,3]``); values are parsed as YAML.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import List, Optional, Tuple

from olmo_core.exceptions import OLMoConfigurationError
from olmo_core.train import prepare_training_environment, teardown_training_environment
from olmo_core.utils import prepare_cli_environment

from .experiment import default_backend, dry_run_report, load_experiment, single_process, train

__all__ = ["main", "parse_args"]

log = logging.getLogger(__name__)

USAGE = (
    "usage: python scripts/train.py EXPERIMENT [--dry-run] [--dotted.key=value ...]\n"
    "       torchrun --nproc-per-node=N scripts/train.py EXPERIMENT [--dotted.key=value ...]\n\n"
    "EXPERIMENT: a file defining build_experiment(overrides) -> MirasExperimentConfig, or a name in\n"
    "train_configs/ (tiny_miras, olmo2_1b_miras, olmo3_7b_miras, olmo3_32b_miras).\n"
    "--dry-run: print the resolved config and parameter counts (base / memory / trainable), then exit.\n"
    "Overrides: OLMo-core's dotted syntax, e.g. --trainer.max_duration.value=50 --train_module.optim.lr=1e-3"
)


def parse_args(argv: List[str]) -> Tuple[str, bool, List[str]]:
    """``(experiment, dry_run, overrides)``; raises ``SystemExit`` on ``--help`` / bad usage."""
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        raise SystemExit(0 if argv else 2)
    experiment, rest = argv[0], argv[1:]
    if experiment.startswith("-"):
        print(f"error: the first argument must be the experiment file, got {experiment!r}\n\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)
    dry_run = False
    overrides: List[str] = []
    for arg in rest:
        if arg in ("--dry-run", "--dry_run"):
            dry_run = True
        elif arg in ("-h", "--help"):
            print(USAGE)
            raise SystemExit(0)
        elif "=" in arg or arg.startswith("--"):
            overrides.append(arg)
        else:
            print(f"error: unexpected argument {arg!r} (overrides look like --key=value)\n\n{USAGE}", file=sys.stderr)
            raise SystemExit(2)
    return experiment, dry_run, overrides


def _distributed_launch() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def main(argv: Optional[List[str]] = None) -> int:
    experiment, dry_run, overrides = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        config = load_experiment(experiment, overrides)
    except OLMoConfigurationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if dry_run:
        prepare_cli_environment()
        print(dry_run_report(config))
        return 0
    if _distributed_launch():
        backend: Optional[str] = default_backend(config)
    else:
        backend = None
        config = single_process(config)
    prepare_training_environment(backend=backend, shared_filesystem=True if backend else None)
    try:
        train(config)
    finally:
        teardown_training_environment()
    return 0
