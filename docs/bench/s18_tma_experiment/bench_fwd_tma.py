"""Forward chain (update + norm launches, clip, momentum) at OLMo2-1B shapes: original update kernel
against the TMA-descriptor prototype. Checks the states/sums agree, then times each chain in a CUDA graph."""
import json, os, sys, time
sys.path.insert(0, os.path.dirname(__file__))
import torch, triton
from triton.tools.tensor_descriptor import TensorDescriptor
from olmo_miras_plugin.memory import triton_mlp_split as S
from fwd_tma import _split_fwd_tma_kernel

torch.manual_seed(0)
dev = torch.device("cuda")
b, h, t, d, F, C = 1, 16, int(os.environ.get("T", "8192")), 128, 256, 64
n = t // C; bh = b * h; ns = n + 1; BD = 128; BF = 32
k = torch.randn(b, h, t, d, device=dev) / d ** 0.5
v = torch.randn(b, h, t, d, device=dev)
ak = torch.rand(bh, n, device=dev) * 0.1 + 0.9
am = torch.rand(bh, n, device=dev) * 0.1 + 0.85
sk = torch.rand(bh, n, device=dev) * 0.1 + 0.9
wa = torch.rand(bh, n, C, device=dev) * 0.02
ws = torch.rand(bh, n, C, device=dev) * 0.02
w10 = torch.randn(b, h, F, d, device=dev) * 0.05; w20 = torch.randn(b, h, d, F, device=dev) * 0.05
s10 = torch.randn(b, h, F, d, device=dev) * 0.01; s20 = torch.randn(b, h, d, F, device=dev) * 0.01
tau = 1.0
prec = S._precision(dev, allow_bf16=True)
rb, opts, norm_rb, norm_opts = S._forward_chain_tiles(C, prec)
pdl = S._launch_pdl(dev)
print("prec", prec, "rb", rb, opts, norm_rb, norm_opts, pdl, flush=True)

def buffers():
    w1 = torch.empty(b, h, ns, F, d, device=dev); w2 = torch.empty(b, h, ns, d, F, device=dev)
    s1 = torch.empty_like(w1); s2 = torch.empty_like(w2)
    w1[:, :, 0], w2[:, :, 0], s1[:, :, 0], s2[:, :, 0] = w10, w20, s10, s20
    pk = torch.zeros(b, h, t, d, device=dev); aa = torch.zeros(bh, t, device=dev); dd = torch.zeros(bh, t, device=dev)
    kept = torch.empty(2, 2, bh, C, F, device=dev)
    return dict(w1=w1, w2=w2, s1=s1, s2=s2, pk=pk, aa=aa, dd=dd, kept=kept)

grid = (bh, F // BF)
def norm(B, c):
    S._split_norm_kernel[grid](v, *S._strides(v), B["pk"], B["dd"], B["kept"], B["w2"], c, h, n, ns, d, F,
                               C=C, BD=BD, BF=BF, GELU=True, PREC=prec, RB=norm_rb, **norm_opts, **pdl)

def chain_orig(B):
    for c in range(n + 1):
        S._split_fwd_kernel[grid](k, v, k, *S._strides(k), *S._strides(v), *S._strides(k), B["pk"], B["pk"], B["aa"], B["dd"],
                                  B["kept"], ak, am, sk, wa, ws, B["w1"], B["w2"], B["s1"], B["s2"], c, h, n, ns, d, F, tau,
                                  C=C, BD=BD, BF=BF, MOM=True, GELU=True, PREC=prec, RB=rb, READ=False, CLIP=True, **opts, **pdl)
        if c < n:
            norm(B, c)

def descs(B):
    TD = TensorDescriptor
    return dict(
        k=TD(k, list(k.shape), list(k.stride()), [1, 1, C, BD]), v=TD(v, list(v.shape), list(v.stride()), [1, 1, C, BD]),
        pk=TD.from_tensor(B["pk"].view(bh * t, d), [C, BD]), kept=TD.from_tensor(B["kept"].view(-1, F), [C, BF]),
        w1=TD.from_tensor(B["w1"].view(-1, d), [BF, BD]), s1=TD.from_tensor(B["s1"].view(-1, d), [BF, BD]),
        w2=TD.from_tensor(B["w2"].view(-1, F), [BD, BF]), s2=TD.from_tensor(B["s2"].view(-1, F), [BD, BF]))

def chain_tma(B, D, sw, norms=True, **abl):
    for c in range(n + 1):
        _split_fwd_tma_kernel[grid](D["k"], D["v"], D["pk"], D["kept"], D["w1"], D["s1"], D["w2"], D["s2"],
                                    k, v, B["pk"], B["kept"], B["w1"], B["s1"], B["w2"], B["s2"],
                                    B["aa"], B["dd"], ak, am, sk, wa, ws, c, h, n, ns, d, F, tau,
                                    C=C, BD=BD, BF=BF, GELU=True, PREC=prec, **opts, **pdl,
                                    TMA_LD=sw[0], TMA_DK=sw[1], TMA_ST=sw[2], TMA_RED=sw[3], **abl)
        if c < n and norms:
            norm(B, c)

VARIANTS = [(0, 0, 0, 0)]
Bo = buffers(); chain_orig(Bo)
torch.cuda.synchronize()
out = {}
BT = {}
for sw in VARIANTS:
    Bt = buffers(); Dt = descs(Bt); chain_tma(Bt, Dt, sw); torch.cuda.synchronize()
    BT[sw] = (Bt, Dt)
    for key in ("w1", "w2", "s1", "s2", "pk", "aa", "dd"):
        a, x = Bo[key], Bt[key]
        rel = ((a - x).norm() / a.norm()).item()
        out[f"{sw}_{key}"] = rel
    print(sw, "max rel diff", max(out[f"{sw}_{key}"] for key in ("w1", "w2", "s1", "s2", "pk", "aa", "dd")),
          "finite", all(bool(torch.isfinite(Bt[key]).all()) for key in Bt), flush=True)

def timed(fn, reps=5):
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        fn()
    g.replay(); torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record(); g.replay(); e1.record(); torch.cuda.synchronize()
        ts.append(e0.elapsed_time(e1))
    return min(ts)

def reset(B):
    B["pk"].zero_(); B["aa"].zero_(); B["dd"].zero_()

res = {}
for rep in range(0 if __name__ != '__main__' else 2):
    res[f"orig{rep}"] = timed(lambda: (reset(Bo), chain_orig(Bo)))
    for sw in VARIANTS:
        Bt, Dt = BT[sw]
        res[f"{sw}{rep}"] = timed(lambda: (reset(Bt), chain_tma(Bt, Dt, sw)))
    Bt, Dt = BT[(0, 0, 0, 0)]
    for name, abl in [("full", {}), ("no_update_dots", dict(UPD=False)), ("no_start", dict(START=False)),
                      ("neither", dict(UPD=False, START=False)), ("empty", dict(EMPTY=True))]:
        res[f"alone_{name}{rep}"] = timed(lambda: (reset(Bt), chain_tma(Bt, Dt, (0, 0, 0, 0), norms=False, **abl)))
    print(rep, {kk: round(vv, 3) for kk, vv in res.items() if kk.endswith(str(rep))}, flush=True)
out.update(res)
if __name__ == "__main__":
    json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), "fwd_tma.json"), "w"), indent=1)
