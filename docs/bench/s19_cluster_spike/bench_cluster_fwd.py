"""The cluster prototype (cluster_mlp_fwd.cu) against the split kernels' forward chain without the
clip (the production Triton kernel, N + 1 launches in a CUDA graph with PDL) at OLMo2-1B shapes
(16 heads x 128, hidden 256, chunk 64, batch 1, momentum, GELU): every chunk-start state and the
keys' prediction compared, and a float64 PyTorch reference of the same formulas for the first
chunks; then each timed. Needs the repository on PYTHONPATH (Triton, no olmo-core).

    python docs/bench/s19_cluster_spike/bench_cluster_fwd.py      # writes $OUT/cluster_fwd.json
    KERNEL=other.cu SEQS=8192 HEADS=15,16 JSON=x.json python ...   # another kernel file, fewer cases
    CL=4 python ...      # 4 CTAs per head (default 8)
    PROFILE_ONLY=1 ncu -k regex:cluster_mlp_fwd python docs/bench/s19_cluster_spike/bench_cluster_fwd.py
"""
import json
import os

import torch
import torch.nn.functional as F_

from olmo_miras_plugin.memory import triton_mlp_split as S

here = os.path.dirname(os.path.abspath(__file__))
dev = torch.device("cuda")
torch.manual_seed(0)
b, h, d, F, C, BF = 1, 16, 128, 256, 64, 32
bh = b * h


def smem_bytes(cl):
    """cluster_mlp_fwd.cu's dynamic shared memory at cluster size ``cl``."""
    bf, own = F // cl, C // cl
    return 4 * (bf * 132 + 128 * (bf + 4) + 64 * 132 + 64 * (bf + 4) + bf * 80 + 64 * 132 + (cl - 1) * own * 128)


# CTAs per head (8 or 4) for cluster_mlp_fwd.cu; KERNEL=file.cu runs another (8 CTAs per head,
# its shared memory from its "SMEM_BYTES:" line; earlier versions: see README.md)
CLUSTER = 8 if "KERNEL" in os.environ else int(os.environ.get("CL", "8"))
if "KERNEL" in os.environ:
    src = open(os.environ["KERNEL"]).read()
    SMEM = int(src.split("SMEM_BYTES:")[1].split()[0]) if "SMEM_BYTES:" in src else 223232  # (v1-v3: 223232)
else:
    src = f"#define CL {CLUSTER}\n" + open(os.path.join(here, "cluster_mlp_fwd.cu")).read()
    SMEM = smem_bytes(CLUSTER)
kern = torch.cuda._compile_kernel(src, "cluster_mlp_fwd", compute_capability="90a", cuda_include_dirs=[here])
kern.set_shared_memory_config(SMEM)
prec = S._precision(dev, allow_bf16=True)
rb, opts, _, _ = S._forward_chain_tiles(C, prec)
pdl = S._launch_pdl(dev)
print("prec", prec, "rows", rb, opts, pdl, flush=True)


def inputs(t):
    n = t // C
    g = dict(
        k=torch.randn(b, h, t, d, device=dev) / d ** 0.5, v=torch.randn(b, h, t, d, device=dev),
        ak=torch.rand(bh, n, device=dev) * 0.1 + 0.9, am=torch.rand(bh, n, device=dev) * 0.1 + 0.85,
        sk=torch.rand(bh, n, device=dev) * 0.1 + 0.9,
        wa=torch.rand(bh, n, C, device=dev) * 0.02, ws=torch.rand(bh, n, C, device=dev) * 0.02,
        w10=torch.randn(b, h, F, d, device=dev) * 0.05, w20=torch.randn(b, h, d, F, device=dev) * 0.05,
        s10=torch.randn(b, h, F, d, device=dev) * 0.01, s20=torch.randn(b, h, d, F, device=dev) * 0.01)
    g["n"] = n
    return g


def buffers(g):
    ns = g["n"] + 1
    w1 = torch.empty(b, h, ns, F, d, device=dev); w2 = torch.empty(b, h, ns, d, F, device=dev)
    s1 = torch.empty_like(w1); s2 = torch.empty_like(w2)
    w1[:, :, 0], w2[:, :, 0], s1[:, :, 0], s2[:, :, 0] = g["w10"], g["w20"], g["s10"], g["s20"]
    pk = torch.zeros(b, h, g["k"].shape[2], d, device=dev)
    dummy = torch.zeros(1, device=dev)
    return dict(w1=w1, w2=w2, s1=s1, s2=s2, pk=pk, dummy=dummy)


def chain_triton(g, B):
    k, v, n = g["k"], g["v"], g["n"]
    for c in range(n + 1):
        S._split_fwd_kernel[(bh, F // BF)](
            k, v, k, *S._strides(k), *S._strides(v), *S._strides(k), B["pk"], B["pk"], B["dummy"], B["dummy"],
            B["dummy"], g["ak"], g["am"], g["sk"], g["wa"], g["ws"], B["w1"], B["w2"], B["s1"], B["s2"],
            c, h, n, n + 1, d, F, 1.0,
            C=C, BD=d, BF=BF, MOM=True, GELU=True, PREC=prec, RB=rb, READ=False, CLIP=False, **opts, **pdl)


def chain_cluster(g, B, flags=0):
    kern(grid=(CLUSTER * bh, 1, 1), block=(256, 1, 1), shared_mem=SMEM,
         args=[g["k"], g["v"], B["pk"], B["w1"], B["w2"], B["s1"], B["s2"], g["ak"], g["am"], g["sk"],
               g["wa"], g["ws"], g["k"].shape[2], g["n"], g["n"] + 1, flags])


def reference(g, chunks):
    """float32 PyTorch, the formulas of the .cu header, for the first ``chunks`` chunks."""
    W1, W2, S1, S2 = (g[x][0].double() for x in ("w10", "w20", "s10", "s20"))  # (h, F, d), (h, d, F)
    states, preds = [], []
    for c in range(chunks):
        K = g["k"][0, :, c * C:(c + 1) * C].double(); V = g["v"][0, :, c * C:(c + 1) * C].double()
        Hk = K @ W1.transpose(1, 2); Ak = F_.gelu(Hk); P = Ak @ W2.transpose(1, 2); E = P - V
        cdf = 0.5 * (1 + torch.erf(Hk / 2 ** 0.5)); Dk = (E @ W2) * (cdf + Hk * torch.exp(-Hk * Hk / 2) / (2 * torch.pi) ** 0.5)
        wa, ws = g["wa"][:, c].double()[..., None], g["ws"][:, c].double()[..., None]
        ak, am, sk = (g[x][:, c].double()[:, None, None] for x in ("ak", "am", "sk"))
        W1n = ak * W1 + am * S1 - (Dk * wa).transpose(1, 2) @ K; S1 = sk * S1 - (Dk * ws).transpose(1, 2) @ K
        W2n = ak * W2 + am * S2 - (E * wa).transpose(1, 2) @ Ak; S2 = sk * S2 - (E * ws).transpose(1, 2) @ Ak
        W1, W2 = W1n, W2n
        states.append((W1, W2, S1, S2)); preds.append(P)
    return states, preds


def rel(a, x):
    return ((a.double() - x.double()).norm() / a.double().norm()).item()


def timed(fn, reps=5, graph=True):
    if graph:
        gr = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(gr):
            fn()
        run = gr.replay
    else:
        run = fn
    run(); torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record(); run(); e1.record(); torch.cuda.synchronize()
        ts.append(e0.elapsed_time(e1))
    return min(ts)


# timing-only variants of the cluster kernel (flags in the .cu header; their results are wrong)
ABLATIONS = {"no_exchange": 1, "no_state_stores": 2, "no_exchange_no_stores": 3, "no_update_dots": 4,
             "no_start_dots": 8, "no_dots": 12, "no_dots_no_exchange_no_stores": 15}
if os.environ.get("PROFILE_ONLY"):  # one launch of each, for Nsight Compute
    g = inputs(4096)
    Bt, Bc = buffers(g), buffers(g)
    chain_cluster(g, Bc); chain_triton(g, Bt); torch.cuda.synchronize()
    raise SystemExit(0)
out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
for t in [int(x) for x in os.environ.get("SEQS", "4096,8192").split(",") if x]:
    g = inputs(t)
    Bt, Bc = buffers(g), buffers(g)
    chain_triton(g, Bt); chain_cluster(g, Bc); torch.cuda.synchronize()
    cmp = {key: rel(Bt[key], Bc[key]) for key in ("w1", "w2", "s1", "s2", "pk")}
    cmp["finite"] = all(bool(torch.isfinite(Bc[key]).all()) for key in ("w1", "w2", "s1", "s2", "pk"))
    states, preds = reference(g, 3)
    for c in range(3):
        for i, key in enumerate(("w1", "w2", "s1", "s2")):
            cmp[f"ref_c{c + 1}_{key}_cluster"] = rel(states[c][i], Bc[key][0, :, c + 1])
            cmp[f"ref_c{c + 1}_{key}_triton"] = rel(states[c][i], Bt[key][0, :, c + 1])
        cmp[f"ref_c{c}_pk_cluster"] = rel(preds[c], Bc["pk"][0, :, c * C:(c + 1) * C])
        cmp[f"ref_c{c}_pk_triton"] = rel(preds[c], Bt["pk"][0, :, c * C:(c + 1) * C])
    print(t, "agreement", json.dumps(cmp), flush=True)
    out[f"T{t}_agreement"] = cmp
    for rep in range(2):
        tt = timed(lambda: (Bt["pk"].zero_(), chain_triton(g, Bt)))
        tc = timed(lambda: chain_cluster(g, Bc), graph=False)
        ablate = {name: timed(lambda: chain_cluster(g, Bc, flags=fl), graph=False) for name, fl in ABLATIONS.items()}
        out[f"T{t}_rep{rep}"] = dict(triton_chain_ms=tt, cluster_ms=tc, **ablate,
                                     triton_us_per_chunk=tt / g["n"] * 1e3, cluster_us_per_chunk=tc / g["n"] * 1e3)
        print(t, rep, json.dumps(out[f"T{t}_rep{rep}"]), flush=True)
# Heads per launch: an H100 runs at most 15 clusters of 8 one-CTA-per-SM programs at once (Nsight
# Compute's "Max Active Clusters"), so 16 heads take two waves.
t = 8192
for heads in [int(x) for x in os.environ.get("HEADS", "8,15,16").split(",") if x]:
    h = heads; bh = heads
    g = inputs(t)
    Bt, Bc = buffers(g), buffers(g)
    tt = timed(lambda: (Bt["pk"].zero_(), chain_triton(g, Bt)))
    tc = timed(lambda: chain_cluster(g, Bc), graph=False)
    ablate = {name: timed(lambda: chain_cluster(g, Bc, flags=fl), graph=False) for name, fl in ABLATIONS.items()}
    out[f"T{t}_heads{heads}"] = dict(triton_chain_ms=tt, cluster_ms=tc, **ablate,
                                     triton_us_per_chunk=tt / g["n"] * 1e3, cluster_us_per_chunk=tc / g["n"] * 1e3)
    print(t, "heads", heads, json.dumps(out[f"T{t}_heads{heads}"]), flush=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), os.environ.get("JSON", "cluster_fwd.json")), "w"), indent=1)
