#!/usr/bin/env python
"""Forward+backward time and peak memory of a MIRAS memory layer vs. causal SDPA (and titans-pytorch).

Example (OLMo2-1B shapes on a GPU):
    python scripts/bench_memory.py --seq 4096 16384 --d-model 2048 --heads 16 --head-dim 128 --chunk 64
"""

from olmo_miras_plugin.benchmarks.memory_bench import main

if __name__ == "__main__":
    main()
