#!/usr/bin/env python
"""Train (or --dry-run) an experiment file on OLMo-core's Trainer.

    python scripts/train.py train_configs/tiny_miras.py [--dry-run] [--dotted.key=value ...]
    torchrun --nproc-per-node=8 scripts/train.py train_configs/olmo3_7b_miras.py \\
        --pretrained.path=/path/to/olmo3-7b/stepXXXX --trainer.save_folder=/path/to/runs/x

See olmo_miras_plugin/train/cli.py for the CLI and olmo_miras_plugin/train/experiment.py for the
experiment-file convention.
"""

import sys

from olmo_miras_plugin.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
