"""Time cluster_allreduce2.cu's kernels (push, bulk, and the barrier modes in its header) for 1, 129 and 513 chunks in one launch,
16 clusters of 8 CTAs, and check mode 0/1 sums against a host computation."""
import json, os, torch
src = open(os.path.join(os.path.dirname(__file__), "cluster_allreduce2.cu")).read()
k = torch.cuda._compile_kernel(src, "cluster_allreduce2", compute_capability="90a")
out = torch.zeros(128 * 256, device="cuda")
res = {}


def check(out, chunks, owners):
    """Each CTA's threads together add every element of the chunk's total over the cluster (all
    8 owners' rows after the all-gather; only the CTA's own rows without it), for every chunk."""
    i = torch.arange(64 * 128, dtype=torch.int64)
    total = sum((((i + c)[:, None] + torch.arange(8)) & 7).sum(1) for c in range(chunks)).double()
    per_cta = out.view(16, 8, 256).double().sum(-1).cpu()  # (cluster, rank)
    if owners == 8:
        want = torch.full_like(per_cta, float(total.sum()))
    else:
        want = total.view(8, 1024).sum(1).expand(16, 8)
    return float(((per_cta - want).abs() / want).max())

push = torch.cuda._compile_kernel(src, "cluster_allreduce_push", compute_capability="90a")
push.set_shared_memory_config(64 * 1024)
for mode in (0,):
    for chunks in (1, 129, 513):
        push(grid=(128, 1, 1), block=(256, 1, 1), args=[out, chunks], shared_mem=64 * 1024); torch.cuda.synchronize()
        ts = []
        for _ in range(7):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record(); push(grid=(128, 1, 1), block=(256, 1, 1), args=[out, chunks], shared_mem=64 * 1024); e1.record(); torch.cuda.synchronize()
            ts.append(e0.elapsed_time(e1))
        res[f"push{mode}_chunks{chunks}_ms"] = min(ts)
        print(chunks, min(ts), flush=True)
        if chunks == 129:
            res[f"push{mode}_max_err"] = check(out, chunks, 8)
    res[f"push{mode}_us_per_chunk"] = (res[f"push{mode}_chunks513_ms"] - res[f"push{mode}_chunks1_ms"]) / 512 * 1e3
bulk = torch.cuda._compile_kernel(src, "cluster_allreduce_bulk", compute_capability="90a")
bulk.set_shared_memory_config(100 * 1024)
for mode in (0,):
    for chunks in (1, 129, 513):
        bulk(grid=(128, 1, 1), block=(256, 1, 1), args=[out, chunks], shared_mem=100 * 1024); torch.cuda.synchronize()
        ts = []
        for _ in range(7):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record(); bulk(grid=(128, 1, 1), block=(256, 1, 1), args=[out, chunks], shared_mem=100 * 1024); e1.record(); torch.cuda.synchronize()
            ts.append(e0.elapsed_time(e1))
        res[f"bulk{mode}_chunks{chunks}_ms"] = min(ts)
        print(chunks, min(ts), flush=True)
        if chunks == 129:
            res[f"bulk{mode}_max_err"] = check(out, chunks, 8)
    res[f"bulk{mode}_us_per_chunk"] = (res[f"bulk{mode}_chunks513_ms"] - res[f"bulk{mode}_chunks1_ms"]) / 512 * 1e3
for mode in range(5):
    for chunks in (1, 129, 513):
        k(grid=(128, 1, 1), block=(256, 1, 1), args=[out, chunks, mode]); torch.cuda.synchronize()
        ts = []
        for _ in range(7):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record(); k(grid=(128, 1, 1), block=(256, 1, 1), args=[out, chunks, mode]); e1.record(); torch.cuda.synchronize()
            ts.append(e0.elapsed_time(e1))
        res[f"mode{mode}_chunks{chunks}_ms"] = min(ts)
        if mode <= 1 and chunks == 129:
            res[f"mode{mode}_max_err"] = check(out, chunks, 8)
    res[f"mode{mode}_us_per_chunk"] = (res[f"mode{mode}_chunks513_ms"] - res[f"mode{mode}_chunks1_ms"]) / 512 * 1e3
print(json.dumps(res, indent=1))
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "cluster_spike2.json"), "w"), indent=1)
