#!/usr/bin/env python
"""Hugging Face olmo-miras model directory -> OLMo-core checkpoint (to train further).

    python scripts/convert_from_hf.py hf/tiny_miras runs/from_hf
    python scripts/train.py train_configs/tiny_miras.py --pretrained.path=runs/from_hf

See docs/hf.md and olmo_miras_plugin/hf/convert.py.
"""

import sys

from olmo_miras_plugin.hf.cli import convert_from_hf_main

if __name__ == "__main__":
    sys.exit(convert_from_hf_main())
