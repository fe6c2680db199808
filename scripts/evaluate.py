#!/usr/bin/env python
"""Run the long-context suite on checkpoints; print tables, write JSON and PNG plots.

    python scripts/evaluate.py runs/tiny_miras/step200 [more checkpoints ...] \\
        [--suite quick|default|long] [--lengths 1024 2048 4096] [--tasks passkey,mqar_tokens,ppl] \\
        [--segment-len 512] [--device cuda] [--output-dir runs/eval/x]

CHECKPOINT: an OLMo-core trainer step dir (or its save folder: latest step), a saved model
(config.json + model.pt, e.g. from scripts/recall_experiment.py) or a Hugging Face directory.
See olmo_miras_plugin/eval/harness.py (evaluate_main) for the options.
"""

import sys

from olmo_miras_plugin.eval.harness import evaluate_main

if __name__ == "__main__":
    sys.exit(evaluate_main())
