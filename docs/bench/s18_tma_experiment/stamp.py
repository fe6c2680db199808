"""Where a forward update launch's time goes: cycle stamps inside the prototype kernel (pointer path).

The stamped kernel is fwd_tma.py with fwd_stamp.patch applied, next to this file:
``patch -o fwd_stamp.py fwd_tma.py < fwd_stamp.patch`` (eighteenth session, docs/performance.md)."""
import json, os, sys
sys.path.insert(0, os.path.dirname(__file__))
import torch
import bench_fwd_tma as B0  # builds inputs and runs the correctness/timing part first
from fwd_stamp import _split_fwd_tma_kernel as K
torch.cuda.synchronize()
b, h, n, ns, d, F, C, BD, BF = B0.b, B0.h, B0.n, B0.ns, B0.d, B0.F, B0.C, B0.BD, B0.BF
bh = b * h
P = F // BF
for norms in (True, False):
    Bt = B0.buffers(); Dt = B0.descs(Bt)
    ts = torch.zeros((n + 1) * bh * P * 12, dtype=torch.int64, device="cuda")
    for rep in range(2):
        Bt["pk"].zero_(); Bt["aa"].zero_(); Bt["dd"].zero_(); ts.zero_()
        for c in range(n + 1):
            K[B0.grid](Dt["k"], Dt["v"], Dt["pk"], Dt["kept"], Dt["w1"], Dt["s1"], Dt["w2"], Dt["s2"],
                       B0.k, B0.v, Bt["pk"], Bt["kept"], Bt["w1"], Bt["s1"], Bt["w2"], Bt["s2"],
                       Bt["aa"], Bt["dd"], B0.ak, B0.am, B0.sk, B0.wa, B0.ws, c, h, n, ns, d, F, B0.tau,
                       ts_ptr=ts, C=C, BD=BD, BF=BF, GELU=True, PREC=B0.prec, **B0.opts, **B0.pdl,
                       TMA_LD=0, TMA_DK=0, TMA_ST=0, TMA_RED=0)
            if c < n and norms:
                B0.norm(Bt, c)
        torch.cuda.synchronize()
    t = ts.view(n + 1, bh * P, 12)[8:n - 8].double().cpu()
    g0, g1 = t[..., 0], t[..., 1]
    span = (g1.max(1).values - g0.min(1).values)
    gap = g0.min(1).values[1:] - g1.max(1).values[:-1]
    dur = g1 - g0
    cyc = t[..., 9]
    ghz = (cyc / dur.clamp(min=1)).median().item()
    names = ["loads(pre-wait) done", "after wait", "Dk + clip", "update dots", "stores issued", "K@W1 + act", "Ak@W2T", "atomics issued"]
    out = dict(norms=norms, launch_span_us=span.median().item() / 1e3, gap_between_launches_us=gap.median().item() / 1e3,
               program_duration_us=dur.median().item() / 1e3, entry_skew_us=(g0.max(1).values - g0.min(1).values).median().item() / 1e3,
               exit_skew_us=(g1.max(1).values - g1.min(1).values).median().item() / 1e3, ghz=ghz,
               stamps_us={nm: (t[..., 2 + i] / ghz / 1e3).median().item() for i, nm in enumerate(names)})
    print(json.dumps(out, indent=1), flush=True)
    json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), f"stamps_norms{int(norms)}.json"), "w"), indent=1)
