"""Sixteenth session's micro-benchmark (docs/performance.md): how long a barrier among a head's
programs (8 programs × 16 heads, one cooperative launch, a global int32 counter) takes per step,
against the boundary between two programmatically dependent launches replayed from a CUDA graph.
Each step optionally adds 64 × 128 float32 atomics per program (``work1``), as a chain step does.
Run on a GPU with Triton ≥ 3.4: ``python docs/bench/s16_barrier_bench.py`` (JSON to $OUT or .).
MODE 0: arrive with an acq_rel atomic, spin on acquire loads; 1: arrive with a release atomic,
spin on volatile loads, then one acquire; 2: no barrier (the CTA barriers and the work only)."""
import torch, triton, triton.language as tl, json, os, sys
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

@triton.jit
def bar_kernel(bar_ptr, buf_ptr, n_iter, P: tl.constexpr, MODE: tl.constexpr, WORK: tl.constexpr):
    bar = bar_ptr + tl.program_id(0)
    offs = tl.arange(0, 64)[:, None] * 128 + tl.arange(0, 128)[None, :]
    base = buf_ptr + tl.program_id(0) * 64 * 128
    for i in range(n_iter):
        if WORK:
            tl.atomic_add(base + offs, 1.0, sem="relaxed")
        tl.debug_barrier()
        if MODE == 0:
            n = tl.atomic_add(bar, 1, sem="acq_rel", scope="gpu") + 1
            while n < (i + 1) * P:
                n = tl.atomic_add(bar, 0, sem="acquire", scope="gpu")
        elif MODE == 1:
            n = tl.atomic_add(bar, 1, sem="release", scope="gpu") + 1
            while n < (i + 1) * P:
                n = tl.load(bar, volatile=True)
            tl.atomic_add(bar, 0, sem="acquire", scope="gpu")
        tl.debug_barrier()

@triton.jit
def step_kernel(buf_ptr, WORK: tl.constexpr):
    offs = tl.arange(0, 64)[:, None] * 128 + tl.arange(0, 128)[None, :]
    base = buf_ptr + tl.program_id(0) * 64 * 128
    gdc_wait()
    gdc_launch_dependents()
    if WORK:
        tl.atomic_add(base + offs, 1.0, sem="relaxed")

def timed(fn, reps=5):
    fn(); torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e))
    return sorted(ts)[len(ts) // 2]

H, P, N = 16, 8, 1000
buf = torch.zeros(H * 64 * 128, device="cuda")
res = {}
for work in (0, 1):
    for mode in (0, 1, 2):
        def run():
            bar = torch.zeros(H, device="cuda", dtype=torch.int32)
            bar_kernel[(H, P)](bar, buf, N, P=P, MODE=mode, WORK=work, num_warps=8, launch_cooperative_grid=True)
        ms = timed(run)
        res[f"barrier mode{mode} work{work}"] = ms * 1000 / N
        print(f"barrier mode{mode} work{work}", ms * 1000 / N, flush=True)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        for _ in range(3):
            step_kernel[(H, P)](buf, WORK=work, num_warps=8, launch_pdl=True)
        torch.cuda.synchronize()
        with torch.cuda.graph(g):
            for _ in range(N):
                step_kernel[(H, P)](buf, WORK=work, num_warps=8, launch_pdl=True)
    res[f"pdl launch (graph) work{work}"] = timed(g.replay) * 1000 / N
for k, v in res.items():
    print(f"{k:36s} {v:7.2f} us per step")
json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "barrier_bench.json"), "w"), indent=1)
