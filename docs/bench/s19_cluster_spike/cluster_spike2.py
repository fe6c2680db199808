"""Time cluster_allreduce2.cu's kernels (push, bulk, and the barrier modes in its header) for 1, 129
and 513 chunks in one launch, 16 clusters of 8 CTAs, print µs per chunk, and check the sums of
those that make them against a host computation. Writes $OUT/cluster_spike2.json."""
import json
import os

import torch

here = os.path.dirname(os.path.abspath(__file__))
src = open(os.path.join(here, "cluster_allreduce2.cu")).read()
out = torch.zeros(128 * 256, device="cuda")
res = {}


def kernel(name, shared_mem=0):
    k = torch.cuda._compile_kernel(src, name, compute_capability="90a", cuda_include_dirs=[here])
    if shared_mem:
        k.set_shared_memory_config(shared_mem)
    return k


def check(out, chunks):
    """Each CTA's threads together add every element of each chunk's total over the cluster."""
    i = torch.arange(64 * 128, dtype=torch.int64)
    total = sum((((i + c)[:, None] + torch.arange(8)) & 7).sum(1) for c in range(chunks)).double()
    per_cta = out.view(16, 8, 256).double().sum(-1).cpu()  # (cluster, rank)
    want = torch.full_like(per_cta, float(total.sum()))
    return float(((per_cta - want).abs() / want).max())


def timed(label, k, extra_args, shared_mem=0, checked=True):
    """Min of 7 launches for 1, 129 and 513 chunks; µs per chunk from the 1 → 513 difference."""
    for chunks in (1, 129, 513):
        launch = lambda: k(grid=(128, 1, 1), block=(256, 1, 1), args=[out, chunks, *extra_args], shared_mem=shared_mem)
        launch(); torch.cuda.synchronize()
        ts = []
        for _ in range(7):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record(); launch(); e1.record(); torch.cuda.synchronize()
            ts.append(e0.elapsed_time(e1))
        res[f"{label}_chunks{chunks}_ms"] = min(ts)
        if checked and chunks == 129:
            res[f"{label}_max_err"] = check(out, chunks)
    res[f"{label}_us_per_chunk"] = (res[f"{label}_chunks513_ms"] - res[f"{label}_chunks1_ms"]) / 512 * 1e3
    print(label, round(res[f"{label}_us_per_chunk"], 3), "us per chunk", flush=True)


timed("push0", kernel("cluster_allreduce_push", 64 * 1024), [], 64 * 1024)
timed("bulk0", kernel("cluster_allreduce_bulk", 100 * 1024), [], 100 * 1024)
barriers = kernel("cluster_allreduce2")
for mode in range(5):  # modes 2-4 leave the sums out
    timed(f"mode{mode}", barriers, [mode], checked=mode <= 1)
print(json.dumps(res, indent=1))
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "cluster_spike2.json"), "w"), indent=1)
