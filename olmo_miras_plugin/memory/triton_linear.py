"""Triton kernels for the linear memory (``impl="triton"``): the whole chunk loop in one program.

What it computes is exactly :func:`~.scan.chunked_scan` for one rule: a linear memory (depth 1,
``M_W(x) = W x`` with one ``d × d`` matrix per head), ℓ2 attentional bias, ``decay`` retention
(φ(A) = A) and gradient descent with momentum and per-token clipping (the ``titans`` preset with
``architecture.depth = 1``). For that rule a chunk of C tokens (keys K, values V, queries Q as
``C × d`` rows; A, S the accumulator and momentum at the chunk start) is

    Y  = Q Aᵀ                                  read-out (strictly causal: chunk-start weights)
    E  = K Aᵀ − V                              ∂ℓ/∂pred; the gradient of token t is G_t = e_t ⊗ k_t
    σ_t = min(1, τ / sqrt(‖e_t‖²‖k_t‖² + 1e-12))   clip factor (‖e ⊗ k‖ = ‖e‖·‖k‖)
    A' = a_keep A + a_mom S − Eᵀ diag(σ ∘ w_A) K
    S' = s_keep S − Eᵀ diag(σ ∘ w_S) K

where ``a_keep, a_mom, s_keep`` (one per chunk) and ``w_A, w_S`` (one per token, θ included) are
:meth:`~.optimizer.MomentumGD.chunk_coefficients`. Those depend only on the gates, so they are
computed beforehand in PyTorch (cheap, parallel over chunks, and autograd carries their gradient
back to θ, log η, log(1 − α)); the kernels take them as inputs and return their gradients.

Why a kernel: the PyTorch chunked scan launches a dozen small kernels per chunk, one chunk after
another, so at T = 32k and C = 64 it is 512 sequential steps of launch overhead. Here the chunk
loop runs inside the kernel, with the state held on chip in float32 for the whole sequence; only
K, V, Q (read) and Y (written) touch memory per chunk.

Parallelism: the rows of A and S (output features) never interact *except through the clip*,
whose factor needs ‖e_t‖ over all rows. So:
- without the clip (``max_grad_norm=None``; ``math.inf`` in the model config) each program owns
  ``BV`` rows of one head's state (:func:`_block_rows`: split until the grid covers the SMs; 16
  rows × 16 heads = 128 programs at d = 128 on an H100);
- with the clip one program holds a head's whole state (16 programs at batch 1 × 16 heads: the
  kernel then uses an eighth of an H100 and is ~3× slower at 16k; docs/performance.md).

Layout and memory:
- ``k, v, q, y``: ``(batch, heads, T, d)`` with any strides whose last one is 1 (the layer's
  ``b t (h d) -> b h t d`` view is used without a copy). Any float dtype; math is float32.
- State ``A, S``: ``(batch, heads, d, d)`` float32, row = output feature (``M(x) = A x``).
- ``d`` is padded to a power of two ≥ 16 (``BD``) with masks; C must be a power of two.
- Backward, in three steps: the forward also saves A and S at the start of every chunk
  (``2 · N · d² · 4`` bytes per (batch, head), what the PyTorch chunked scan keeps for backward
  anyway) and E of every token, only when a gradient is needed. :func:`_bwd_kernel` walks the
  chunks in reverse carrying only the state adjoints dA, dS on chip (the one truly sequential
  part, row-split like the forward) and saves them per chunk. Everything else — dK, dQ, dV and
  the coefficients' gradients — is chunk-parallel: :func:`_bwd_parallel_kernel`, one program per
  (batch·head, chunk), visiting the state 16 rows at a time.
- Resources (compiled offline for sm_90 with triton 3.6, ``num_stages=1``): at d = 128, C = 64
  the one-program-per-head forward uses 160 KiB and backward 224 KiB of shared memory (an H100
  block may have 227 KiB). Larger ``head_dim × chunk`` is refused (falls back).

Scope: the kernel needs the state at a chunk boundary whose read weights are the accumulator
itself, and whole chunks. ``triton_scan.scan`` (the dispatcher used by ``impl="triton"``) runs any partial
head/tail chunk through :func:`~.scan.chunked_scan` and the whole chunks in between through the
kernel; for anything else (another rule, no CUDA, Triton missing, float64, head_dim > 128, ...) it
falls back to the ``compiled`` (CUDA) or ``chunked`` (CPU) path. :func:`linear_scan` is the
kernel entry point itself and raises ``ValueError`` with the reason when it cannot run.

Knobs (environment, read per call): ``OLMO_MIRAS_TRITON_PRECISION`` = ``tf32`` (default on GPU)
/ ``tf32x3`` / ``ieee`` for the ``tl.dot`` inputs; ``OLMO_MIRAS_TRITON_WARPS`` (scan kernels;
default 4 for ≤ 32 rows per program, 8 above); ``OLMO_MIRAS_TRITON_BLOCK_ROWS`` (rows per program
without the clip); ``OLMO_MIRAS_TRITON_PAR_WARPS`` / ``OLMO_MIRAS_TRITON_PAR_ROWS`` /
``OLMO_MIRAS_TRITON_PAR_STAGES`` (the parallel backward, default 4 / 16 / 1; 2 stages measured
within 1 % of 1 at 16k and 32k, 3 stages 13 % slower); ``OLMO_MIRAS_TRITON_STAGES`` (scan
kernels; default 2 for 16 rows per program, 1 above: measured in docs/performance.md).
With ``TRITON_INTERPRET=1`` set
before ``triton`` is first imported, the kernels run in Triton's interpreter, also on CPU
tensors (that is how the tests check them without a GPU).
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from .objective import ObjectiveName
from .optimizer import MomentumGD
from .scan import Gates, MemoryRule, ScanState

try:  # Triton is optional: without it every call falls back to the PyTorch scan.
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - not installed (or a broken install): never fail the import
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]

__all__ = [
    "available", "rule_reason", "unsupported_reason", "supports", "linear_scan", "tensor_reason", "piece_reason",
    "chunk_coefficients",
]

MAX_HEAD_DIM = 128
MAX_CHUNK = 128
_EPS = 1e-12  # as in MemoryOptimizer.clip_scale


def available() -> bool:
    return triton is not None


def _interpreted() -> bool:
    """Whether the kernels were built for Triton's interpreter (``TRITON_INTERPRET=1`` at import)."""
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_fwd_kernel, InterpretedFunction)


def _pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


# ---------------------------------------------------------------------------------------- kernels
if triton is not None:

    @triton.jit
    def _row_block(pv, D, BD: tl.constexpr, BV: tl.constexpr):
        """Program ``pv``'s rows of a ``D × D`` state (``BV`` of them, padded to ``BD`` columns):
        feature indices and masks, and the offsets/mask of its ``(BV, BD)`` tile."""
        rd = tl.arange(0, BD)
        rv = pv * BV + tl.arange(0, BV)
        dmask = rd < D
        vmask = rv < D
        mat_off = rv[:, None] * D + rd[None, :]
        mat_mask = vmask[:, None] & dmask[None, :]
        return rd, rv, dmask, vmask, mat_off, mat_mask

    @triton.jit
    def _fwd_kernel(
        k_ptr, v_ptr, q_ptr, y_ptr,
        sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sq_b, sq_h, sq_t, sy_b, sy_h, sy_t,
        ak_ptr, am_ptr, sk_ptr, wa_ptr, ws_ptr,  # (BH, N), (BH, N), (BH, N), (BH, N, C), (BH, N, C)
        a0_ptr, s0_ptr, a_out_ptr, s_out_ptr,  # (BH, D, D)
        a_save_ptr, s_save_ptr,  # (BH, N, D, D): A, S at the start of each chunk
        e_save_ptr,  # (BH, T, D): E = K Aᵀ − V of every token
        H, N, D, tau,
        C: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, CLIP: tl.constexpr, SAVE: tl.constexpr,
        PREC: tl.constexpr,
    ):
        # Program (pid, pv) owns rows pv·BV … pv·BV + BV − 1 of A and S (output features) for one
        # (batch, head); K and Q are read whole. Rows never interact without the clip, whose
        # norm ‖e_t‖ needs them all: with CLIP the host launches BV = BD (one program per head).
        pid = tl.program_id(0).to(tl.int64)
        pv = tl.program_id(1)
        b = pid // H
        h = pid % H
        rc = tl.arange(0, C)
        rd, rv, dmask, vmask, mat_off, mat_mask = _row_block(pv, D, BD, BV)
        row_mask = dmask[None, :]  # (C, BD) tiles: padded features read as 0
        col_mask = vmask[None, :]  # (C, BV) tiles: this program's output features
        dd = D * D
        A = tl.load(a0_ptr + pid * dd + mat_off, mask=mat_mask, other=0.0).to(tl.float32)
        S = tl.load(s0_ptr + pid * dd + mat_off, mask=mat_mask, other=0.0).to(tl.float32)
        k_base = k_ptr + b * sk_b + h * sk_h
        v_base = v_ptr + b * sv_b + h * sv_h
        q_base = q_ptr + b * sq_b + h * sq_h
        y_base = y_ptr + b * sy_b + h * sy_h
        for c in range(N):
            cc = pid * N + c  # this chunk's row in the coefficient / saved-state arrays
            if SAVE:
                tl.store(a_save_ptr + cc * dd + mat_off, A, mask=mat_mask)
                tl.store(s_save_ptr + cc * dd + mat_off, S, mask=mat_mask)
            rows = (c * C + rc).to(tl.int64)  # int64: rows × stride may pass 2³¹
            Q = tl.load(q_base + rows[:, None] * sq_t + rd[None, :], mask=row_mask, other=0.0).to(tl.float32)
            At = tl.trans(A)
            Y = tl.dot(Q, At, input_precision=PREC)
            tl.store(y_base + rows[:, None] * sy_t + rv[None, :], Y.to(y_ptr.dtype.element_ty), mask=col_mask)
            K = tl.load(k_base + rows[:, None] * sk_t + rd[None, :], mask=row_mask, other=0.0).to(tl.float32)
            V = tl.load(v_base + rows[:, None] * sv_t + rv[None, :], mask=col_mask, other=0.0).to(tl.float32)
            E = tl.dot(K, At, input_precision=PREC) - V
            if SAVE:
                tl.store(e_save_ptr + (pid * N * C + rows[:, None]) * D + rv[None, :], E, mask=col_mask)
            wa = tl.load(wa_ptr + cc * C + rc)
            ws = tl.load(ws_ptr + cc * C + rc)
            if CLIP:
                sq = tl.sum(E * E, axis=1) * tl.sum(K * K, axis=1)
                scale = tl.minimum(tau * tl.rsqrt(sq + 1e-12), 1.0)
                wa = wa * scale
                ws = ws * scale
            a_keep = tl.load(ak_ptr + cc)
            a_mom = tl.load(am_ptr + cc)
            s_keep = tl.load(sk_ptr + cc)
            # A' = a_keep A + a_mom S − Eᵀ diag(w_A) K, accumulated in place (one d×d temporary).
            A = tl.dot(tl.trans(E * (-wa)[:, None]), K, acc=a_keep * A + a_mom * S, input_precision=PREC)
            S = tl.dot(tl.trans(E * (-ws)[:, None]), K, acc=s_keep * S, input_precision=PREC)
        tl.store(a_out_ptr + pid * dd + mat_off, A, mask=mat_mask)
        tl.store(s_out_ptr + pid * dd + mat_off, S, mask=mat_mask)

    @triton.jit
    def _bwd_chunk(
        dA, dS, c, pid, k_base, q_base, dy_base, sk_t, sq_t, sdy_t,
        ak_ptr, am_ptr, sk_ptr, wa_ptr, ws_ptr, e_save_ptr, da_save_ptr, ds_save_ptr, dw0_ptr,
        N, D, tau, pv,
        C: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, CLIP: tl.constexpr, PREC: tl.constexpr,
        FIRST: tl.constexpr,
    ):
        """Chunk c in reverse: save dA, dS of its end state, return those of its start state.

        Only the state recurrence is here; everything else (dK, dQ, dV, the coefficients'
        gradients) is chunk-parallel given these saved adjoints (:func:`_bwd_parallel_kernel`).
        ``FIRST`` (chunk 0): the read weights are a separate input (``read_weights``, equal in
        value to A), so the read-path adjoint dR goes to ``dw0`` instead of into dA.
        """
        rc = tl.arange(0, C)
        rd, rv, dmask, vmask, mat_off, mat_mask = _row_block(pv, D, BD, BV)  # this program's rows of dA, dS
        row_mask = dmask[None, :]
        col_mask = vmask[None, :]
        dd = D * D
        cc = pid * N + c
        tl.store(da_save_ptr + cc * dd + mat_off, dA, mask=mat_mask)
        tl.store(ds_save_ptr + cc * dd + mat_off, dS, mask=mat_mask)
        rows = (c * C + rc).to(tl.int64)  # int64: rows × stride may pass 2³¹
        K = tl.load(k_base + rows[:, None] * sk_t + rd[None, :], mask=row_mask, other=0.0).to(tl.float32)
        E = tl.load(e_save_ptr + (pid * N * C + rows[:, None]) * D + rv[None, :], mask=col_mask, other=0.0)
        wa0 = tl.load(wa_ptr + cc * C + rc)
        ws0 = tl.load(ws_ptr + cc * C + rc)
        # U_A = K dGaᵀ = −K dA'ᵀ, U_S = −K dS'ᵀ (dGa = −dA', dGm = −dS' for A' = … − Ga, S' = … − Gm)
        Ua = -tl.dot(K, tl.trans(dA), input_precision=PREC)
        Us = -tl.dot(K, tl.trans(dS), input_precision=PREC)
        if CLIP:
            kk = tl.sum(K * K, axis=1)
            ee = tl.sum(E * E, axis=1)
            nrm = ee * kk + 1e-12
            raw = tau * tl.rsqrt(nrm)
            scale = tl.minimum(raw, 1.0)
            dE = (wa0 * scale)[:, None] * Ua + (ws0 * scale)[:, None] * Us
            d_scale = tl.sum(E * Ua, axis=1) * wa0 + tl.sum(E * Us, axis=1) * ws0
            # σ = min(raw, 1): the gradient passes where raw ≤ 1 (as torch.clamp); d raw/dn = −raw/(2n)
            d_n = tl.where(raw <= 1.0, d_scale * (-0.5) * raw / nrm, 0.0)
            dE += (2.0 * d_n * kk)[:, None] * E
        else:
            dE = wa0[:, None] * Ua + ws0[:, None] * Us
        Q = tl.load(q_base + rows[:, None] * sq_t + rd[None, :], mask=row_mask, other=0.0).to(tl.float32)
        dY = tl.load(dy_base + rows[:, None] * sdy_t + rv[None, :], mask=col_mask, other=0.0).to(tl.float32)
        a_keep = tl.load(ak_ptr + cc)
        a_mom = tl.load(am_ptr + cc)
        s_keep = tl.load(sk_ptr + cc)
        dS = a_mom * dA + s_keep * dS
        # dR = dEᵀ K + dYᵀ Q: E = K Rᵀ − V and Y = Q Rᵀ
        if FIRST:
            dR = tl.dot(tl.trans(dY), Q, acc=tl.dot(tl.trans(dE), K, input_precision=PREC), input_precision=PREC)
            tl.store(dw0_ptr + pid * dd + mat_off, dR, mask=mat_mask)
            dA = a_keep * dA
        else:  # chunk c > 0 reads A_c itself: dA_c = a_keep dA' + dR
            dA = tl.dot(tl.trans(dE), K, acc=a_keep * dA, input_precision=PREC)
            dA = tl.dot(tl.trans(dY), Q, acc=dA, input_precision=PREC)
        return dA, dS

    @triton.jit
    def _bwd_kernel(
        k_ptr, q_ptr, dy_ptr,
        sk_b, sk_h, sk_t, sq_b, sq_h, sq_t, sdy_b, sdy_h, sdy_t,
        ak_ptr, am_ptr, sk_ptr, wa_ptr, ws_ptr,
        e_save_ptr,  # (BH, T, D): E from the forward
        da_save_ptr, ds_save_ptr,  # (BH, N, D, D): out, dA and dS of each chunk's end state
        da_out_ptr, ds_out_ptr, dw0_ptr, da0_ptr, ds0_ptr,  # (BH, D, D)
        H, N, D, tau,
        C: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, CLIP: tl.constexpr, PREC: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        pv = tl.program_id(1)
        b = pid // H
        h = pid % H
        _, _, _, _, mat_off, mat_mask = _row_block(pv, D, BD, BV)
        dd = D * D
        dA = tl.load(da_out_ptr + pid * dd + mat_off, mask=mat_mask, other=0.0).to(tl.float32)
        dS = tl.load(ds_out_ptr + pid * dd + mat_off, mask=mat_mask, other=0.0).to(tl.float32)
        k_base = k_ptr + b * sk_b + h * sk_h
        q_base = q_ptr + b * sq_b + h * sq_h
        dy_base = dy_ptr + b * sdy_b + h * sdy_h
        for i in range(N - 1):
            dA, dS = _bwd_chunk(
                dA, dS, N - 1 - i, pid, k_base, q_base, dy_base, sk_t, sq_t, sdy_t,
                ak_ptr, am_ptr, sk_ptr, wa_ptr, ws_ptr, e_save_ptr, da_save_ptr, ds_save_ptr, dw0_ptr,
                N, D, tau, pv, C, BD, BV, CLIP, PREC, False,
            )
        dA, dS = _bwd_chunk(
            dA, dS, 0, pid, k_base, q_base, dy_base, sk_t, sq_t, sdy_t,
            ak_ptr, am_ptr, sk_ptr, wa_ptr, ws_ptr, e_save_ptr, da_save_ptr, ds_save_ptr, dw0_ptr,
            N, D, tau, pv, C, BD, BV, CLIP, PREC, True,
        )
        tl.store(da0_ptr + pid * dd + mat_off, dA, mask=mat_mask)
        tl.store(ds0_ptr + pid * dd + mat_off, dS, mask=mat_mask)


    @triton.jit
    def _bwd_parallel_kernel(
        k_ptr, dy_ptr, sk_b, sk_h, sk_t, sdy_b, sdy_h, sdy_t,
        wa_ptr, ws_ptr,  # (BH, N, C)
        e_save_ptr,  # (BH, T, D)
        a_save_ptr, s_save_ptr,  # (BH, N, D, D)
        adj_ptr,  # (2, BH, N, D, D): dA', dS' of each chunk's end state (two planes of one buffer)
        dk_ptr, dv_ptr, dq_ptr,  # (BH, T, D) float32
        d_coef_ptr,  # (3, BH, N) float32: d a_keep, d a_mom, d s_keep
        d_w_ptr,  # (2, BH, N, C): d w_A, d w_S
        clip_c_ptr,  # (BH, T): with CLIP, the coefficient c_t of E in dE (the host adds −c∘E to dV)
        H, N, D, tau,
        C: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr, CLIP: tl.constexpr, PREC: tl.constexpr,
    ):
        """One program per (batch·head, chunk): every gradient of the chunk's inputs, given the
        saved chunk-start states A, S and the adjoints dA', dS' of its end state. With
        U_A = −K dA'ᵀ, U_S = −K dS'ᵀ and (σ = the clip factor, 1 without the clip):

            dE = σw_A∘U_A + σw_S∘U_S (+ c∘E);   dV = −dE;   dQ = dY A
            dK = −(σw_A∘E) dA' − (σw_S∘E) dS' + dE A (+ (2 d_n ‖e‖²)∘K)
            d w_A = σ⟨e, U_A⟩,  d w_S = σ⟨e, U_S⟩,  d a_keep = ⟨dA', A⟩, d a_mom = ⟨dA', S⟩, d s_keep = ⟨dS', S⟩

        The state's rows are visited BR at a time, so no d×d matrix is ever held whole. dA' and dS'
        are loaded as one ``(2·BR, d)`` tile with their rows interleaved, so U_A, U_S come from one
        dot and both adjoints' share of dK from another (K = 2·BR): two dots fewer per row block
        than one per adjoint, whose K = BR = 16 dots are what this kernel spends its time on.
        """
        pid = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1).to(tl.int64)
        b = pid // H
        h = pid % H
        cc = pid * N + c
        rc = tl.arange(0, C)
        rd = tl.arange(0, BD)
        dmask = rd < D
        row_mask = dmask[None, :]
        rows = (c * C + rc).to(tl.int64)
        K = tl.load(k_ptr + b * sk_b + h * sk_h + rows[:, None] * sk_t + rd[None, :], mask=row_mask, other=0.0).to(tl.float32)
        e_base = e_save_ptr + (pid * N * C + rows[:, None]) * D
        dy_base = dy_ptr + b * sdy_b + h * sdy_h + rows[:, None] * sdy_t
        w_a = tl.load(wa_ptr + cc * C + rc)
        w_s = tl.load(ws_ptr + cc * C + rc)
        kk = tl.sum(K * K, axis=1)
        if CLIP:  # the clip factor needs ‖e_t‖² over all rows first
            ee = tl.zeros([C], dtype=tl.float32)
            for r0 in range(0, D, BR):
                rr = r0 + tl.arange(0, BR)
                E = tl.load(e_base + rr[None, :], mask=(rr < D)[None, :], other=0.0)
                ee += tl.sum(E * E, axis=1)
            nrm = ee * kk + 1e-12
            raw = tau * tl.rsqrt(nrm)
            scale = tl.minimum(raw, 1.0)
            wa = w_a * scale
            ws = w_s * scale
            EA = tl.zeros([C, BD], dtype=tl.float32)
        else:
            wa = w_a
            ws = w_s
        g_wa = tl.zeros([C], dtype=tl.float32)
        g_ws = tl.zeros([C], dtype=tl.float32)
        dK = tl.zeros([C, BD], dtype=tl.float32)
        dQ = tl.zeros([C, BD], dtype=tl.float32)
        d_ak = 0.0
        d_am = 0.0
        d_sk = 0.0
        mat_base = cc * D * D
        plane = tl.num_programs(0).to(tl.int64) * N * D * D  # dS' plane offset in adj
        ri = tl.arange(0, 2 * BR)  # interleaved rows: 2j → dA'[r0 + j], 2j + 1 → dS'[r0 + j]
        for r0 in range(0, D, BR):
            rr = r0 + tl.arange(0, BR)
            rmask = rr < D
            mat_off = mat_base + rr[:, None] * D + rd[None, :]
            mat_mask = rmask[:, None] & dmask[None, :]
            A = tl.load(a_save_ptr + mat_off, mask=mat_mask, other=0.0)
            S = tl.load(s_save_ptr + mat_off, mask=mat_mask, other=0.0)
            adj_rows = r0 + ri // 2
            adj = tl.load(  # (2·BR, BD)
                adj_ptr + (ri % 2).to(tl.int64)[:, None] * plane + mat_base + adj_rows[:, None] * D + rd[None, :],
                mask=(adj_rows < D)[:, None] & dmask[None, :], other=0.0,
            )
            dA, dS = tl.split(tl.permute(tl.reshape(adj, (BR, 2, BD)), (0, 2, 1)))
            E = tl.load(e_base + rr[None, :], mask=rmask[None, :], other=0.0)
            dY = tl.load(dy_base + rr[None, :], mask=rmask[None, :], other=0.0).to(tl.float32)
            Ua, Us = tl.split(tl.reshape(-tl.dot(K, tl.trans(adj), input_precision=PREC), (C, BR, 2)))  # (C, BR) each
            g_wa += tl.sum(E * Ua, axis=1)
            g_ws += tl.sum(E * Us, axis=1)
            dE = wa[:, None] * Ua + ws[:, None] * Us
            tl.store(dv_ptr + (pid * N * C + rows[:, None]) * D + rr[None, :], -dE, mask=rmask[None, :])
            # −(σw_A∘E) dA' − (σw_S∘E) dS' as one dot over the interleaved rows
            E_w = tl.reshape(tl.join(E * (-wa)[:, None], E * (-ws)[:, None]), (C, 2 * BR))
            dK = tl.dot(E_w, adj, acc=dK, input_precision=PREC)
            dK = tl.dot(dE, A, acc=dK, input_precision=PREC)
            dQ = tl.dot(dY, A, acc=dQ, input_precision=PREC)
            if CLIP:
                EA = tl.dot(E, A, acc=EA, input_precision=PREC)
            d_ak += tl.sum(tl.sum(dA * A, axis=1), axis=0)
            d_am += tl.sum(tl.sum(dA * S, axis=1), axis=0)
            d_sk += tl.sum(tl.sum(dS * S, axis=1), axis=0)
        if CLIP:
            # σ = min(raw, 1): the gradient passes where raw ≤ 1 (as torch.clamp); d raw/dn = −raw/(2n)
            d_n = tl.where(raw <= 1.0, (g_wa * w_a + g_ws * w_s) * (-0.5) * raw / nrm, 0.0)
            cE = 2.0 * d_n * kk  # dE += cE∘E: dK gets cE∘(E A) here, dV gets −cE∘E on the host
            dK += cE[:, None] * EA + (2.0 * d_n * ee)[:, None] * K
            tl.store(clip_c_ptr + pid * N * C + rows, cE)
            g_wa = g_wa * scale
            g_ws = g_ws * scale
        out_off = (pid * N * C + rows[:, None]) * D + rd[None, :]
        tl.store(dk_ptr + out_off, dK, mask=row_mask)
        tl.store(dq_ptr + out_off, dQ, mask=row_mask)
        n_all = tl.num_programs(0).to(tl.int64) * N  # chunks over all (batch, head)
        tl.store(d_w_ptr + cc * C + rc, g_wa)
        tl.store(d_w_ptr + (n_all + cc) * C + rc, g_ws)
        tl.store(d_coef_ptr + cc, d_ak)
        tl.store(d_coef_ptr + n_all + cc, d_am)
        tl.store(d_coef_ptr + 2 * n_all + cc, d_sk)


def _bwd_parallel(k, e, dy, w_a, w_s, a_save, s_save, adj_save, chunk, tau, prec):
    """Gradients of the per-chunk inputs, all chunks at once (:func:`_bwd_parallel_kernel`), from the
    saved chunk-start states and the adjoints of each chunk's end state (from :func:`_bwd_kernel`)."""
    b, h, t, d = k.shape
    n = t // chunk
    dev = k.device
    dk, dv, dq = (torch.empty(b, h, t, d, device=dev, dtype=torch.float32) for _ in range(3))
    d_coef = torch.empty(3, b * h, n, device=dev, dtype=torch.float32)
    d_w = torch.empty(2, b * h, n, chunk, device=dev, dtype=torch.float32)
    clip_c = torch.empty(b * h, t, device=dev, dtype=torch.float32) if tau is not None else d_coef
    bd = _bd(d)
    _bwd_parallel_kernel[(b * h, n)](
        k, dy, *_strides(k), *_strides(dy), w_a, w_s, e, a_save, s_save, adj_save,
        dk, dv, dq, d_coef, d_w, clip_c,
        h, n, d, float(tau) if tau is not None else 1.0,
        # 16 rows × 4 warps: fastest of (4|8 warps) × (16|32|64 rows) on an H100 at T = 16k, d = 128
        # (5.8 vs 6.5–7.8 ms for the whole scan; docs/performance.md).
        C=chunk, BD=bd, BR=_env_rows("OLMO_MIRAS_TRITON_PAR_ROWS", min(bd, 16), bd), CLIP=tau is not None,
        PREC=prec, **_launch_opts(
            bd, os.environ.get("OLMO_MIRAS_TRITON_PAR_WARPS", "4"), os.environ.get("OLMO_MIRAS_TRITON_PAR_STAGES", "1")
        ),
    )
    if tau is not None:
        dv -= clip_c.view(b, h, t, 1) * e.view(b, h, t, d)
    f = lambda x: x.view(b, h, n)  # noqa: E731
    d_coefs = (f(d_coef[0]), f(d_coef[1]), f(d_coef[2]), d_w[0].view(b, h, n, chunk), d_w[1].view(b, h, n, chunk))
    return dk, dv, dq, d_coefs


# ---------------------------------------------------------------------------------------- launch
def _precision(device: torch.device, allow_bf16: bool = False) -> str:
    """The dots' operand precision: ``OLMO_MIRAS_TRITON_PRECISION``, else tf32 (ieee when
    interpreted). ``bf16`` only for kernels whose dots go through :func:`~.triton_mlp._dot`."""
    valid = ("tf32", "tf32x3", "ieee") + (("bf16",) if allow_bf16 else ())
    env = os.environ.get("OLMO_MIRAS_TRITON_PRECISION")
    if env:
        if env not in valid:
            raise ValueError(f"OLMO_MIRAS_TRITON_PRECISION must be one of {', '.join(valid)} here, got {env!r}")
        return env
    return "ieee" if _interpreted() else "tf32"


def _env_rows(name: str, default: int, bd: int) -> int:
    """A rows-per-program knob: a power of two from 16 (``tl.dot``'s minimum) to ``bd``."""
    env = os.environ.get(name)
    if not env:
        return default
    rows = int(env) if env.isdigit() else -1
    if not (_pow2(rows) and 16 <= rows <= bd):
        raise ValueError(f"{name} must be a power of two in 16..{bd}, got {env!r}")
    return rows


def _block_rows(bd: int, programs: int, device: torch.device, clip: bool) -> int:
    """Rows of the state per program (``BV``). The clip needs whole rows (one program per head);
    without it, split rows until the grid covers the GPU's SMs (16-row minimum: ``tl.dot``'s)."""
    if clip:
        return bd
    if os.environ.get("OLMO_MIRAS_TRITON_BLOCK_ROWS"):
        return _env_rows("OLMO_MIRAS_TRITON_BLOCK_ROWS", bd, bd)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    bv = bd
    while bv > 16 and programs * (bd // bv) < sms:
        bv //= 2
    return bv


def _launch_opts(block_rows: int, warps_env: Optional[str] = None, stages_env: Optional[str] = None) -> dict:
    if _interpreted():
        return {}
    warps = int(warps_env or os.environ.get("OLMO_MIRAS_TRITON_WARPS", "4" if block_rows <= 32 else "8"))
    # Two stages let 16-row scan programs load the next chunk's K, Q, V while this chunk's dots
    # run: on an H100, batch 1 × 16k (16 rows per program) 5.82 -> 4.96 ms for the whole scan, but
    # batch 4 × 8k (32 rows) 8.78 -> 10.29 ms. A whole-row program (the clip) has no shared memory
    # to spare for a second stage (224 KiB of 227 in the backward).
    stages = int(stages_env or os.environ.get("OLMO_MIRAS_TRITON_STAGES", "2" if block_rows <= 16 else "1"))
    return dict(num_warps=warps, num_stages=stages)


def _bd(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _strides(x: torch.Tensor) -> Tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """Unit stride on the feature axis (the kernels index features contiguously)."""
    return x if x.stride(-1) == 1 else x.contiguous()


class _LinearScan(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx, k, v, q, a_keep, a_mom, s_keep, w_a, w_s, read0, accum0, mom0, chunk, tau
    ):
        b, h, t, d = k.shape
        n = t // chunk
        k, v, q = _rows(k), _rows(v), _rows(q)
        coefs = [x.detach().float().contiguous() for x in (a_keep, a_mom, s_keep, w_a, w_s)]
        a0 = accum0.detach().float().contiguous()
        s0 = mom0.detach().float().contiguous()
        y = torch.empty_like(q)
        a_out = torch.empty_like(a0)
        s_out = torch.empty_like(s0)
        save = any(ctx.needs_input_grad)
        if save:
            a_save = torch.empty(b, h, n, d, d, device=k.device, dtype=torch.float32)
            s_save = torch.empty_like(a_save)
            e_save = torch.empty(b, h, t, d, device=k.device, dtype=torch.float32)
        else:
            a_save = s_save = e_save = a_out  # never written (SAVE=False)
        clip = tau is not None
        prec = _precision(k.device)
        bd = _bd(d)
        bv = _block_rows(bd, b * h, k.device, clip)
        _fwd_kernel[(b * h, bd // bv)](
            k, v, q, y, *_strides(k), *_strides(v), *_strides(q), *_strides(y),
            *coefs, a0, s0, a_out, s_out, a_save, s_save, e_save,
            h, n, d, float(tau) if clip else 1.0,
            C=chunk, BD=bd, BV=bv, CLIP=clip, SAVE=save, PREC=prec, **_launch_opts(bv),
        )
        if save:
            ctx.save_for_backward(k, e_save, q, *coefs, a_save, s_save)
            ctx.meta = (chunk, tau, prec, bv, v.dtype, read0.dtype, accum0.dtype, mom0.dtype,
                        [x.dtype for x in (a_keep, a_mom, s_keep, w_a, w_s)])
        return y, a_out, s_out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, da_out, ds_out):  # type: ignore[override]
        k, e_save, q, a_keep, a_mom, s_keep, w_a, w_s, a_save, s_save = ctx.saved_tensors
        chunk, tau, prec, bv, v_dt, read_dt, accum_dt, mom_dt, coef_dts = ctx.meta
        b, h, t, d = k.shape
        n = t // chunk
        dy = torch.zeros_like(q) if dy is None else _rows(dy)
        zeros = lambda: torch.zeros(b, h, d, d, device=k.device, dtype=torch.float32)  # noqa: E731
        da_out = zeros() if da_out is None else da_out.float().contiguous()
        ds_out = zeros() if ds_out is None else ds_out.float().contiguous()
        adj_save = torch.empty(2, *a_save.shape, device=a_save.device, dtype=torch.float32)  # dA', dS' planes
        da_save, ds_save = adj_save[0], adj_save[1]
        dw0, da0, ds0 = zeros(), zeros(), zeros()
        bd = _bd(d)
        _bwd_kernel[(b * h, bd // bv)](
            k, q, dy, *_strides(k), *_strides(q), *_strides(dy),
            a_keep, a_mom, s_keep, w_a, w_s, e_save, da_save, ds_save,
            da_out, ds_out, dw0, da0, ds0,
            h, n, d, float(tau) if tau is not None else 1.0,
            C=chunk, BD=bd, BV=bv, CLIP=tau is not None, PREC=prec, **_launch_opts(bv),
        )
        dk, dv, dq, d_coefs = _bwd_parallel(
            k, e_save, dy, w_a, w_s, a_save, s_save, adj_save, chunk, tau, prec
        )
        del adj_save, da_save, ds_save
        d_coefs = [g.to(dt) for g, dt in zip(d_coefs, coef_dts)]
        return dk.to(k.dtype), dv.to(v_dt), dq.to(q.dtype), *d_coefs, dw0.to(read_dt), da0.to(accum_dt), ds0.to(mom_dt), None, None


# ---------------------------------------------------------------------------------------- dispatch
def rule_reason(rule: MemoryRule) -> Optional[str]:
    """Why the linear kernels cannot compute this rule (None: they can)."""
    arch, objective, retention, optimizer = rule
    if arch.depth != 1 or arch.config.residual_norm:
        return "the triton kernel needs a linear memory (architecture depth 1, no residual_norm)"
    if objective.name != ObjectiveName.l2:
        return f"the triton kernel needs the l2 attentional bias, not {objective.name.value!r}"
    if not retention.is_identity:
        return f"the triton kernel needs decay retention, not {retention.name.value!r}"
    if type(optimizer) is not MomentumGD or not optimizer.uses_momentum:
        return "the triton kernel needs the momentum optimizer"
    return None


def unsupported_reason(
    rule: MemoryRule, state: ScanState, k: torch.Tensor, chunk_size: int, v: Optional[torch.Tensor] = None,
    q: Optional[torch.Tensor] = None,
) -> Optional[str]:
    """Why the kernel cannot run this rule on these tensors at all (None: it can), independent of
    where the piece starts and ends (see :func:`linear_scan` for that)."""
    if triton is None:
        return "triton is not installed"
    reason = rule_reason(rule)
    if reason is not None:
        return reason
    if state.momentum is None:
        return "the triton kernel needs a momentum state"
    return tensor_reason(state, k, v, q, chunk_size)


def tensor_reason(
    state: ScanState, k: torch.Tensor, v: Optional[torch.Tensor], q: Optional[torch.Tensor], chunk_size: int
) -> Optional[str]:
    """Why the Triton kernels (linear and MLP) cannot take these tensors (None: they can)."""
    if not (k.is_cuda or _interpreted()):
        return "the triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 when this module is imported)"
    if k.ndim != 4:
        return f"expected (batch, heads, seq, head_dim) inputs, got shape {tuple(k.shape)}"
    for x in (k, v, q):
        if x is not None and x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return f"the triton kernel takes float32/bfloat16/float16 inputs, got {x.dtype}"
    for s in (*state.accum, *(state.momentum or [])):
        if s.dtype != torch.float32:
            return f"the triton kernel keeps a float32 state, got {s.dtype}"
    d = k.shape[-1]
    if d > MAX_HEAD_DIM:
        return f"the triton kernel supports head_dim ≤ {MAX_HEAD_DIM}, got {d}"
    if not _pow2(chunk_size) or chunk_size > MAX_CHUNK or (chunk_size < 16 and not _interpreted()):
        return f"the triton kernel needs a power-of-two chunk size in 16..{MAX_CHUNK}, got {chunk_size}"
    if _bd(d) * chunk_size > 8192 and not _interpreted():
        # Shared memory (sm_90, triton 3.6, compiled offline; tests/test_triton_resources.py): the
        # linear backward needs 224 KiB at d = 128, C = 64, the most an H100 block can have, and
        # 320 KiB at C = 128; the MLP kernels' tiles grow the same way.
        return f"the triton kernel supports head_dim × chunk ≤ 8192 (padded), got {d} × {chunk_size}"
    return None


def supports(rule: MemoryRule, state: ScanState, k: torch.Tensor, chunk_size: int) -> bool:
    """Whether :func:`scan` will run (the whole chunks of) this call through the kernel."""
    return unsupported_reason(rule, state, k, chunk_size) is None


def _reads_accum(state: ScanState) -> bool:
    """The read weights are the accumulator itself (same storage), as every state that this package
    produces at a chunk boundary has for an identity retention; then chunk 0 may read A."""
    return all(
        r is a
        or (r.data_ptr() == a.data_ptr() and r.shape == a.shape and r.stride() == a.stride() and r.dtype == a.dtype)
        for r, a in zip(state.read_weights, state.accum)
    )


def piece_reason(state: ScanState, t: int, chunk_size: int) -> Optional[str]:
    """Why a kernel cannot take this piece of ``t`` tokens from this state (None: it can): the
    kernels run whole chunks from a chunk boundary whose read weights are the accumulator."""
    c = chunk_size
    if state.position % c != 0:
        return f"the triton kernel starts at a chunk boundary; position {state.position} is not a multiple of {c}"
    if t == 0 or t % c != 0:
        return f"the triton kernel takes whole chunks; {t} tokens is not a positive multiple of {c}"
    if not _reads_accum(state):
        return "the triton kernel needs a state whose read_weights are its accum (as produced at chunk boundaries)"
    return None


def chunk_coefficients(rule: MemoryRule, gates: Gates, chunk_size: int):
    """The optimizer's closed-form coefficients of every whole chunk (``(batch, heads, N[, C])``),
    computed in PyTorch so autograd carries their gradients back to the gates."""
    b, h, t = gates.theta.shape
    n, c = t // chunk_size, chunk_size
    return rule.optimizer.chunk_coefficients(
        *(g.reshape(b, h, n, c) for g in (gates.theta, gates.log_eta, gates.log_keep)),
        torch.ones(1, device=gates.theta.device, dtype=gates.theta.dtype).expand(b, h, n, c),
    )


def linear_scan(
    rule: MemoryRule, state: ScanState, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, gates: Gates, chunk_size: int
) -> Tuple[torch.Tensor, ScanState]:
    """The kernel itself: whole chunks from a chunk boundary. Same contract as ``chunked_scan``.

    Raises ``ValueError`` (with the reason) where the kernel cannot compute this call.
    """
    reason = unsupported_reason(rule, state, k, chunk_size, v, q) or piece_reason(state, k.shape[2], chunk_size)
    if reason is not None:
        raise ValueError(reason)
    c, t = chunk_size, k.shape[2]
    coef = chunk_coefficients(rule, gates, c)
    assert state.momentum is not None
    y, a_new, s_new = _LinearScan.apply(
        k, v, q,
        coef.accum_keep, coef.accum_from_momentum, coef.momentum_keep,
        coef.accum_token_weight, coef.momentum_token_weight,
        state.read_weights[0], state.accum[0], state.momentum[0],
        c, rule.optimizer.max_grad_norm,
    )
    # decay retention: the next chunk reads A itself
    return y, ScanState([a_new], [s_new], [a_new], state.position + t)
