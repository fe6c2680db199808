"""Triton kernels for the layer's input preparation (:func:`~.fusion.prepare` on CUDA).

What they compute is exactly :func:`~.fusion._prepare`: the fused projection
``z = [q | k | v | gate logits]`` ``(batch, T, 3·H·d + G·H)`` → a K-tap causal depthwise conv
over ``[context | q k v]`` and SiLU, L2 norm of q and k over ``head_dim``, the head-major layout
``(batch, H, T, d)`` in float32, and the gates θ, η, α, log η, log(1 − α) ``(batch, H, T)``.

Why not ``torch.compile`` (what :mod:`.fusion` does elsewhere): the compiled backward had to fuse
the split's ``cat`` with the conv, norm and gate backwards, and inductor's two pointwise kernels
for it took 1.1 and 0.85 ms per OLMo2-1B layer at 8k, about 10× their memory traffic (ninth
session, docs/performance.md). Here each program owns one head of one of q, k, v and a tile of
tokens, so the norm's row sums stay on chip, and nothing but the inputs is saved for backward
(as the compiled path's checkpoint did). Kernel time of one forward + backward at OLMo2-1B
shapes on an H100: 0.80 ms at 8k and 1.52 ms at 16k, against 3.11 and 6.13 compiled.

Grids and buffers:
- forward: one launch per part (q, k, v), programs (token tiles, heads, batch), plus one gate
  launch. Every tile but the first reads only ``z``: the first, which reaches back into the conv
  context, is a launch of its own (:func:`_by_tiles`; tiles of ≥ 16 tokens and K ≤ 8 keep every
  other tile's taps at rows ≥ 0);
- backward, two passes: (1) per part, recompute the forward from ``z`` and write the gradient at
  the conv's output (``dpre``, float32 ``(batch, T, 3·H·d)``, 0.2 GB at 8k); (2) over rows of
  ``[context | z]``, the conv's transpose (K shifted reads of ``dpre``) into ``dz`` and the
  context's gradient, and the conv weight's gradient summed per tile into a
  ``(tiles, batch, channels, K)`` float32 buffer reduced by ``sum`` (deterministic, no atomics).
  Recomputing ``dpre`` K times inside one pass instead (no buffer) measured 0.94 / 1.76 ms: the
  K² tap loads cost more than the buffer's traffic;
- the new conv context (the last K − 1 rows of ``[context | z]``) is a slice outside the kernels,
  so autograd adds its gradient where a caller uses it.

Knobs: ``OLMO_MIRAS_TRITON_PREPARE_ROWS`` (tokens per program, default 32, a power of two ≥ 16;
16 and 64 measured slower at 8k) and ``OLMO_MIRAS_TRITON_PREPARE_WARPS`` (default 4; 8 slower).
``OLMO_MIRAS_PREPARE=compiled`` makes :func:`~.fusion.prepare` use the compiled path instead.
With ``TRITON_INTERPRET=1`` set before ``triton`` is first imported the kernels run in Triton's
interpreter on CPU tensors (the tests).
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional, Tuple

import torch

try:  # Triton is optional: without it fusion.prepare stays on the compiled path.
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - not installed (or a broken install): never fail the import
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]

from .scan import Gates
from .triton_linear import _bd, _interpreted, available

__all__ = ["available", "unsupported_reason", "prepare", "run"]

ROWS = 32
ROWS_ENV = "OLMO_MIRAS_TRITON_PREPARE_ROWS"
WARPS = 4
WARPS_ENV = "OLMO_MIRAS_TRITON_PREPARE_WARPS"
MAX_HEAD_DIM = 256
MAX_CONV = 8
CONV_T_CHANNELS = 128  # channels per program of the backward's pass 2


# ---------------------------------------------------------------------------------------- kernels
if triton is not None:

    @triton.jit
    def _load_x(z_ptr, ctx_ptr, b, lo, i, col, T, sz_b, sz_t, sc_b, sc_t, dmask, K: tl.constexpr,
                HAS_CTX: tl.constexpr):
        """Rows ``lo + i`` of ``[context | z]`` (``lo`` a scalar, ``i = arange``; row ``r < 0`` is the
        context's row ``K − 1 + r``, zero before it and from ``T`` on) at q/k/v columns ``col``:
        float32 ``(rows, d)``. Addresses are a scalar base plus int32 offsets (64-bit addresses per
        element filled the registers), and only the first tile of a launch, compiled apart
        (``HAS_CTX``), reads the context: a runtime branch on it in every tile cost registers too
        (offline sm_90 compiles)."""
        rows = lo + i
        base = z_ptr + b * sz_b + lo.to(tl.int64) * sz_t
        x = tl.load(base + (i * sz_t)[:, None] + col[None, :],
                    mask=((rows >= 0) & (rows < T))[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        if HAS_CTX:
            if K > 1:
                cbase = ctx_ptr + b * sc_b + (lo + K - 1).to(tl.int64) * sc_t
                x += tl.load(cbase + (i * sc_t)[:, None] + col[None, :],
                             mask=((rows < 0) & (rows >= 1 - K))[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        return x

    @triton.jit
    def _pre_conv(z_ptr, ctx_ptr, w_ptr, b, lo, i, col, T, sz_b, sz_t, sc_b, sc_t, dmask,
                  K: tl.constexpr, HAS_CONV: tl.constexpr, HAS_CTX: tl.constexpr):
        """The conv's output before SiLU at tokens ``lo + i``, ``(rows, d)`` (the input itself without a conv)."""
        if HAS_CONV:
            pre = tl.zeros((i.shape[0], col.shape[0]), dtype=tl.float32)
            for j in tl.static_range(K):
                w = tl.load(w_ptr + col * K + j, mask=dmask, other=0.0).to(tl.float32)
                # tap j reads [context | z] K − 1 − j tokens back
                pre += w[None, :] * _load_x(z_ptr, ctx_ptr, b, lo - (K - 1 - j), i, col, T, sz_b, sz_t, sc_b, sc_t,
                                            dmask, K, HAS_CTX)
        else:
            pre = _load_x(z_ptr, ctx_ptr, b, lo, i, col, T, sz_b, sz_t, sc_b, sc_t, dmask, 1, False)
        return pre

    @triton.jit
    def _tile(tile0, c0, D: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr):
        """Program (tile, h, b) of a per-part launch: its first token, head, batch, row and column
        ranges, and its columns of ``[q | k | v]`` (the part's first column is ``c0``)."""
        lo = (tile0 + tl.program_id(0)) * BT
        h = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        d = tl.arange(0, BD)
        return lo, h, b, tl.arange(0, BT), d, d < D, c0 + h * D + d

    @triton.jit
    def _fwd_kernel(
        z_ptr, ctx_ptr, w_ptr, out_ptr,
        T, tile0, c0, sz_b, sz_t, sc_b, sc_t, so_b, so_h, so_t,
        D: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr, K: tl.constexpr,
        HAS_CONV: tl.constexpr, NORM: tl.constexpr, HAS_CTX: tl.constexpr,
    ):
        # Program (tile, h, b): tokens tile·BT … + BT − 1 of head h of one part (q, k or v, whose
        # first column is c0); out is that part's (batch, heads, T, d) tensor.
        lo, h, b, i, d, dmask, col = _tile(tile0, c0, D, BD, BT)
        pre = _pre_conv(z_ptr, ctx_ptr, w_ptr, b, lo, i, col, T, sz_b, sz_t, sc_b, sc_t, dmask, K, HAS_CONV, HAS_CTX)
        if HAS_CONV:
            u = pre * tl.sigmoid(pre)
        else:
            u = pre
        if NORM:
            u = u / tl.maximum(tl.sqrt(tl.sum(u * u, axis=1)), 1e-12)[:, None]
        out = out_ptr + b * so_b + h * so_h + lo.to(tl.int64) * so_t
        tl.store(out + (i * so_t)[:, None] + d[None, :], u.to(out_ptr.dtype.element_ty),
                 mask=(lo + i < T)[:, None] & dmask[None, :])

    @triton.jit
    def _dpre(z_ptr, ctx_ptr, w_ptr, g_ptr, b, h, lo, i, col, d, T, sz_b, sz_t, sc_b, sc_t, sg_b, sg_h, sg_t, dmask,
              K: tl.constexpr, HAS_CONV: tl.constexpr, NORM: tl.constexpr, HAS_CTX: tl.constexpr):
        """The gradient at the conv's output (before SiLU) of tokens ``lo + i``; zero outside ``[0, T)``."""
        t = lo + i
        valid = (t >= 0) & (t < T)
        pre = _pre_conv(z_ptr, ctx_ptr, w_ptr, b, lo, i, col, T, sz_b, sz_t, sc_b, sc_t, dmask, K, HAS_CONV, HAS_CTX)
        gbase = g_ptr + b * sg_b + h * sg_h + lo.to(tl.int64) * sg_t
        g = tl.load(gbase + (i * sg_t)[:, None] + d[None, :], mask=valid[:, None] & dmask[None, :],
                    other=0.0).to(tl.float32)
        if HAS_CONV:
            sig = tl.sigmoid(pre)
            u = pre * sig
        else:
            u = pre
        if NORM:
            # out = u / max(‖u‖, ε): du = (g − out (out·g)) / ‖u‖, or g / ε where the clamp holds
            n = tl.sqrt(tl.sum(u * u, axis=1))
            inv = 1.0 / tl.maximum(n, 1e-12)
            out = u * inv[:, None]
            proj = tl.where(n > 1e-12, tl.sum(out * g, axis=1), 0.0)
            g = (g - out * proj[:, None]) * inv[:, None]
        if HAS_CONV:
            g = g * (sig * (1.0 + pre * (1.0 - sig)))
        return tl.where(valid[:, None], g, 0.0)

    @triton.jit
    def _dpre_kernel(
        z_ptr, ctx_ptr, w_ptr, g_ptr, out_ptr,
        T, tile0, c0, sz_b, sz_t, sc_b, sc_t, sg_b, sg_h, sg_t, so_b, so_t,
        D: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr, K: tl.constexpr,
        HAS_CONV: tl.constexpr, NORM: tl.constexpr, HAS_CTX: tl.constexpr,
    ):
        # Two-pass backward, pass 1: dpre at tokens lo … lo + BT − 1 of one head of one part,
        # written to out (float32 (batch, T, 3·H·d); without a conv it is dz itself).
        lo, h, b, i, d, dmask, col = _tile(tile0, c0, D, BD, BT)
        dp = _dpre(z_ptr, ctx_ptr, w_ptr, g_ptr, b, h, lo, i, col, d, T, sz_b, sz_t, sc_b, sc_t,
                   sg_b, sg_h, sg_t, dmask, K, HAS_CONV, NORM, HAS_CTX)
        out = out_ptr + b * so_b + lo.to(tl.int64) * so_t
        tl.store(out + (i * so_t)[:, None] + col[None, :], dp.to(out_ptr.dtype.element_ty),
                 mask=(lo + i < T)[:, None] & dmask[None, :])

    @triton.jit
    def _conv_t_kernel(
        dp_ptr, z_ptr, ctx_ptr, w_ptr, dz_ptr, dctx_ptr, dw_ptr,
        T, tile0, B, C, sp_b, sp_t, sz_b, sz_t, sc_b, sc_t, sdz_b, sdz_t, sdc_b, sdc_t,
        BC: tl.constexpr, BT: tl.constexpr, K: tl.constexpr, CTX_GRAD: tl.constexpr, HAS_CTX: tl.constexpr,
    ):
        # Pass 2: rows r = lo + i of [context | z], from r = −(K − 1), BC channels of q k v. With
        # dpre at rows r + K − 1 − j (tap j's output): d[context | z][r] = Σ_j w_j · dpre[r + K − 1 − j],
        # and this tile's part of dW[c, j] = Σ_r [context | z][r, c] · dpre[r + K − 1 − j, c].
        pid_t = tile0 + tl.program_id(0)
        lo = pid_t * BT - (K - 1)
        col = tl.program_id(1) * BC + tl.arange(0, BC)
        b = tl.program_id(2).to(tl.int64)
        i = tl.arange(0, BT)
        r = lo + i
        cmask = col < C
        x = _load_x(z_ptr, ctx_ptr, b, lo, i, col, T, sz_b, sz_t, sc_b, sc_t, cmask, K, HAS_CTX)
        acc = tl.zeros((BT, BC), dtype=tl.float32)
        dw = dw_ptr + (pid_t * B + b) * C * K
        for j in tl.static_range(K):
            s = lo + (K - 1 - j)
            rows = s + i
            base = dp_ptr + b * sp_b + s.to(tl.int64) * sp_t
            dp = tl.load(base + (i * sp_t)[:, None] + col[None, :],
                         mask=((rows >= 0) & (rows < T))[:, None] & cmask[None, :], other=0.0)
            acc += tl.load(w_ptr + col * K + j, mask=cmask, other=0.0).to(tl.float32)[None, :] * dp
            tl.store(dw + col * K + j, tl.sum(x * dp, axis=0), mask=cmask)
        dz = dz_ptr + b * sdz_b + lo.to(tl.int64) * sdz_t
        tl.store(dz + (i * sdz_t)[:, None] + col[None, :], acc.to(dz_ptr.dtype.element_ty),
                 mask=((r >= 0) & (r < T))[:, None] & cmask[None, :])
        if CTX_GRAD and HAS_CTX:
            dc = dctx_ptr + b * sdc_b + (lo + K - 1).to(tl.int64) * sdc_t
            tl.store(dc + (i * sdc_t)[:, None] + col[None, :], acc.to(dctx_ptr.dtype.element_ty),
                     mask=(r < 0)[:, None] & cmask[None, :])

    @triton.jit
    def _log_sigmoid(x):
        # min(x, 0) − log(1 + e^{−|x|}): stable for either sign
        return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))

    @triton.jit
    def _gate_tile(z_ptr, T, H, n0, sz_b, sz_t, BT: tl.constexpr, BH: tl.constexpr):
        """Program (tile, b) of a gate launch: its batch, tokens, heads, mask, θ-logit pointers
        (``(tokens, heads)`` in ``z``; α's are ``H`` columns on, η's ``2H``) and (batch, heads, T) offsets."""
        b = tl.program_id(1).to(tl.int64)
        t = tl.program_id(0) * BT + tl.arange(0, BT)
        hh = tl.arange(0, BH)
        mask = (t < T)[:, None] & (hh < H)[None, :]
        src = z_ptr + b * sz_b + (t.to(tl.int64))[:, None] * sz_t + n0 + hh[None, :]
        return b, t, hh, mask, src, b * H * T + hh[None, :] * T + t[:, None]

    @triton.jit
    def _gates_fwd_kernel(
        z_ptr, theta_ptr, eta_ptr, alpha_ptr, log_eta_ptr, log_keep_ptr,
        T, H, n0, sz_b, sz_t, theta_max, eta_max, log_eta_max,
        BT: tl.constexpr, BH: tl.constexpr, HAS_ETA: tl.constexpr,
    ):
        b, t, hh, mask, src, dst = _gate_tile(z_ptr, T, H, n0, sz_b, sz_t, BT, BH)
        z_theta = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        z_alpha = tl.load(src + H, mask=mask, other=0.0).to(tl.float32)
        tl.store(theta_ptr + dst, theta_max * tl.sigmoid(z_theta), mask=mask)
        tl.store(alpha_ptr + dst, tl.sigmoid(z_alpha), mask=mask)
        tl.store(log_keep_ptr + dst, _log_sigmoid(-z_alpha), mask=mask)
        if HAS_ETA:
            z_eta = tl.load(src + 2 * H, mask=mask, other=0.0).to(tl.float32)
            tl.store(eta_ptr + dst, eta_max * tl.sigmoid(z_eta), mask=mask)
            tl.store(log_eta_ptr + dst, _log_sigmoid(z_eta) + log_eta_max, mask=mask)

    @triton.jit
    def _gates_bwd_kernel(
        z_ptr, dz_ptr, dtheta_ptr, deta_ptr, dalpha_ptr, dlog_eta_ptr, dlog_keep_ptr,
        T, H, n0, sz_b, sz_t, sdz_b, sdz_t, theta_max, eta_max,
        BT: tl.constexpr, BH: tl.constexpr, HAS_ETA: tl.constexpr,
    ):
        b, t, hh, mask, src, g = _gate_tile(z_ptr, T, H, n0, sz_b, sz_t, BT, BH)
        dst = dz_ptr + b * sdz_b + (t.to(tl.int64))[:, None] * sdz_t + n0 + hh[None, :]
        s = tl.sigmoid(tl.load(src, mask=mask, other=0.0).to(tl.float32))
        dz = tl.load(dtheta_ptr + g, mask=mask, other=0.0) * theta_max * s * (1.0 - s)
        tl.store(dst, dz.to(dz_ptr.dtype.element_ty), mask=mask)
        # log(1 − α) = log σ(−z_α): its derivative is −σ(z_α) = −α
        s = tl.sigmoid(tl.load(src + H, mask=mask, other=0.0).to(tl.float32))
        dz = tl.load(dalpha_ptr + g, mask=mask, other=0.0) * s * (1.0 - s) - tl.load(dlog_keep_ptr + g, mask=mask, other=0.0) * s
        tl.store(dst + H, dz.to(dz_ptr.dtype.element_ty), mask=mask)
        if HAS_ETA:
            s = tl.sigmoid(tl.load(src + 2 * H, mask=mask, other=0.0).to(tl.float32))
            dz = (tl.load(deta_ptr + g, mask=mask, other=0.0) * eta_max * s * (1.0 - s)
                  + tl.load(dlog_eta_ptr + g, mask=mask, other=0.0) * (1.0 - s))
            tl.store(dst + 2 * H, dz.to(dz_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------- host
GATE_ROWS = 64


def _rows() -> int:
    env = os.environ.get(ROWS_ENV)
    rows = (int(env) if env.isdigit() else 0) if env else ROWS
    if rows < 16 or rows & (rows - 1):
        raise ValueError(f"{ROWS_ENV} must be a power of two >= 16, got {env!r}")
    return rows


def _opts() -> dict:
    if _interpreted():
        return {}
    env = os.environ.get(WARPS_ENV)
    warps = (int(env) if env.isdigit() else 0) if env else WARPS
    if warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"{WARPS_ENV} must be 1, 2, 4, 8 or 16, got {env!r}")
    return dict(num_warps=warps, num_stages=1)


def unsupported_reason(
    z: torch.Tensor,
    conv_weight: Optional[torch.Tensor],
    conv_context: Optional[torch.Tensor],
    n_heads: int,
    head_dim: int,
    dtype: torch.dtype,
) -> Optional[str]:
    """Why the kernels cannot prepare this call (None: they can)."""
    if triton is None:
        return "Triton is not installed"
    if not (z.is_cuda or _interpreted()):
        return "needs CUDA (or TRITON_INTERPRET=1)"
    if dtype != torch.float32:
        return f"the inner dtype is {dtype}, the kernels write float32"
    if z.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"z has dtype {z.dtype}"
    if z.ndim != 3 or z.stride(-1) != 1:
        return "z must be (batch, seq, features) with unit stride along features"
    if head_dim > MAX_HEAD_DIM:
        return f"head_dim {head_dim} > {MAX_HEAD_DIM}"
    n_qkv = 3 * n_heads * head_dim
    n_gates, rest = divmod(z.shape[-1] - n_qkv, n_heads)
    if rest or n_gates not in (2, 3):
        return f"z has {z.shape[-1]} features: expected 3·{n_heads}·{head_dim} + (2 or 3)·{n_heads}"
    if conv_weight is not None:
        if conv_weight.shape[1] > MAX_CONV:
            return f"conv kernel {conv_weight.shape[1]} > {MAX_CONV}"
        if conv_context is None or conv_context.stride(-1) != 1:
            return "the conv context must be given, with unit stride along channels"
    return None


def _by_tiles(kernel, tiles: int, rest: Tuple[int, ...], head: tuple, tail: tuple, has_ctx: bool, **meta) -> None:
    """Launch ``kernel`` over ``tiles`` token tiles × ``rest``: tile 0, the only one that reads the
    conv context, compiled with ``HAS_CTX``, and the others without (arguments: ``*head, tile0, *tail``)."""
    kernel[(1, *rest)](*head, 0, *tail, HAS_CTX=has_ctx, **meta)
    if tiles > 1:
        kernel[(tiles - 1, *rest)](*head, 1, *tail, HAS_CTX=False, **meta)


def _launch_fwd(z, w, ctx, parts, n_heads, head_dim, qk_norm) -> None:
    b, t, _ = z.shape
    rows = _rows()
    k = 1 if w is None else w.shape[1]
    ctx_ = z if ctx is None else ctx
    w_ = z if w is None else w
    for i, out in enumerate(parts):
        _by_tiles(
            _fwd_kernel, triton.cdiv(t, rows), (n_heads, b), (z, ctx_, w_, out, t),
            (i * n_heads * head_dim, z.stride(0), z.stride(1), ctx_.stride(0), ctx_.stride(1),
             out.stride(0), out.stride(1), out.stride(2)),
            w is not None, D=head_dim, BD=_bd(head_dim), BT=rows, K=k,
            HAS_CONV=w is not None, NORM=qk_norm and i < 2, **_opts(),
        )


class _Prepare(torch.autograd.Function):
    """``z``, conv weight and context → q, k, v and the gates; backward recomputes the forward from ``z``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, z, conv_weight, conv_context, n_heads, head_dim, qk_norm, theta_max, eta_max
    ):
        b, t, n = z.shape
        n_qkv = 3 * n_heads * head_dim
        has_eta = (n - n_qkv) // n_heads == 3
        # Separate tensors, not views of one buffer: callers may split, cut or capture them.
        qkv = [z.new_empty((b, n_heads, t, head_dim), dtype=torch.float32) for _ in range(3)]
        _launch_fwd(z, conv_weight, conv_context, qkv, n_heads, head_dim, qk_norm)
        theta, eta, alpha, log_eta, log_keep = (z.new_empty((b, n_heads, t), dtype=torch.float32) for _ in range(5))
        if not has_eta:
            eta.zero_()
            log_eta.zero_()
        bh = _bd(n_heads)
        _gates_fwd_kernel[(triton.cdiv(t, GATE_ROWS), b)](
            z, theta, eta, alpha, log_eta, log_keep, t, n_heads, n_qkv, z.stride(0), z.stride(1),
            float(theta_max), float(eta_max), math.log(eta_max),
            BT=GATE_ROWS, BH=bh, HAS_ETA=has_eta, **_opts(),
        )
        ctx.save_for_backward(z, conv_weight, conv_context)
        ctx.config = (n_heads, head_dim, qk_norm, float(theta_max), float(eta_max), has_eta)
        if not has_eta:
            ctx.mark_non_differentiable(eta, log_eta)
        return (*qkv, theta, eta, alpha, log_eta, log_keep)

    @staticmethod
    def backward(ctx, dq, dk, dv, dtheta, deta, dalpha, dlog_eta, dlog_keep):  # type: ignore[override]
        z, w, conv_ctx = ctx.saved_tensors
        n_heads, head_dim, qk_norm, theta_max, eta_max, has_eta = ctx.config
        b, t, n = z.shape
        n_qkv = 3 * n_heads * head_dim
        dz = torch.empty_like(z)
        rows = _rows()
        k = 1 if w is None else w.shape[1]
        tiles = triton.cdiv(t + k - 1, rows)  # pass 2's: rows of [context | z]
        # the conv weight's gradient, one partial sum per tile of pass 2
        dw = None if w is None else z.new_empty((tiles, b, n_qkv, k), dtype=torch.float32)
        ctx_grad = w is not None and ctx.needs_input_grad[2]
        dctx = torch.empty_like(conv_ctx) if ctx_grad else None
        ctx_ = z if conv_ctx is None else conv_ctx
        dctx_ = dz if dctx is None else dctx
        grads = []
        for g in (dq, dk, dv):
            if g is None:
                g = z.new_zeros((b, n_heads, t, head_dim), dtype=torch.float32)
            elif g.stride(-1) != 1:
                g = g.contiguous()
            grads.append(g)
        bd = _bd(head_dim)
        # Without a conv, pass 1 writes dz itself; with one, a float32 dpre that pass 2 convolves.
        dpre = dz if w is None else z.new_empty((b, t, n_qkv), dtype=torch.float32)
        for i, g in enumerate(grads):
            _by_tiles(
                _dpre_kernel, triton.cdiv(t, rows), (n_heads, b), (z, ctx_, z if w is None else w, g, dpre, t),
                (i * n_heads * head_dim, z.stride(0), z.stride(1), ctx_.stride(0), ctx_.stride(1),
                 g.stride(0), g.stride(1), g.stride(2), dpre.stride(0), dpre.stride(1)),
                w is not None, D=head_dim, BD=bd, BT=rows, K=k, HAS_CONV=w is not None, NORM=qk_norm and i < 2,
                **_opts(),
            )
        if w is not None:
            bc = CONV_T_CHANNELS
            _by_tiles(
                _conv_t_kernel, tiles, (triton.cdiv(n_qkv, bc), b), (dpre, z, ctx_, w, dz, dctx_, dw, t),
                (b, n_qkv, dpre.stride(0), dpre.stride(1), z.stride(0), z.stride(1), ctx_.stride(0), ctx_.stride(1),
                 dz.stride(0), dz.stride(1), dctx_.stride(0), dctx_.stride(1)),
                True, BC=bc, BT=rows, K=k, CTX_GRAD=ctx_grad, **_opts(),
            )
        gate_grads = [
            g.contiguous() if g is not None else z.new_zeros((b, n_heads, t), dtype=torch.float32)
            for g in (dtheta, deta, dalpha, dlog_eta, dlog_keep)
        ]
        bh = _bd(n_heads)
        _gates_bwd_kernel[(triton.cdiv(t, GATE_ROWS), b)](
            z, dz, *gate_grads, t, n_heads, n_qkv, z.stride(0), z.stride(1), dz.stride(0), dz.stride(1),
            theta_max, eta_max, BT=GATE_ROWS, BH=bh, HAS_ETA=has_eta, **_opts(),
        )
        dweight = None
        if dw is not None and ctx.needs_input_grad[1]:
            dweight = dw.sum((0, 1)).to(w.dtype)
        return dz, dweight, dctx, None, None, None, None, None


def prepare(
    z: torch.Tensor, conv_weight: Optional[torch.Tensor], conv_context: Optional[torch.Tensor], **kwargs: Any
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Gates, Optional[torch.Tensor]]:
    """:func:`run` (keyword arguments as there) after :func:`unsupported_reason`: raises
    ``ValueError`` with the reason where the kernels cannot run this call."""
    reason = unsupported_reason(z, conv_weight, conv_context, kwargs["n_heads"], kwargs["head_dim"], kwargs["dtype"])
    if reason is not None:
        raise ValueError(f"Triton prepare cannot run this call: {reason}")
    return run(z, conv_weight, conv_context, **kwargs)


def run(
    z: torch.Tensor,
    conv_weight: Optional[torch.Tensor],
    conv_context: Optional[torch.Tensor],
    *,
    n_heads: int,
    head_dim: int,
    qk_norm: bool,
    theta_max: float,
    dtype: torch.dtype,
    eta_max: float = 1.0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Gates, Optional[torch.Tensor]]:
    """:func:`~.fusion._prepare` by the kernels (same contract), for a caller that has checked
    :func:`unsupported_reason` (the layer's dispatch, :func:`~.fusion.prepare`); :func:`prepare` checks."""
    q, k, v, *gates = _Prepare.apply(z, conv_weight, conv_context, n_heads, head_dim, qk_norm, theta_max, eta_max)
    new_context = conv_context
    if conv_weight is not None:
        # The last K − 1 rows of [context | q k v]: a slice, so autograd adds its gradient. (conv.py
        # forms the same rows with pads, which keep one compiled graph for every length; sharing
        # this slice there made the compiled path recompile per length.)
        keep = conv_weight.shape[1] - 1
        x = z[:, max(0, z.shape[1] - keep):, : 3 * n_heads * head_dim].to(dtype)
        new_context = torch.cat([conv_context.to(dtype), x], 1)[:, -keep:] if x.shape[1] < keep else x
    return q, k, v, Gates(*gates), new_context
