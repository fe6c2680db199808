"""Prototype: the forward update kernel (clip, momentum, one 64-row pass); each group of memory
operations through TMA descriptors or pointers (constexpr switches)."""
import triton
import triton.language as tl
from olmo_miras_plugin.memory.triton_mlp import _act, _act_grad, _dot
from olmo_miras_plugin.memory.triton_mlp_split import _after_previous_launch, _clip


@triton.jit
def _split_fwd_tma_kernel(
    k_desc, v_desc, pk_desc, kept_desc, w1_desc, s1_desc, w2_desc, s2_desc,
    k_ptr, v_ptr, pk_ptr, kept_ptr, w1_ptr, s1_ptr, w2_ptr, s2_ptr,  # contiguous (B,H,T,D), (BH*T,D), (4*BH*C,F), states
    aa_ptr, dd_ptr, ak_ptr, am_ptr, skeep_ptr, wa_ptr, ws_ptr,
    c, H, N, NS, D, F, tau,
    C: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, GELU: tl.constexpr, PREC: tl.constexpr,
    PDL: tl.constexpr, TMA_LD: tl.constexpr, TMA_DK: tl.constexpr, TMA_ST: tl.constexpr, TMA_RED: tl.constexpr,
    UPD: tl.constexpr = True, START: tl.constexpr = True, EMPTY: tl.constexpr = False,
):
    if EMPTY:
        _after_previous_launch(PDL)
        return
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    f0 = tl.program_id(1) * BF
    BH = tl.num_programs(0)
    slot = bh * NS + c % NS
    rr = tl.arange(0, C)
    rd = tl.arange(0, BD)
    rf = f0 + tl.arange(0, BF)
    off1t = rf[None, :] * D + rd[:, None]  # (BD, BF) view of an (F, D) slot
    off2 = rd[:, None] * F + rf[None, :]
    fd = F * D
    if c > 0:
        cp = c - 1
        prev = bh * NS + cp % NS
        krow = (cp % 2) * 2 * BH * C + bh * C
        rows = (bh * N * C + cp * C + rr).to(tl.int64)
        if TMA_LD:
            W1 = tl.trans(w1_desc.load([prev * F + f0, 0]))  # (BD, BF)
            W2 = w2_desc.load([prev * D, f0])
            S1 = tl.trans(s1_desc.load([prev * F + f0, 0]))
            S2 = s2_desc.load([prev * D, f0])
            K = k_desc.load([b, h, cp * C, 0]).reshape(C, BD)
            V = v_desc.load([b, h, cp * C, 0]).reshape(C, BD)
            E = pk_desc.load([bh * N * C + cp * C, 0]) - V
            Hk = kept_desc.load([krow, f0])
        else:
            W1 = tl.load(w1_ptr + prev * fd + off1t, cache_modifier=".cg")
            W2 = tl.load(w2_ptr + prev * fd + off2, cache_modifier=".cg")
            S1 = tl.load(s1_ptr + prev * fd + off1t, cache_modifier=".cg")
            S2 = tl.load(s2_ptr + prev * fd + off2, cache_modifier=".cg")
            K = tl.load(k_ptr + rows[:, None] * D + rd[None, :])
            V = tl.load(v_ptr + rows[:, None] * D + rd[None, :])
            E = tl.load(pk_ptr + rows[:, None] * D + rd[None, :]) - V
            Hk = tl.load(kept_ptr + (krow + rr)[:, None] * F + rf[None, :], cache_modifier=".cg")
        cc = bh * N + cp
        a_keep = tl.load(ak_ptr + cc)
        acc1 = a_keep * W1
        acc2 = a_keep * W2
        a_mom = tl.load(am_ptr + cc)
        s_keep = tl.load(skeep_ptr + cc)
        acc1 += a_mom * S1
        acc2 += a_mom * S2
        S1 = s_keep * S1
        S2 = s_keep * S2
        _after_previous_launch(PDL)
        if TMA_DK:
            Dk = kept_desc.load([krow + BH * C, f0])
        else:
            Dk = tl.load(kept_ptr + (krow + BH * C + rr)[:, None] * F + rf[None, :])
        Ak = _act(Hk, GELU)
        wa = tl.load(wa_ptr + cc * C + rr)
        _, _, _, _, _, _, sig = _clip(K, E, aa_ptr, dd_ptr, bh * N * C + cp * C + rr, tau)
        wa = wa * sig
        if UPD:
            acc1 = _dot(tl.trans(K), Dk * (-wa)[:, None], acc1, PREC)
            acc2 = _dot(tl.trans(E * (-wa)[:, None]), Ak, acc2, PREC)
            ws = tl.load(ws_ptr + cc * C + rr) * sig
            S1 = _dot(tl.trans(K), Dk * (-ws)[:, None], S1, PREC)
            S2 = _dot(tl.trans(E * (-ws)[:, None]), Ak, S2, PREC)
        else:
            acc1 += tl.sum(Dk * wa[:, None], axis=0)[None, :]
            acc2 += tl.sum(Ak, axis=0)[None, :] * tl.sum(E, axis=0)[:, None]
        W1 = acc1
        W2 = acc2
        if TMA_ST:
            w1_desc.store([slot * F + f0, 0], tl.trans(W1))
            w2_desc.store([slot * D, f0], W2)
            s1_desc.store([slot * F + f0, 0], tl.trans(S1))
            s2_desc.store([slot * D, f0], S2)
        else:
            tl.store(w1_ptr + slot * fd + off1t, W1)
            tl.store(w2_ptr + slot * fd + off2, W2)
            tl.store(s1_ptr + slot * fd + off1t, S1)
            tl.store(s2_ptr + slot * fd + off2, S2)
    else:
        _after_previous_launch(PDL)
        W1 = tl.load(w1_ptr + slot * fd + off1t)
        W2 = tl.load(w2_ptr + slot * fd + off2)
    if c < N and START:
        rows = (bh * N * C + c * C + rr).to(tl.int64)
        if TMA_LD:
            K = k_desc.load([b, h, c * C, 0]).reshape(C, BD)
        else:
            K = tl.load(k_ptr + rows[:, None] * D + rd[None, :])
        Hk = _dot(K, W1, None, PREC)
        Ak = _act(Hk, GELU)
        krow = (c % 2) * 2 * BH * C + bh * C
        if TMA_ST:
            kept_desc.store([krow, f0], Hk)
        else:
            tl.store(kept_ptr + (krow + rr)[:, None] * F + rf[None, :], Hk)
        tl.atomic_add(aa_ptr + rows, tl.sum(Ak * Ak, axis=1), sem="relaxed")
        Yk = _dot(Ak, tl.trans(W2), None, PREC)
        if TMA_RED:
            pk_desc.atomic_add([bh * N * C + c * C, 0], Yk)
        else:
            tl.atomic_add(pk_ptr + rows[:, None] * D + rd[None, :], Yk, sem="relaxed")
