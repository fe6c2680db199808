"""Triton kernel for the MLP memory's forward pass (``impl="triton"`` without gradients): streaming
inference, evaluation and generation over long contexts.

What it computes is exactly :func:`~.scan.chunked_scan` for a depth-2 MLP memory
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
PyTorch, as for the linear kernel in ``triton_linear.py``).

Why only the forward: with gradients, the backward of an MLP memory needs the second derivative
of the inner loss through every chunk; that kernel does not exist yet, so training uses
``impl="graphed"`` (:mod:`~.scan` under ``torch.compile`` and CUDA graphs). Inference is where the
PyTorch path is slowest relative to the arithmetic (a dozen small kernels per 64 tokens, one
chunk after another), and it needs nothing saved.

Layout: one program per (batch, head) runs every chunk. Its weights (``2 · F · d`` floats, 256 KiB
at d = 128, F = 256 in float32; twice that with momentum) do not fit on chip, so they live in the
output state tensors (global memory; they stay in L2) and each chunk visits them ``BF`` hidden
units at a time: rows of W₁, columns of W₂. Hidden units interact only through the sums that make
Y, E and the clip norm, so each chunk makes three passes (four with the clip): read-out, keys'
prediction, [clip norm,] update. A barrier ends each chunk so the next one reads the weights this
one wrote. ``k, v, q, y``: ``(batch, heads, T, d)`` with unit feature stride; math in float32;
``d`` padded to a power of two ≥ 16 with masks.

Knobs (environment, read per call): ``OLMO_MIRAS_TRITON_PRECISION`` (as for the linear kernel),
``OLMO_MIRAS_TRITON_MLP_BLOCK`` (hidden units per pass, default 32), ``OLMO_MIRAS_TRITON_MLP_WARPS``
(default 8) and ``OLMO_MIRAS_TRITON_MLP_STAGES`` (default 1).
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from .architecture import ActivationName
from .objective import ObjectiveName
from .optimizer import MomentumGD
from .scan import Gates, MemoryRule, ScanState
from .triton_linear import (
    MAX_CHUNK,
    MAX_HEAD_DIM,
    _bd,
    _env_rows,
    _interpreted,
    _pow2,
    _precision,
    _reads_accum,
    _rows,
    _strides,
)

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - not installed: unsupported_reason says so
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]

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
    def _hidden_block(w1_base, w2_base, f0, D, F, rd, dmask, BF: tl.constexpr):
        """Hidden units f0 … f0 + BF − 1: offsets and masks of their W₁ rows ``(BF, BD)`` and W₂
        columns ``(BD, BF)``, and those weights."""
        rf = f0 + tl.arange(0, BF)
        fmask = rf < F
        off1 = rf[:, None] * D + rd[None, :]
        mask1 = fmask[:, None] & dmask[None, :]
        off2 = rd[:, None] * F + rf[None, :]
        mask2 = dmask[:, None] & fmask[None, :]
        w1 = tl.load(w1_base + off1, mask=mask1, other=0.0)
        w2 = tl.load(w2_base + off2, mask=mask2, other=0.0)
        return off1, mask1, off2, mask2, w1, w2

    @triton.jit
    def _mlp_fwd_kernel(
        k_ptr, v_ptr, q_ptr, y_ptr,
        sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sq_b, sq_h, sq_t, sy_b, sy_h, sy_t,
        ak_ptr, am_ptr, skeep_ptr, wa_ptr, ws_ptr,  # (BH, N), (BH, N), (BH, N), (BH, N, C), (BH, N, C)
        w1_ptr, w2_ptr, s1_ptr, s2_ptr,  # (BH, F, D), (BH, D, F), same: the state, updated in place
        H, N, D, F, tau,
        C: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, CLIP: tl.constexpr, MOM: tl.constexpr,
        GELU: tl.constexpr, PREC: tl.constexpr,
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
                _, _, _, _, W1, W2 = _hidden_block(w1_base, w2_base, f0, D, F, rd, dmask, BF)
                Aq = _act(tl.dot(Q, tl.trans(W1), input_precision=PREC), GELU)
                Y = tl.dot(Aq, tl.trans(W2), acc=Y, input_precision=PREC)
            tl.store(y_base + rows[:, None] * sy_t + rd[None, :], Y.to(y_ptr.dtype.element_ty), mask=row_mask)
            # Pass 2, the keys' prediction: E = act(K W₁ᵀ) W₂ᵀ − V (and ‖Ak_t‖² for the clip).
            K = tl.load(k_base + rows[:, None] * sk_t + rd[None, :], mask=row_mask, other=0.0).to(tl.float32)
            E = -tl.load(v_base + rows[:, None] * sv_t + rd[None, :], mask=row_mask, other=0.0).to(tl.float32)
            aa = tl.zeros([C], dtype=tl.float32)
            for f0 in range(0, F, BF):
                _, _, _, _, W1, W2 = _hidden_block(w1_base, w2_base, f0, D, F, rd, dmask, BF)
                Ak = _act(tl.dot(K, tl.trans(W1), input_precision=PREC), GELU)
                E = tl.dot(Ak, tl.trans(W2), acc=E, input_precision=PREC)
                aa += tl.sum(Ak * Ak, axis=1)
            wa = tl.load(wa_ptr + cc * C + rc)
            ws = wa
            if MOM:
                ws = tl.load(ws_ptr + cc * C + rc)
            if CLIP:
                # Pass 3 (clip only): ‖D_t‖², then σ_t over both layers' gradients.
                dd = tl.zeros([C], dtype=tl.float32)
                for f0 in range(0, F, BF):
                    _, _, _, _, W1, W2 = _hidden_block(w1_base, w2_base, f0, D, F, rd, dmask, BF)
                    Hk = tl.dot(K, tl.trans(W1), input_precision=PREC)
                    Dk = tl.dot(E, W2, input_precision=PREC) * _act_grad(Hk, GELU)
                    dd += tl.sum(Dk * Dk, axis=1)
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


def _grad_needed(state: ScanState, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, gates: Gates) -> bool:
    if not torch.is_grad_enabled():
        return False
    states = [*state.accum, *(state.momentum or []), *state.read_weights]
    return any(t.requires_grad for t in (k, v, q, *gates, *states))


def unsupported_reason(
    rule: MemoryRule, state: ScanState, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, gates: Gates,
    chunk_size: int,
) -> Optional[str]:
    """Why the MLP kernel cannot run this call at all (None: it can), independent of where the
    piece starts and ends (see :func:`mlp_scan` for that)."""
    if triton is None:
        return "triton is not installed"
    arch, objective, retention, optimizer = rule
    if arch.depth != 2 or arch.config.residual_norm:
        return "the MLP triton kernel needs a depth-2 memory without residual_norm"
    if objective.name != ObjectiveName.l2:
        return f"the MLP triton kernel needs the l2 attentional bias, not {objective.name.value!r}"
    if not retention.is_identity:
        return f"the MLP triton kernel needs decay retention, not {retention.name.value!r}"
    if type(optimizer) is not MomentumGD:
        return f"the MLP triton kernel needs the gd/momentum optimizer, not {type(optimizer).__name__}"
    if _grad_needed(state, k, v, q, gates):
        return "the MLP triton kernel is forward-only (no backward yet); with gradients use impl='graphed'"
    if not (k.is_cuda or _interpreted()):
        return "the triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 when this module is imported)"
    if k.ndim != 4:
        return f"expected (batch, heads, seq, head_dim) inputs, got shape {tuple(k.shape)}"
    for x in (k, v, q):
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return f"the triton kernel takes float32/bfloat16/float16 inputs, got {x.dtype}"
    for s in (*state.accum, *(state.momentum or [])):
        if s.dtype != torch.float32:
            return f"the triton kernel keeps a float32 state, got {s.dtype}"
    d = k.shape[-1]
    if d > MAX_HEAD_DIM:
        return f"the triton kernel supports head_dim ≤ {MAX_HEAD_DIM}, got {d}"
    if not _pow2(chunk_size) or chunk_size > MAX_CHUNK or (chunk_size < 16 and not _interpreted()):
        return f"the triton kernel needs a power-of-two chunk size in 16..{MAX_CHUNK}, got {chunk_size}"
    return None


def _block_hidden(hidden: int) -> int:
    default = min(32, max(16, triton.next_power_of_2(hidden)))
    return _env_rows("OLMO_MIRAS_TRITON_MLP_BLOCK", default, max(16, triton.next_power_of_2(hidden)))


def mlp_scan(
    rule: MemoryRule, state: ScanState, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, gates: Gates, chunk_size: int
) -> Tuple[torch.Tensor, ScanState]:
    """The kernel: whole chunks from a chunk boundary, no gradients. Same contract as ``chunked_scan``.

    Raises ``ValueError`` (with the reason) where the kernel cannot compute this call.
    """
    reason = unsupported_reason(rule, state, k, v, q, gates, chunk_size)
    c, t = chunk_size, k.shape[2]
    if reason is None and state.position % c != 0:
        reason = f"the triton kernel starts at a chunk boundary; position {state.position} is not a multiple of {c}"
    if reason is None and (t == 0 or t % c != 0):
        reason = f"the triton kernel takes whole chunks; {t} tokens is not a positive multiple of {c}"
    if reason is None and not _reads_accum(state):
        reason = "the triton kernel needs a state whose read_weights are its accum (as produced at chunk boundaries)"
    if reason is not None:
        raise ValueError(reason)
    with torch.no_grad():
        return _launch(rule, state, k, v, q, gates, chunk_size)


def _launch(
    rule: MemoryRule, state: ScanState, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, gates: Gates, c: int
) -> Tuple[torch.Tensor, ScanState]:
    b, h, t, d = k.shape
    n = t // c
    optimizer = rule.optimizer
    coef = optimizer.chunk_coefficients(
        *(g.reshape(b, h, n, c) for g in (gates.theta, gates.log_eta, gates.log_keep)),
        torch.ones(1, device=k.device, dtype=gates.theta.dtype).expand(b, h, n, c),
    )
    mom = optimizer.uses_momentum
    a_keep, w_a = coef.accum_keep.float().contiguous(), coef.accum_token_weight.float().contiguous()
    if mom:
        a_mom, s_keep = coef.accum_from_momentum.float().contiguous(), coef.momentum_keep.float().contiguous()
        w_s = coef.momentum_token_weight.float().contiguous()
    else:
        a_mom = s_keep = a_keep
        w_s = w_a
    # The kernel updates the state in place: fresh contiguous copies (the caller keeps its state).
    w1, w2 = (a.float().contiguous().clone() for a in state.accum)
    if mom:
        assert state.momentum is not None
        s1, s2 = (s.float().contiguous().clone() for s in state.momentum)
    else:
        s1, s2 = w1, w2  # never read (MOM=False)
    k, v, q = _rows(k), _rows(v), _rows(q)
    y = torch.empty_like(q)
    hidden = w1.shape[-2]
    tau = optimizer.max_grad_norm
    opts = {} if _interpreted() else dict(
        num_warps=int(os.environ.get("OLMO_MIRAS_TRITON_MLP_WARPS", "8")),
        num_stages=int(os.environ.get("OLMO_MIRAS_TRITON_MLP_STAGES", "1")),
    )
    _mlp_fwd_kernel[(b * h,)](
        k, v, q, y, *_strides(k), *_strides(v), *_strides(q), *_strides(y),
        a_keep, a_mom, s_keep, w_a, w_s, w1, w2, s1, s2,
        h, n, d, hidden, float(tau) if tau is not None else 1.0,
        C=c, BD=_bd(d), BF=_block_hidden(hidden), CLIP=tau is not None, MOM=mom,
        GELU=rule.architecture.activation == ActivationName.gelu, PREC=_precision(k.device), **opts,
    )
    momentum = [s1, s2] if mom else None
    return y, ScanState([w1, w2], momentum, [w1, w2], state.position + t)
