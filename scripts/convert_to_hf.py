#!/usr/bin/env python
"""OLMo-core MIRAS checkpoint -> Hugging Face model directory.

    python scripts/convert_to_hf.py runs/tiny_miras/step200 hf/tiny_miras [--dtype bfloat16] [--no-validate]

Then ``AutoModelForCausalLM.from_pretrained("hf/tiny_miras", trust_remote_code=True)`` (needs
``pip install olmo-miras``). See docs/hf.md and olmo_miras_plugin/hf/convert.py.
"""

import sys

from olmo_miras_plugin.hf.cli import convert_to_hf_main

if __name__ == "__main__":
    sys.exit(convert_to_hf_main())
