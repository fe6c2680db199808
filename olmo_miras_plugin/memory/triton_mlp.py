"""Triton kernels for the depth-2 MLP memory (``impl="triton"`` / ``"triton_graphed"``): a forward
kernel and a backward kernel (training; opt-in, see "Status"), one program per (batch, head), with
or without the clip. The dispatcher runs the hidden-split kernels of :mod:`.triton_mlp_split`
instead unless ``OLMO_MIRAS_TRITON_SPLIT=0``.

What they compute is exactly :func:`~.scan.chunked_scan` for a depth-2 MLP memory
``M(x) = W₂ act(W₁ x)`` (``W₁``: ``F × d``, ``W₂``: ``d × F``, act = GELU or SiLU, no
``residual_norm``), ℓ2 attentional bias, ``decay`` retention and gradient descent with or without
momentum and the per-token clip. For a chunk of C tokens (rows of K, V, Q; weights at the chunk
start; ``act'`` the activation's derivative):

    Y  = act(Q W₁ᵀ) W₂ᵀ                        read-out (strictly causal: chunk-start weights)
    Hk = K W₁ᵀ;  Ak = act(Hk);  E = Ak W₂ᵀ − V    ∂ℓ/∂prediction of every key
    D  = (E W₂) ∘ act'(Hk)                      ∂ℓ/∂Hk; token t's gradients are D_t ⊗ k_t, E_t ⊗ Ak_t
    σ_t = min(1, τ / sqrt(‖E_t‖²‖Ak_t‖² + ‖D_t‖²‖k_t‖² + 1e-12))      clip factor
    W₁' = a_keep W₁ + a_mom S₁ − Dᵀ diag(σ∘w_A) K;   S₁' = s_keep S₁ − Dᵀ diag(σ∘w_S) K
    W₂' = a_keep W₂ + a_mom S₂ − Eᵀ diag(σ∘w_A) Ak;  S₂' = s_keep S₂ − Eᵀ diag(σ∘w_S) Ak

with the coefficients of :meth:`~.optimizer.MomentumGD.chunk_coefficients` (computed beforehand in
PyTorch, as for the linear kernel in ``triton_linear.py``; autograd takes their gradients on).

Layout: one program per (batch, head) runs every chunk. Its weights (``2 · F · d`` floats, 256 KiB
at d = 128, F = 256 in float32; twice that with momentum) do not fit on chip, so they live in the
output state tensors (global memory; they stay in L2) and each chunk visits them ``BF`` hidden
units at a time: rows of W₁, columns of W₂. Hidden units interact only through the sums that make
Y, E and the clip norm, so each forward chunk makes three passes (four with the clip): read-out,
keys' prediction, [clip norm,] update. A barrier ends each chunk so the next one reads the weights
this one wrote. ``k, v, q, y``: ``(batch, heads, T, d)`` with unit feature stride; math in
float32; ``d`` padded to a power of two ≥ 16 with masks.

Backward (:func:`_mlp_bwd_kernel`): when a gradient is needed the forward also saves each chunk's
start state (``N · 4 · F · d`` floats per (batch, head): 2 GiB at T = 16k for OLMo2-1B shapes);
the backward walks the chunks in reverse with the adjoints of W and S in global memory, recomputing
each chunk's activations from the saved state (formulas in the kernel's docstring, including the
second derivative of the activation and the clip).

Status (H100): the dispatcher (``triton_scan``) runs the hidden-split kernels of
:mod:`.triton_mlp_split` instead, with and without the clip, for training and inference; these
kernels are the fallback with ``OLMO_MIRAS_TRITON_SPLIT=0``. Their forward streams 394k tokens/s
per layer at batch 1 (2026-11-25, docs/performance.md). Their backward matches autograd through
``chunked_scan`` (interpreter 1e-4; H100 IEEE 1e-3 at d = 128, F = 256, C = 64) but is slow:
52.9 ms backward + 10.9 ms forward at 4k tokens (2026-11-26) against 18 ms for the whole
``graphed`` layer, because one program per (batch, head) uses 16 of 132 SMs at batch 1. So
training a *clipped* MLP memory through them is opt-in (``OLMO_MIRAS_TRITON_MLP_TRAIN=1``); with
``OLMO_MIRAS_TRITON_SPLIT=0`` and without it such calls fall back to the compiled PyTorch scan.

Knobs (environment, read per call): ``OLMO_MIRAS_TRITON_PRECISION`` (as for the linear kernel),
``OLMO_MIRAS_TRITON_MLP_BLOCK`` (hidden units per forward pass, default 32),
``OLMO_MIRAS_TRITON_MLP_BWD_BLOCK`` (backward, default 16), ``OLMO_MIRAS_TRITON_MLP_WARPS``
(forward, default 8), ``OLMO_MIRAS_TRITON_MLP_BWD_WARPS`` (default 4),
``OLMO_MIRAS_TRITON_MLP_STAGES`` (default 1) and ``OLMO_MIRAS_TRITON_MLP_TRAIN``.
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Tuple

import torch

from .architecture import ActivationName
from .objective import ObjectiveName
from .optimizer import MomentumGD
from .scan import Gates, MemoryRule, ScanState
from .triton_linear import (
    _bd,
    _env_rows,
    _interpreted,
    _precision,
    _rows,
    _strides,
    chunk_coefficients,
    piece_reason,
    tensor_reason,
)

try:
    import triton
    import triton.language as tl
    from triton.runtime.errors import OutOfResources
except Exception:  # pragma: no cover - not installed: unsupported_reason says so
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]

    class OutOfResources(Exception):  # type: ignore[no-redef]
        pass


log = logging.getLogger(__name__)

# Shared memory at d = 128, C = 64, TF32 (sm_90, triton 3.6, compiled offline; an H100 block may
# have 227 KiB): forward 32 units × 8 warps 200 KiB; backward 16 × 4 216 KiB, 16 × 8 300 KiB,
# 32 × 4 240 KiB, 32 × 8 344 KiB (the last refused on an H100). tests/test_triton_mlp.py checks.
FWD_BLOCK, FWD_WARPS = 32, 8
BWD_BLOCK, BWD_WARPS = 16, 4

TRAIN_ENV = "OLMO_MIRAS_TRITON_MLP_TRAIN"
"""Set to 1 to train the MLP memory through these kernels (experimental; see the module docstring)."""

__all__ = ["unsupported_reason", "mlp_scan"]


if triton is not None:

    @triton.jit
    def _act(h, GELU: tl.constexpr):
        if GELU:  # exact (erf) GELU, as torch's default
            return 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
        return h * tl.sigmoid(h)

    @triton.jit
    def _act_grad(h, GELU: tl.constexpr):
        if GELU:  # Φ(h) + h φ(h)
            cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
            return cdf + h * tl.exp(-0.5 * h * h) * 0.3989422804014327
        s = tl.sigmoid(h)
        return s * (1.0 + h * (1.0 - s))

    @triton.jit
    def _act_grad2(h, GELU: tl.constexpr):
        if GELU:  # d/dh [Φ(h) + h φ(h)] = φ(h) (2 − h²)
            return tl.exp(-0.5 * h * h) * 0.3989422804014327 * (2.0 - h * h)
        s = tl.sigmoid(h)
        return s * (1.0 - s) * (2.0 + h * (1.0 - 2.0 * s))

    @triton.jit
    def _pair_inner(a1, b1, a2, b2):
        """``⟨a₁, b₁⟩ + ⟨a₂, b₂⟩`` (Frobenius): a coefficient's gradient from a pair of weight tiles
        (e.g. d a_keep = ⟨G₁, W₁⟩ + ⟨G₂, W₂⟩)."""
        return tl.sum(tl.sum(a1 * b1, axis=1), axis=0) + tl.sum(tl.sum(a2 * b2, axis=1), axis=0)

    @triton.jit
    def _dot(a, b, acc, PREC: tl.constexpr):
        """``a @ b (+ acc)`` in float32 with operand precision ``PREC``: Triton's ``tf32``,
        ``tf32x3`` or ``ieee``, or ``bf16`` (operands rounded to bfloat16: half the shared memory
        and a shorter tensor-core chain than tf32, the accumulation stays float32)."""
        if PREC == "bf16":
            out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc=acc, out_dtype=tl.float32)
        else:
            out = tl.dot(a, b, acc=acc, input_precision=PREC)
        return out

    @triton.jit
    def _block_offsets(f0, D, F, rd, dmask, BF: tl.constexpr):
        """Hidden units f0 … f0 + BF − 1: offsets and masks of their W₁ rows ``(BF, BD)`` (in an
        ``F × D`` matrix) and W₂ columns ``(BD, BF)`` (in a ``D × F`` matrix)."""
        rf = f0 + tl.arange(0, BF)
        fmask = rf < F
        off1 = rf[:, None] * D + rd[None, :]
        mask1 = fmask[:, None] & dmask[None, :]
        off2 = rd[:, None] * F + rf[None, :]
        mask2 = dmask[:, None] & fmask[None, :]
        return off1, mask1, off2, mask2

    @triton.jit
    def _hidden_block(w1_base, w2_base, f0, D, F, rd, dmask, BF: tl.constexpr):
        """:func:`_block_offsets` and the weights there."""
        off1, mask1, off2, mask2 = _block_offsets(f0, D, F, rd, dmask, BF)
        w1 = tl.load(w1_base + off1, mask=mask1, other=0.0)
        w2 = tl.load(w2_base + off2, mask=mask2, other=0.0)
        return off1, mask1, off2, mask2, w1, w2

    @triton.jit
    def _key_block(K, E, W1, W2, GELU: tl.constexpr, PREC: tl.constexpr):
        """One hidden block's key-side forward at the chunk-start weights: Hk = K W₁ᵀ, Ak = act(Hk),
        B = E W₂ (= ∂ℓ/∂Ak) and D = B ∘ act'(Hk) (= ∂ℓ/∂Hk)."""
        Hk = _dot(K, tl.trans(W1), None, PREC)
        B = _dot(E, W2, None, PREC)
        return Hk, _act(Hk, GELU), B, B * _act_grad(Hk, GELU)

    @triton.jit
    def _keys_error(K, V, w1_base, w2_base, D, F, rd, dmask, BF: tl.constexpr, GELU: tl.constexpr, PREC: tl.constexpr):
        """E = act(K W₁ᵀ) W₂ᵀ − V over all hidden blocks, and ‖Ak_t‖² (the clip's layer-2 input norm)."""
        E = -V
        aa = tl.zeros([V.shape[0]], dtype=tl.float32)
        for f0 in range(0, F, BF):
            _, _, _, _, W1, W2 = _hidden_block(w1_base, w2_base, f0, D, F, rd, dmask, BF)
            Ak = _act(tl.dot(K, tl.trans(W1), input_precision=PREC), GELU)
            E = tl.dot(Ak, tl.trans(W2), acc=E, input_precision=PREC)
            aa += tl.sum(Ak * Ak, axis=1)
        return E, aa

    @triton.jit
    def _delta_sq(K, E, w1_base, w2_base, D, F, rd, dmask, BF: tl.constexpr, GELU: tl.constexpr, PREC: tl.constexpr):
        """‖D_t‖² over all hidden blocks (the clip's layer-1 gradient norm, with ‖k_t‖²)."""
        dd = tl.zeros([K.shape[0]], dtype=tl.float32)
        for f0 in range(0, F, BF):
            _, _, _, _, W1, W2 = _hidden_block(w1_base, w2_base, f0, D, F, rd, dmask, BF)
            _, _, _, Dk = _key_block(K, E, W1, W2, GELU, PREC)
            dd += tl.sum(Dk * Dk, axis=1)
        return dd

    @triton.jit
    def _mlp_fwd_kernel(
        k_ptr, v_ptr, q_ptr, y_ptr,
        sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sq_b, sq_h, sq_t, sy_b, sy_h, sy_t,
        ak_ptr, am_ptr, skeep_ptr, wa_ptr, ws_ptr,  # (BH, N), (BH, N), (BH, N), (BH, N, C), (BH, N, C)
        w1_ptr, w2_ptr, s1_ptr, s2_ptr,  # (BH, F, D), (BH, D, F), same: the state, updated in place
        w1_save, w2_save, s1_save, s2_save,  # (BH, N, F, D), (BH, N, D, F): the state at each chunk start
        H, N, D, F, tau,
        C: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, CLIP: tl.constexpr, MOM: tl.constexpr,
        GELU: tl.constexpr, SAVE: tl.constexpr, PREC: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        b = pid // H
        h = pid % H
        rc = tl.arange(0, C)
        rd = tl.arange(0, BD)
        dmask = rd < D
        row_mask = dmask[None, :]
        w1_base = w1_ptr + pid * F * D
        w2_base = w2_ptr + pid * D * F
        s1_base = s1_ptr + pid * F * D
        s2_base = s2_ptr + pid * D * F
        k_base = k_ptr + b * sk_b + h * sk_h
        v_base = v_ptr + b * sv_b + h * sv_h
        q_base = q_ptr + b * sq_b + h * sq_h
        y_base = y_ptr + b * sy_b + h * sy_h
        for c in range(N):
            cc = pid * N + c  # this chunk's row in the coefficient arrays
            rows = (c * C + rc).to(tl.int64)  # int64: rows × stride may pass 2³¹
            # Pass 1, read-out: Y = act(Q W₁ᵀ) W₂ᵀ, summed over hidden blocks.
            Q = tl.load(q_base + rows[:, None] * sq_t + rd[None, :], mask=row_mask, other=0.0).to(tl.float32)
            Y = tl.zeros([C, BD], dtype=tl.float32)
            for f0 in range(0, F, BF):
                off1, mask1, off2, mask2, W1, W2 = _hidden_block(w1_base, w2_base, f0, D, F, rd, dmask, BF)
                if SAVE:
                    tl.store(w1_save + cc * F * D + off1, W1, mask=mask1)
                    tl.store(w2_save + cc * D * F + off2, W2, mask=mask2)
                Aq = _act(tl.dot(Q, tl.trans(W1), input_precision=PREC), GELU)
                Y = tl.dot(Aq, tl.trans(W2), acc=Y, input_precision=PREC)
            tl.store(y_base + rows[:, None] * sy_t + rd[None, :], Y.to(y_ptr.dtype.element_ty), mask=row_mask)
            # Pass 2, the keys' prediction: E = act(K W₁ᵀ) W₂ᵀ − V (and ‖Ak_t‖² for the clip).
            K = tl.load(k_base + rows[:, None] * sk_t + rd[None, :], mask=row_mask, other=0.0).to(tl.float32)
            V = tl.load(v_base + rows[:, None] * sv_t + rd[None, :], mask=row_mask, other=0.0).to(tl.float32)
            E, aa = _keys_error(K, V, w1_base, w2_base, D, F, rd, dmask, BF, GELU, PREC)
            wa = tl.load(wa_ptr + cc * C + rc)
            ws = wa
            if MOM:
                ws = tl.load(ws_ptr + cc * C + rc)
            if CLIP:
                # Pass 3 (clip only): ‖D_t‖², then σ_t over both layers' gradients.
                dd = _delta_sq(K, E, w1_base, w2_base, D, F, rd, dmask, BF, GELU, PREC)
                sq = tl.sum(E * E, axis=1) * aa + dd * tl.sum(K * K, axis=1)
                scale = tl.minimum(tau * tl.rsqrt(sq + 1e-12), 1.0)
                wa = wa * scale
                ws = ws * scale
            a_keep = tl.load(ak_ptr + cc)
            a_mom = a_keep
            s_keep = a_keep
            if MOM:
                a_mom = tl.load(am_ptr + cc)
                s_keep = tl.load(skeep_ptr + cc)
            # Last pass, the update, one hidden block at a time (each block reads its old weights
            # before it writes the new ones; no other block touches them).
            for f0 in range(0, F, BF):
                off1, mask1, off2, mask2, W1, W2 = _hidden_block(w1_base, w2_base, f0, D, F, rd, dmask, BF)
                Hk = tl.dot(K, tl.trans(W1), input_precision=PREC)
                Ak = _act(Hk, GELU)
                Dk = tl.dot(E, W2, input_precision=PREC) * _act_grad(Hk, GELU)  # (C, BF)
                acc1 = a_keep * W1
                acc2 = a_keep * W2
                if MOM:
                    S1 = tl.load(s1_base + off1, mask=mask1, other=0.0)
                    S2 = tl.load(s2_base + off2, mask=mask2, other=0.0)
                    if SAVE:
                        tl.store(s1_save + cc * F * D + off1, S1, mask=mask1)
                        tl.store(s2_save + cc * D * F + off2, S2, mask=mask2)
                    acc1 += a_mom * S1
                    acc2 += a_mom * S2
                    S1 = tl.dot(tl.trans(Dk * (-ws)[:, None]), K, acc=s_keep * S1, input_precision=PREC)
                    S2 = tl.dot(tl.trans(E * (-ws)[:, None]), Ak, acc=s_keep * S2, input_precision=PREC)
                    tl.store(s1_base + off1, S1, mask=mask1)
                    tl.store(s2_base + off2, S2, mask=mask2)
                W1 = tl.dot(tl.trans(Dk * (-wa)[:, None]), K, acc=acc1, input_precision=PREC)  # (BF, BD)
                W2 = tl.dot(tl.trans(E * (-wa)[:, None]), Ak, acc=acc2, input_precision=PREC)  # (BD, BF)
                tl.store(w1_base + off1, W1, mask=mask1)
                tl.store(w2_base + off2, W2, mask=mask2)
            tl.debug_barrier()  # the next chunk reads what every thread of this one wrote

    @triton.jit
    def _mlp_bwd_kernel(
        k_ptr, v_ptr, q_ptr, dy_ptr,
        sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sq_b, sq_h, sq_t, sdy_b, sdy_h, sdy_t,
        ak_ptr, am_ptr, skeep_ptr, wa_ptr, ws_ptr,  # as the forward's
        w1_save, w2_save, s1_save, s2_save,  # (BH, N, F, D), (BH, N, D, F): each chunk's start state
        g1_ptr, g2_ptr, h1_ptr, h2_ptr,  # (BH, F, D), (BH, D, F): adjoints of W₁, W₂, S₁, S₂, in place
        r1_ptr, r2_ptr,  # (BH, F, D), (BH, D, F): scratch; at the end, the adjoint of the read weights
        dk_ptr, dv_ptr, dq_ptr,  # (BH, T, D) float32
        dw_ptr,  # (2, BH, N, C): d w_A, d w_S
        dcoef_ptr,  # (3, BH, N): d a_keep, d a_mom, d s_keep
        H, N, D, F, tau,
        C: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, CLIP: tl.constexpr, MOM: tl.constexpr,
        GELU: tl.constexpr, PREC: tl.constexpr,
    ):
        """The chunks in reverse, one program per (batch, head), with the adjoints G (of W) and H
        (of S) of the current chunk's *end* state in global memory. Per chunk, from its saved
        start state (ω = σ∘w, the clipped token weights; n_t the clip's squared norm):

            L = ⟨G₁, W₁'⟩ + ⟨G₂, W₂'⟩ + ⟨H₁, S₁'⟩ + ⟨H₂, S₂'⟩ + ⟨dY, Y⟩, whose gradient gives
            dω_A = −(rowsum(D ∘ K G₁ᵀ) + rowsum((E G₂) ∘ Ak)),  dω_S likewise with H
            dD   = −(ω_A∘K G₁ᵀ + ω_S∘K H₁ᵀ) + 2 dn ‖k‖² D,       dB = dD ∘ act'(Hk)
            dE   = dB W₂ᵀ − ω_A∘Ak G₂ᵀ − ω_S∘Ak H₂ᵀ + 2 dn ‖Ak‖² E          (dV = −dE)
            dAk  = dE W₂ − ω_A∘E G₂ − ω_S∘E H₂ + 2 dn ‖e‖² Ak
            dHk  = dAk ∘ act'(Hk) + dD ∘ B ∘ act''(Hk)
            dK   = dHk W₁ − ω_A∘D G₁ − ω_S∘D H₁ + 2 dn ‖D‖² K
            via W₁ = dHkᵀ K + dHqᵀ Q,   via W₂ = Eᵀ dB + dEᵀ Ak + dYᵀ Aq       (read-out: dQ = dHq W₁)
            G ← a_keep G + via W (chunk 0: via W goes to the read weights instead),  H ← a_mom G + s_keep H

        Each needs sums over all hidden units (E, the clip norm, dω, dE) before the next, so a chunk
        makes six passes over the hidden blocks (five without the clip): E; ‖D‖²; dω; dE; the
        read-out's part; then everything else and the in-place update of G, H.
        """
        pid = tl.program_id(0).to(tl.int64)
        b = pid // H
        h = pid % H
        rc = tl.arange(0, C)
        rd = tl.arange(0, BD)
        dmask = rd < D
        row_mask = dmask[None, :]
        fd = F * D
        g1_base = g1_ptr + pid * fd
        g2_base = g2_ptr + pid * fd
        h1_base = h1_ptr + pid * fd
        h2_base = h2_ptr + pid * fd
        r1_base = r1_ptr + pid * fd
        r2_base = r2_ptr + pid * fd
        k_base = k_ptr + b * sk_b + h * sk_h
        v_base = v_ptr + b * sv_b + h * sv_h
        q_base = q_ptr + b * sq_b + h * sq_h
        dy_base = dy_ptr + b * sdy_b + h * sdy_h
        n_all = tl.num_programs(0).to(tl.int64) * N  # chunks over all (batch, head)
        for i in range(N):
            c = N - 1 - i
            cc = pid * N + c
            w1_base = w1_save + cc * fd
            w2_base = w2_save + cc * fd
            rows = (c * C + rc).to(tl.int64)
            out_off = (pid * N * C + rows[:, None]) * D + rd[None, :]
            K = tl.load(k_base + rows[:, None] * sk_t + rd[None, :], mask=row_mask, other=0.0).to(tl.float32)
            # Pass 1: E = act(K W₁ᵀ) W₂ᵀ − V and ‖Ak_t‖².
            V = tl.load(v_base + rows[:, None] * sv_t + rd[None, :], mask=row_mask, other=0.0).to(tl.float32)
            E, aa = _keys_error(K, V, w1_base, w2_base, D, F, rd, dmask, BF, GELU, PREC)
            ee = tl.sum(E * E, axis=1)
            kk = tl.sum(K * K, axis=1)
            w_a = tl.load(wa_ptr + cc * C + rc)
            w_s = tl.zeros([C], dtype=tl.float32)
            if MOM:
                w_s = tl.load(ws_ptr + cc * C + rc)
            scale = tl.full([C], 1.0, dtype=tl.float32)
            dd = tl.zeros([C], dtype=tl.float32)
            if CLIP:  # Pass 2: ‖D_t‖², the clip factor σ
                dd = _delta_sq(K, E, w1_base, w2_base, D, F, rd, dmask, BF, GELU, PREC)
                nrm = ee * aa + dd * kk + 1e-12
                raw = tau * tl.rsqrt(nrm)
                scale = tl.minimum(raw, 1.0)
            om_a = w_a * scale
            om_s = w_s * scale
            # Pass 3: dω_A, dω_S (sums over hidden units of D∘(K Gᵀ) and (E G₂)∘Ak).
            g_a = tl.zeros([C], dtype=tl.float32)
            g_s = tl.zeros([C], dtype=tl.float32)
            for f0 in range(0, F, BF):
                off1, mask1, off2, mask2, W1, W2 = _hidden_block(w1_base, w2_base, f0, D, F, rd, dmask, BF)
                _, Ak, _, Dk = _key_block(K, E, W1, W2, GELU, PREC)
                G1 = tl.load(g1_base + off1, mask=mask1, other=0.0)
                G2 = tl.load(g2_base + off2, mask=mask2, other=0.0)
                g_a += tl.sum(Dk * tl.dot(K, tl.trans(G1), input_precision=PREC), axis=1)
                g_a += tl.sum(Ak * tl.dot(E, G2, input_precision=PREC), axis=1)
                if MOM:
                    H1 = tl.load(h1_base + off1, mask=mask1, other=0.0)
                    H2 = tl.load(h2_base + off2, mask=mask2, other=0.0)
                    g_s += tl.sum(Dk * tl.dot(K, tl.trans(H1), input_precision=PREC), axis=1)
                    g_s += tl.sum(Ak * tl.dot(E, H2, input_precision=PREC), axis=1)
            tl.store(dw_ptr + cc * C + rc, -g_a * scale)
            if MOM:
                tl.store(dw_ptr + (n_all + cc) * C + rc, -g_s * scale)
            dn2 = tl.zeros([C], dtype=tl.float32)  # 2 ∂L/∂n_t
            if CLIP:  # σ = min(raw, 1): the gradient passes where raw ≤ 1 (as torch.clamp)
                d_scale = -(g_a * w_a + g_s * w_s)
                dn2 = tl.where(raw <= 1.0, -d_scale * raw / nrm, 0.0)
            # Pass 4: dE.
            dE = (dn2 * aa)[:, None] * E
            for f0 in range(0, F, BF):
                off1, mask1, off2, mask2, W1, W2 = _hidden_block(w1_base, w2_base, f0, D, F, rd, dmask, BF)
                Hk, Ak, B, Dk = _key_block(K, E, W1, W2, GELU, PREC)
                G1 = tl.load(g1_base + off1, mask=mask1, other=0.0)
                G2 = tl.load(g2_base + off2, mask=mask2, other=0.0)
                dD = -om_a[:, None] * tl.dot(K, tl.trans(G1), input_precision=PREC) + (dn2 * kk)[:, None] * Dk
                dE = tl.dot(-om_a[:, None] * Ak, tl.trans(G2), acc=dE, input_precision=PREC)
                if MOM:
                    H1 = tl.load(h1_base + off1, mask=mask1, other=0.0)
                    H2 = tl.load(h2_base + off2, mask=mask2, other=0.0)
                    dD -= om_s[:, None] * tl.dot(K, tl.trans(H1), input_precision=PREC)
                    dE = tl.dot(-om_s[:, None] * Ak, tl.trans(H2), acc=dE, input_precision=PREC)
                dE = tl.dot(dD * _act_grad(Hk, GELU), tl.trans(W2), acc=dE, input_precision=PREC)
            tl.store(dv_ptr + out_off, -dE, mask=row_mask)
            # Pass 5, the read-out: dQ, and its part of W's adjoint into the scratch R.
            Q = tl.load(q_base + rows[:, None] * sq_t + rd[None, :], mask=row_mask, other=0.0).to(tl.float32)
            dY = tl.load(dy_base + rows[:, None] * sdy_t + rd[None, :], mask=row_mask, other=0.0).to(tl.float32)
            dQ = tl.zeros([C, BD], dtype=tl.float32)
            for f0 in range(0, F, BF):
                off1, mask1, off2, mask2, W1, W2 = _hidden_block(w1_base, w2_base, f0, D, F, rd, dmask, BF)
                Hq = tl.dot(Q, tl.trans(W1), input_precision=PREC)
                dHq = tl.dot(dY, W2, input_precision=PREC) * _act_grad(Hq, GELU)
                dQ = tl.dot(dHq, W1, acc=dQ, input_precision=PREC)
                tl.store(r1_base + off1, tl.dot(tl.trans(dHq), Q, input_precision=PREC), mask=mask1)
                tl.store(r2_base + off2, tl.dot(tl.trans(dY), _act(Hq, GELU), input_precision=PREC), mask=mask2)
            tl.store(dq_ptr + out_off, dQ, mask=row_mask)
            tl.debug_barrier()  # pass 6 reads R where other threads wrote it
            # Pass 6: dK, the coefficients' gradients, and G, H of the chunk's start state.
            a_keep = tl.load(ak_ptr + cc)
            a_mom = a_keep
            s_keep = a_keep
            if MOM:
                a_mom = tl.load(am_ptr + cc)
                s_keep = tl.load(skeep_ptr + cc)
            first = c == 0
            dK = (dn2 * dd)[:, None] * K
            d_ak = 0.0
            d_am = 0.0
            d_sk = 0.0
            for f0 in range(0, F, BF):
                off1, mask1, off2, mask2, W1, W2 = _hidden_block(w1_base, w2_base, f0, D, F, rd, dmask, BF)
                Hk, Ak, B, Dk = _key_block(K, E, W1, W2, GELU, PREC)
                G1 = tl.load(g1_base + off1, mask=mask1, other=0.0)
                G2 = tl.load(g2_base + off2, mask=mask2, other=0.0)
                dD = -om_a[:, None] * tl.dot(K, tl.trans(G1), input_precision=PREC) + (dn2 * kk)[:, None] * Dk
                dAk = tl.dot(dE, W2, input_precision=PREC) + (dn2 * ee)[:, None] * Ak
                dAk = tl.dot(-om_a[:, None] * E, G2, acc=dAk, input_precision=PREC)
                dK = tl.dot(-om_a[:, None] * Dk, G1, acc=dK, input_precision=PREC)
                d_ak += _pair_inner(G1, W1, G2, W2)
                if MOM:
                    H1 = tl.load(h1_base + off1, mask=mask1, other=0.0)
                    H2 = tl.load(h2_base + off2, mask=mask2, other=0.0)
                    S1 = tl.load(s1_save + cc * fd + off1, mask=mask1, other=0.0)
                    S2 = tl.load(s2_save + cc * fd + off2, mask=mask2, other=0.0)
                    dD -= om_s[:, None] * tl.dot(K, tl.trans(H1), input_precision=PREC)
                    dAk = tl.dot(-om_s[:, None] * E, H2, acc=dAk, input_precision=PREC)
                    dK = tl.dot(-om_s[:, None] * Dk, H1, acc=dK, input_precision=PREC)
                    d_am += _pair_inner(G1, S1, G2, S2)
                    d_sk += _pair_inner(H1, S1, H2, S2)
                    tl.store(h1_base + off1, a_mom * G1 + s_keep * H1, mask=mask1)
                    tl.store(h2_base + off2, a_mom * G2 + s_keep * H2, mask=mask2)
                dB = dD * _act_grad(Hk, GELU)
                dHk = dAk * _act_grad(Hk, GELU) + dD * B * _act_grad2(Hk, GELU)
                dK = tl.dot(dHk, W1, acc=dK, input_precision=PREC)
                R1 = tl.load(r1_base + off1, mask=mask1, other=0.0)
                R2 = tl.load(r2_base + off2, mask=mask2, other=0.0)
                R1 = tl.dot(tl.trans(dHk), K, acc=R1, input_precision=PREC)  # everything via W₁ …
                R2 = tl.dot(tl.trans(E), dB, acc=R2, input_precision=PREC)  # … and via W₂
                R2 = tl.dot(tl.trans(dE), Ak, acc=R2, input_precision=PREC)
                tl.store(r1_base + off1, R1, mask=mask1)
                tl.store(r2_base + off2, R2, mask=mask2)
                # Chunk c > 0 reads its accumulator itself: the read path joins G. Chunk 0's read
                # weights are a separate input: R (after this chunk, the last) is their adjoint.
                tl.store(g1_base + off1, a_keep * G1 + tl.where(first, 0.0, R1), mask=mask1)
                tl.store(g2_base + off2, a_keep * G2 + tl.where(first, 0.0, R2), mask=mask2)
            tl.store(dk_ptr + out_off, dK, mask=row_mask)
            tl.store(dcoef_ptr + cc, d_ak)
            tl.store(dcoef_ptr + n_all + cc, d_am)
            tl.store(dcoef_ptr + 2 * n_all + cc, d_sk)
            tl.debug_barrier()  # the next chunk reads G, H and R as this one wrote them


def _grad_needed(state: ScanState, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, gates: Gates) -> bool:
    """Whether autograd will want a backward through this call."""
    if not torch.is_grad_enabled():
        return False
    states = [*state.accum, *(state.momentum or []), *state.read_weights]
    return any(t.requires_grad for t in (k, v, q, *gates, *states))


def rule_reason(rule: MemoryRule) -> Optional[str]:
    """Why the MLP kernels cannot compute this rule (None: they can)."""
    arch, objective, retention, optimizer = rule
    if arch.depth != 2 or arch.config.residual_norm:
        return "the MLP triton kernel needs a depth-2 memory without residual_norm"
    if objective.name != ObjectiveName.l2:
        return f"the MLP triton kernel needs the l2 attentional bias, not {objective.name.value!r}"
    if not retention.is_identity:
        return f"the MLP triton kernel needs decay retention, not {retention.name.value!r}"
    if type(optimizer) is not MomentumGD:
        return f"the MLP triton kernel needs the gd/momentum optimizer, not {type(optimizer).__name__}"
    return None


def unsupported_reason(
    rule: MemoryRule, state: ScanState, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, gates: Optional[Gates],
    chunk_size: int, training_gate: bool = True,
) -> Optional[str]:
    """Why the MLP kernel cannot run this call at all (None: it can), independent of where the
    piece starts and ends (see :func:`mlp_scan` for that). ``training_gate=False`` leaves out the
    opt-in for training through these kernels (the hidden-split kernels, which need no ``gates``
    here, share the other checks)."""
    if triton is None:
        return "triton is not installed"
    reason = rule_reason(rule)
    if reason is not None:
        return reason
    if rule.optimizer.uses_momentum and state.momentum is None:
        return "the momentum optimizer needs a state with momentum"
    if training_gate and _grad_needed(state, k, v, q, gates) and os.environ.get(TRAIN_ENV) != "1":
        return (
            "the clipped MLP memory's Triton backward is slower than the compiled scan (docs/performance.md); "
            f"set {TRAIN_ENV}=1 to train through it anyway, or leave OLMO_MIRAS_TRITON_SPLIT unset for the fast "
            "hidden-split kernels"
        )
    return tensor_reason(state, k, v, q, chunk_size)


def _block_hidden(hidden: int, env: str, default: int) -> int:
    cap = max(16, triton.next_power_of_2(hidden))
    return _env_rows(env, min(default, cap), cap)


def _launch_opts(warps_env: str, warps: int) -> dict:
    if _interpreted():
        return {}
    return dict(
        num_warps=int(os.environ.get(warps_env, str(warps))),
        num_stages=int(os.environ.get("OLMO_MIRAS_TRITON_MLP_STAGES", "1")),
    )


def _f32(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if x is None else x.detach().float().contiguous()


def _state_adjoints(
    dw1: Optional[torch.Tensor], dw2: Optional[torch.Tensor], ds: tuple, mom: bool,
    shape: Tuple[int, int, int, int], device: torch.device,
) -> Tuple[torch.Tensor, ...]:
    """The backward kernels' in-place buffers, ``shape = (batch, heads, hidden, d)``: the adjoints
    of the final W₁, W₂ (and S₁, S₂; the same tensors without momentum) as fresh float32 copies
    (zeros where autograd passed None), and room for the read weights' adjoint."""
    b, h, hidden, d = shape

    def adjoint(g: Optional[torch.Tensor], s: Tuple[int, ...]) -> torch.Tensor:
        return torch.zeros(s, device=device, dtype=torch.float32) if g is None else g.float().contiguous().clone()

    shape1, shape2 = (b, h, hidden, d), (b, h, d, hidden)
    g1, g2 = adjoint(dw1, shape1), adjoint(dw2, shape2)
    h1, h2 = (adjoint(ds[0], shape1), adjoint(ds[1], shape2)) if mom else (g1, g2)
    return g1, g2, h1, h2, torch.empty_like(g1), torch.empty_like(g2)


class _MLPScan(torch.autograd.Function):
    """Forward kernel (saving each chunk's start state when a gradient is needed) and the reverse
    kernel. Momentum inputs (``a_mom, s_keep, w_s, m1, m2``) are None for plain gd; then the
    outputs are ``(y, W₁, W₂)``, else ``(y, W₁, W₂, S₁, S₂)``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, k, v, q, a_keep, a_mom, s_keep, w_a, w_s, r1, r2, a1, a2, m1, m2, chunk, tau, gelu
    ):
        b, h, t, d = k.shape
        n = t // chunk
        mom = m1 is not None
        k, v, q = _rows(k), _rows(v), _rows(q)
        ak, wa = _f32(a_keep), _f32(w_a)
        am, sk, ws = (_f32(a_mom), _f32(s_keep), _f32(w_s)) if mom else (ak, ak, wa)
        # The kernel updates the state in place: fresh copies (the caller keeps its state).
        w1, w2 = _f32(a1).clone(), _f32(a2).clone()
        s1, s2 = (_f32(m1).clone(), _f32(m2).clone()) if mom else (w1, w2)  # never read without MOM
        save = any(ctx.needs_input_grad)
        hidden = w1.shape[-2]
        if save:
            w1s = torch.empty(b, h, n, hidden, d, device=k.device, dtype=torch.float32)
            w2s = torch.empty(b, h, n, d, hidden, device=k.device, dtype=torch.float32)
            s1s, s2s = (torch.empty_like(w1s), torch.empty_like(w2s)) if mom else (w1s, w2s)
        else:
            w1s = w2s = s1s = s2s = w1  # never written (SAVE=False)
        y = torch.empty_like(q)
        prec = _precision(k.device)
        bf = _block_hidden(hidden, "OLMO_MIRAS_TRITON_MLP_BLOCK", FWD_BLOCK)
        _mlp_fwd_kernel[(b * h,)](
            k, v, q, y, *_strides(k), *_strides(v), *_strides(q), *_strides(y),
            ak, am, sk, wa, ws, w1, w2, s1, s2, w1s, w2s, s1s, s2s,
            h, n, d, hidden, float(tau) if tau is not None else 1.0,
            C=chunk, BD=_bd(d), BF=bf, CLIP=tau is not None, MOM=mom, GELU=gelu, SAVE=save, PREC=prec,
            **_launch_opts("OLMO_MIRAS_TRITON_MLP_WARPS", FWD_WARPS),
        )
        if save:
            ctx.save_for_backward(k, v, q, ak, am, sk, wa, ws, w1s, w2s, s1s, s2s)
            ctx.meta = (chunk, tau, gelu, mom, prec, [x.dtype if x is not None else None for x in
                        (k, v, q, a_keep, a_mom, s_keep, w_a, w_s, r1, r2, a1, a2, m1, m2)])
        return (y, w1, w2, s1, s2) if mom else (y, w1, w2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dw1, dw2, *ds):  # type: ignore[override]
        k, v, q, ak, am, sk, wa, ws, w1s, w2s, s1s, s2s = ctx.saved_tensors
        chunk, tau, gelu, mom, prec, dtypes = ctx.meta
        b, h, t, d = k.shape
        n = t // chunk
        hidden = w1s.shape[-2]
        dev = k.device
        dy = torch.zeros_like(q) if dy is None else _rows(dy)

        g1, g2, h1, h2, r1, r2 = _state_adjoints(dw1, dw2, ds, mom, (b, h, hidden, d), dev)
        dk, dv, dq = (torch.empty(b, h, t, d, device=dev, dtype=torch.float32) for _ in range(3))
        dw = torch.empty(2, b * h, n, chunk, device=dev, dtype=torch.float32)
        dcoef = torch.empty(3, b * h, n, device=dev, dtype=torch.float32)
        bf = _block_hidden(hidden, "OLMO_MIRAS_TRITON_MLP_BWD_BLOCK", BWD_BLOCK)

        def launch(precision: str) -> None:
            _mlp_bwd_kernel[(b * h,)](
                k, v, q, dy, *_strides(k), *_strides(v), *_strides(q), *_strides(dy),
                ak, am, sk, wa, ws, w1s, w2s, s1s, s2s, g1, g2, h1, h2, r1, r2, dk, dv, dq, dw, dcoef,
                h, n, d, hidden, float(tau) if tau is not None else 1.0,
                C=chunk, BD=_bd(d), BF=bf, CLIP=tau is not None, MOM=mom, GELU=gelu, PREC=precision,
                **_launch_opts("OLMO_MIRAS_TRITON_MLP_BWD_WARPS", BWD_WARPS),
            )

        try:
            launch(prec)
        except OutOfResources as e:
            # At d = 128, C = 64, hidden 256 the TF32 build needed 352 KiB of shared memory on an
            # H100 (227 available) with 32 hidden units per pass; the IEEE (FMA) build fits. The
            # error comes at compile time, before the kernel touches its in-place buffers.
            if prec == "ieee":
                raise
            log.warning("MLP memory backward kernel: %s; retrying with IEEE float32 dots", e)
            launch("ieee")
        return _input_grads(dk, dv, dq, dcoef, dw, (r1, r2, g1, g2, h1, h2), mom, chunk, dtypes)


def _input_grads(dk, dv, dq, dcoef, dw, state_grads, mom: bool, chunk: int, dtypes) -> tuple:
    """Both MLP kernel Functions' backward return: gradients in the inputs' order and dtypes
    (``dcoef`` ``(3, B·H, N)``, ``dw`` ``(2, B·H, N, C)``; ``state_grads`` = read weights' W₁, W₂,
    accumulator's, momentum's), None for the momentum terms without momentum and the non-tensors."""
    b, h, t, _ = dk.shape
    n = t // chunk
    r1, r2, g1, g2, h1, h2 = state_grads
    grads = [
        dk, dv, dq,
        dcoef[0].view(b, h, n), dcoef[1].view(b, h, n) if mom else None, dcoef[2].view(b, h, n) if mom else None,
        dw[0].view(b, h, n, chunk), dw[1].view(b, h, n, chunk) if mom else None,
        r1, r2, g1, g2, h1 if mom else None, h2 if mom else None,
    ]
    grads = [None if g is None or dt is None else g.to(dt) for g, dt in zip(grads, dtypes)]
    return (*grads, None, None, None)


def mlp_scan(
    rule: MemoryRule, state: ScanState, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, gates: Gates, chunk_size: int
) -> Tuple[torch.Tensor, ScanState]:
    """The kernels: whole chunks from a chunk boundary. Same contract as ``chunked_scan``.

    Raises ``ValueError`` (with the reason) where the kernel cannot compute this call.
    """
    reason = unsupported_reason(rule, state, k, v, q, gates, chunk_size) or piece_reason(state, k.shape[2], chunk_size)
    if reason is not None:
        raise ValueError(reason)
    return apply_scan_function(_MLPScan, rule, state, k, v, q, gates, chunk_size)


def apply_scan_function(
    function: type, rule: MemoryRule, state: ScanState, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor,
    gates: Gates, chunk_size: int,
) -> Tuple[torch.Tensor, ScanState]:
    """Run an MLP-kernel autograd Function (:class:`_MLPScan` or the split kernels', same inputs
    and outputs) over whole chunks from a chunk boundary, after the caller's checks."""
    c, t = chunk_size, k.shape[2]
    optimizer = rule.optimizer
    coef = chunk_coefficients(rule, gates, c)
    momentum = state.momentum if optimizer.uses_momentum else None
    y, w1, w2, *s12 = function.apply(
        k, v, q,
        coef.accum_keep, coef.accum_from_momentum, coef.momentum_keep,
        coef.accum_token_weight, coef.momentum_token_weight,
        *state.read_weights, *state.accum, *(momentum or (None, None)),
        c, optimizer.max_grad_norm, rule.architecture.activation == ActivationName.gelu,
    )
    # decay retention: the next chunk reads W itself
    return y, ScanState([w1, w2], list(s12) if s12 else None, [w1, w2], state.position + t)

