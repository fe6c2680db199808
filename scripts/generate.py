#!/usr/bin/env python
"""Stream a long text through a MIRAS model segment by segment (memory carried, constant memory)
and generate a continuation or answer a question.

    python scripts/generate.py runs/tiny_miras/step200 --input long.txt --question "Who wrote it?"
    python scripts/generate.py hf/tiny_miras --prompt "def main():" --max-new-tokens 200

Works with an OLMo-core checkpoint or an HF directory; the byte tokenizer by default for the
tiny models. See docs/hf.md and olmo_miras_plugin/generation.py.
"""

import sys

from olmo_miras_plugin.hf.cli import generate_main

if __name__ == "__main__":
    sys.exit(generate_main())
