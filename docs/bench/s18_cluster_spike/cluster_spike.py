"""Time a per-chunk sum of a (64 x 128) float32 tile over the 8 CTAs of a thread-block cluster
(distributed shared memory), 16 clusters (one per head) on an H100: the cost a cluster design
would pay where the split kernels pay a launch boundary and L2 atomics."""
import json, os, torch
src = open(os.path.join(os.path.dirname(__file__), "cluster_allreduce.cu")).read()
k = torch.cuda._compile_kernel(src, "cluster_allreduce", compute_capability="90a")
out = torch.zeros(128 * 256, device="cuda")
res = {}
for mode in (0, 1):
    for chunks in (1, 129, 513):
        k(grid=(128, 1, 1), block=(256, 1, 1), args=[out, chunks, mode]); torch.cuda.synchronize()
        ts = []
        for _ in range(5):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record(); k(grid=(128, 1, 1), block=(256, 1, 1), args=[out, chunks, mode]); e1.record(); torch.cuda.synchronize()
            ts.append(e0.elapsed_time(e1))
        res[f"mode{mode}_chunks{chunks}_ms"] = min(ts)
    res[f"mode{mode}_us_per_chunk"] = (res[f"mode{mode}_chunks513_ms"] - res[f"mode{mode}_chunks1_ms"]) / 512 * 1e3
# check: mode 0 sums (i + c + rank) & 7 over ranks, gathered over all 64x128 elements per thread share
print(json.dumps(res, indent=1), "finite", bool(torch.isfinite(out).all()), "sample", out[:2].tolist())
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "cluster_spike.json"), "w"), indent=1)
