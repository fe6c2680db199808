#!/usr/bin/env python
"""Window-only vs MIRAS-memory twin on MQAR: recall by query distance and by number of pairs.

    python scripts/recall_experiment.py --quick                      # CPU smoke test, < 1 minute
    python scripts/recall_experiment.py --device cuda --output-dir runs/recall   # one H100, <= 8 min

See olmo_miras_plugin/eval/recall_experiment.py for the design and every flag.
"""

import sys

from olmo_miras_plugin.eval.recall_experiment import main

if __name__ == "__main__":
    sys.exit(main())
