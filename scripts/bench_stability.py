#!/usr/bin/env python
"""Memory gradient norms while OLMo2-1B + memory trains on real text (prints per step, writes JSON).

    python scripts/bench_stability.py --seq 8192            # backprop through 8k tokens
    python scripts/bench_stability.py --seq 2048 --steps 60
"""

from olmo_miras_plugin.benchmarks.stability_bench import main

if __name__ == "__main__":
    main()
