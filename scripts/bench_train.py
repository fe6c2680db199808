#!/usr/bin/env python
"""Training throughput of OLMo2-1B with and without memory layers (prints both, writes JSON).

    python scripts/bench_train.py --seq 8192                                   # one GPU: base vs MAL every 4th
    torchrun --nproc-per-node=2 scripts/bench_train.py --fsdp --seq 4096       # FSDP2 over 2 GPUs
"""

from olmo_miras_plugin.benchmarks.train_bench import main

if __name__ == "__main__":
    main()
