"""Hidden-split Triton kernels for the depth-2 MLP memory, with or without the per-token clip:
what ``impl="triton"`` / ``"triton_graphed"`` run for such a memory, training included
(:mod:`.triton_mlp` keeps the one-program-per-head kernels, the fallback with
``OLMO_MIRAS_TRITON_SPLIT=0``).

Same rule and formulas as :mod:`.triton_mlp` (its docstring has them). The difference is the
layout. One program per (batch, head) runs on 16 of an H100's 132 SMs at batch 1 and streams its
256–512 KiB of weights through L2 several times per chunk (measured at 4k tokens: 10.9 ms
forward, 52.9 ms backward). Here each head's hidden units are split over programs (``BF`` units
each; 8 × 32 at F = 256): a program's slices of W₁, W₂ (and S₁, S₂, and in the backward their
adjoints) are ``BF × d`` tiles that stay on chip for the chunk, and the grid covers the GPU.

Hidden units interact only through sums over all of them: the keys' prediction
``Σ_f act(K W₁ᵀ) W₂ᵀ`` (forward) and ``dE`` (backward), and with the clip the squared norms
``‖Ak_t‖²``, ``‖D_t‖²`` (forward) and ``∂L/∂σ_t`` (backward). Programs add their share to a float32
buffer with atomics and the *next* launch reads the total. Without the clip the forward runs one
launch per chunk (``N + 1`` launches), each doing the second half of one chunk and the first half
of the next; the backward runs two kernels per chunk (``2N`` launches), chunks in reverse:

    forward launch c:   finish chunk c − 1 (E = Σ − V from the buffer; the update, giving W_c)
                        start chunk c (keys' prediction into the buffer; the read-out into y
                        too without a gradient, else one launch for all chunks afterwards)
    backward, chunk c:  start (its share of dE and of the token weights' gradients), then
                        finish (with its total dE: dK, dV, the adjoints of W_c)

The backward's two halves were one launch until the twelfth session. As separate kernels each
gets its own tiles: every dot of the start half has the chunk's rows as M, so it runs whole
64-row passes on Hopper's warpgroup MMA, while the finish half (whose W-adjoint sums have the
hidden units as M, and whose 64-row passes spill) keeps 16-row passes, pipelined. Scan alone at
8k, H100: 14.8 → 12.9 ms forward + backward; per launch, start 25 µs and finish 31 µs against
~72 µs for the joint launch.

The read-outs are off the chain in both directions: the forward's depend only on each chunk's
saved start state (one launch for all chunks), and so do their backward's dQ and their part of
W_c's adjoint (``dHqᵀ Q``, ``dYᵀ Aq``): :func:`_split_read_bwd_kernel` forms those for a group
of chunks at once, just before the chain reaches the group, and the finish kernel starts W_c's
adjoint sum from them (5 of the chain's 22 dots per row pass moved off it: scan 8.57 → 8.18 ms
at 4k, H100, ninth session). Both read-out kernels run one program per chunk (and head), which
holds the chunk's rows of y or dQ and walks the hidden units 32 at a time: y and dQ are stored
once, not summed over a head's programs by atomics (sixteenth session: 0.41 → 0.26 ms forward,
1.31 → 1.01 ms backward at 8k; scan 10.45 → 10.05 ms at 8 warps, 4 warps faster still).

The clip ``σ_t = min(1, τ / √n_t)``, ``n_t = ‖E_t‖²‖Ak_t‖² + ‖D_t‖²‖k_t‖²``: ``‖Ak_t‖²`` is summed
with the keys' prediction, but ``D_t = (W₂ᵀ E_t) ∘ act'(h_t)`` needs the whole E_t first, so
``‖D_t‖²`` is a second sum in sequence. The forward adds a launch per chunk between the two
halves (:func:`_split_norm_kernel`: E, this slice's ‖D‖², with Hk kept by the forward launch),
``2N + 1`` launches. The backward
needs ``∂L/∂σ_t`` over all hidden units before ``dn_t = 2 ∂L/∂n_t`` and so dE, but dE is linear
in dn_t: the start kernel sums ``dE₀`` (dE at dn = 0) and ``xe = ∂dE/∂dn`` separately with
``∂L/∂σ``, and the finish kernel forms ``dE = dE₀ + dn xe`` (and writes dV = −dE), still ``2N``
launches. (Without the clip, a constexpr, neither the extra launch nor the extra sums exist.)

The launch boundary is the barrier between programs, so nothing relies on programs being
co-resident, and Triton's interpreter runs the same code on CPU (tests). On Hopper the launches
use programmatic dependent launch (:func:`_after_previous_launch`): a launch's programs start
while the previous launch drains and load what is at least two launches old (the chunk's saved
state; with the clip the forward update kernel's rows and Hk too; in the backward's start
kernel the chunk's rows, in its finish kernel G, H and the read-outs' part, with everything that
needs only those) before they wait for it; scan 12.6 → 12.1 ms at 8k (H100, thirteenth
session; waiting first, with nothing loaded before, gained nothing), 11.3 ms with the fourteenth
session's additions. Under
``triton_graphed`` the launches replay from a CUDA graph: no Python per launch. Sums by atomics
make the last bits of y, dK, dQ, dV and the gate gradients depend on the order programs finish
(float32, ~1e-7 relative), as in other atomic-reduction backwards: the read-out kernels add no
atomics of their own, but they read states that the chain summed. Chunks are processed ``RB``
rows at a time: the backward's finish kernel 16 (its many live tiles; 64 rows spill and measured
slower), the forward's two chain kernels and the backward's start kernel 64 with 8 warps, which
lets Triton use Hopper's warpgroup MMA for their dots (23.0 → 18.8 µs per update launch, 8.5 →
5.1 µs per norm launch at OLMO2-1B shapes; eleventh session; the update kernel holds W₁ and S₁
transposed so that its update sums have d rows as M and take that MMA too: 17.8 µs, twelfth).

Memory: the forward saves W and S at every chunk start (``4 · F · d`` floats per (batch, head)
and chunk: 2 GiB at T = 16k for OLMo2-1B shapes) and the keys' prediction ``(B, H, T, d)``; without
a gradient it keeps two state slots, so streaming inference stays flat in T. The backward's
read-out buffer holds one group of chunks (``2 · F · d`` floats per (batch, head) and chunk of a
group: 32 MiB at OLMo2-1B shapes, 8 chunks). The clip adds
``‖Ak_t‖²``, ``‖D_t‖²`` ``(B·H, T)`` (saved) and, in the backward, ``xe`` ``(B, H, T, d)`` and
``∂L/∂σ`` ``(B·H, T)``.

Measured without the clip (H100, 2026-11-26, docs/performance.md): the scan alone 6.6 / 25.0 /
49.6 ms forward + backward at 4k / 16k / 32k tokens (OLMo2-1B shapes, batch 1), the whole MLP
memory layer 9.2 / 34.6 / 66.4 ms under ``triton_graphed`` (17.2 ms at 4k for ``graphed`` with
the clip). Each launch is latency-bound (~28 µs forward, ~75 µs backward: a chain of small
dots), which is what keeps the layer above the ≤ 3 / 8 / 16 ms target. Neither the atomics
(about 1 %) nor occupancy is what costs: the backward needs 255 registers and 154 KiB of
shared memory, one program per SM, and smaller slices that fit two per SM measured slower
(docs/performance.md, eighth session). With the clip (the titans preset's default; ninth
session, the read-outs' backward off the chain): the scan 8.2 / 30.9 ms, the layer 10.7 / 40.0 /
78.0 ms at 4k / 16k / 32k under ``triton_graphed``, OLMo2-1B + MAL every 4th layer at 75.9 % of
the base's tokens/s (8k, finite losses); with the Triton input preparation (tenth session) the
layer takes 9.5 / 35.5 / 69.7 ms and the whole model 77.6 %; with the forward chain's 64-row
tiles (eleventh session) 9.0 / 33.5 / 65.8 ms and 79.0 %. Nsight Compute on the then joint
backward launch (eleventh session): 255 registers, one 8-warp program per SM, ~13k instructions
per warp of which ~700 are MMAs, ~10.7 cycles per issued instruction (a third of it waiting on
loads) — the chain is bound by the latency of a long dependent instruction stream, not by
launches, spills or atomics. With the backward's start and finish as separate kernels (twelfth
session): the layer 7.9 / 29.2 / 56.8 ms, the whole model 80.3 %; with programmatic dependent
launch (thirteenth) 7.7 / 27.7 / 56.2 ms and 80.9 %; with the finish kernel's state-only work and
the start kernel's rows before their waits (fourteenth) 7.4 / 26.8 / 52.6 ms and 82.1 %, then
the forward update kernel's rows too: scan 11.66 → 11.31 ms at 8k. Reordering the start and
forward update kernels' bodies (no arithmetic changed: which tiles are live together, atomics and
stores issued early; fifteenth session) took the scan to 10.41 ms, the layer to 6.8 / 24.9 /
48.3 ms and the whole model to 82.8 %; moving dots before a wait (the start kernel's Hk, B, xe)
cost 7 %: the next launch's programs cannot start until the previous one's leave their SM, so
work before the wait overlaps little, while the added live tiles spill. The read-outs' kernels
at one program per chunk (sixteenth session): the layer 6.5 / 23.8 / 46.4 ms, the whole model
83.3 %. A persistent forward chain (one cooperative launch, a barrier among each head's programs
where a launch boundary was) measured slower (scan 11.70 against 10.47 ms): a barrier on a
global counter costs ~1.0 µs, the boundary between two programmatically dependent launches in a
CUDA graph ~0.6 µs, and the fused kernel spilled (docs/performance.md, sixteenth session).
Moving dK off the chain (the finish kernel's three dK dots and its atomic into one launch per 16
chunks, from per-chunk rings of Hk, B, dHk, G₁, H₁) measured slower as well: scan at 8k 11.2
against 10.0 ms; the chain gained ~3 µs per chunk, the new kernel cost 1.55 ms (seventeenth).

The head and hidden sizes ``D``, ``F`` are constexprs (one compile per model shape): where they
equal the tiles (``D == BD``, ``F`` a multiple of ``BF``, as at every OLMo shape) the masks fold
away with their address arithmetic. Offline sm_90 compile: the forward update kernel 8.3k → 5.8k
instructions and 1.27 → 0.42 KB of stack, the backward's start 7.8k → 6.5k, its finish 7.1k →
5.7k (0.65 → 0.14 KB); scan at 8k 10.00 / 10.04 → 9.85 / 9.74 ms (H100, eighteenth session).
Instructions are not what bounds a launch, though: cycle stamps in a forward update launch
(~15 µs) put ~5.4 µs in its loads (~170 KB per program, 21 MB per launch, near the L2's
bandwidth: K, V and the prediction are read by all of a head's programs) and ~4.4 µs in its dots,
and the same kernel with its loads, stores and atomics through TMA descriptors (3.0k instructions,
no stack) measured 12 % slower (docs/performance.md, eighteenth session).

Knobs (environment, read per call): ``OLMO_MIRAS_TRITON_SPLIT_BLOCK`` / ``_BWD_BLOCK`` (hidden
units per program in the forward / the backward's two kernels, default 32; 16 measured 17 %
slower, 64 in the forward 8 % slower, and the start kernel at 64 needs 320 KiB of shared memory;
``_BWD_FINISH_BLOCK`` overrides ``_BWD_BLOCK`` for the finish kernel: 64 there measured 17 %
slower, seventeenth session), ``OLMO_MIRAS_TRITON_SPLIT_FWD_ROWS`` / ``_FWD_WARPS`` and
``_NORM_ROWS`` / ``_NORM_WARPS`` (the forward chain's update and norm kernels, default 64 / 8; 32
rows measured slower; see :func:`_forward_chain_tiles` for bf16 operands),
``OLMO_MIRAS_TRITON_SPLIT_BWD_START_ROWS`` / ``_WARPS`` / ``_STAGES`` (64 / 8 / 1) and
``_BWD_FINISH_ROWS`` / ``_WARPS`` / ``_STAGES`` (16 / 8 / 2) for the backward's two kernels (see
:func:`_backward_chain_tiles`), ``OLMO_MIRAS_TRITON_SPLIT_WARPS`` (the read-out kernels, default 4),
``OLMO_MIRAS_TRITON_SPLIT_READ_GROUP`` (chunks per launch of the read-outs' backward, default 8;
16 and 32 measured the same time with a 2× / 4× larger buffer),
``OLMO_MIRAS_TRITON_SPLIT_READ_BLOCK`` (the read-out kernels' hidden units per step, default 32;
16 measured slower; at 64 the backward's kernel needs 256 KiB of shared memory, over an H100
block's 227, and Triton refuses the launch;
``_READ_ROWS`` is refused: a program takes the whole chunk),
``OLMO_MIRAS_TRITON_SPLIT_STAGES`` (software pipelining of the row passes, default 2 except
where a kernel's own ``_STAGES`` knob above says otherwise; that knob wins when set),
``OLMO_MIRAS_TRITON_PDL`` (1, the default: programmatic dependent launch where the GPU can, compute
capability ≥ 9; 0: plain launches), ``OLMO_MIRAS_TRITON_PRECISION`` (as for the other kernels, plus ``bf16`` here: operands rounded
to bfloat16, accumulation in float32; 5 % faster scan, 0.6 % on the whole model, so not the
default), ``OLMO_MIRAS_TRITON_SPLIT=0`` (use
the one-program-per-head kernels instead).
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from .scan import Gates, MemoryRule, ScanState
from . import triton_mlp
from .triton_linear import _bd, _env_rows, _interpreted, _precision, _rows, _strides, piece_reason
from .triton_mlp import _f32, _input_grads, _state_adjoints, triton

gdc_launch_dependents = gdc_wait = None
if triton is not None:
    import triton.language as tl

    from .triton_mlp import _act, _act_grad, _act_grad2, _dot, _key_block, _pair_inner

    try:  # Hopper's programmatic dependent launch (Triton ≥ 3.4)
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    except ImportError:  # pragma: no cover - older Triton: launches stay plain
        pass

__all__ = ["unsupported_reason", "split_mlp_scan"]

SPLIT_ENV = "OLMO_MIRAS_TRITON_SPLIT"
BLOCK, FWD_WARPS, STAGES, READ_GROUP = 32, 4, 2, 8
# The chunk chain's kernels whose dots all have the chunk's rows as M (the forward's update and norm
# kernels, the backward's start kernel): whole 64-row passes with 8 warps, which Triton runs on
# Hopper's warpgroup MMA (16-row passes run on the older, instruction-heavier MMA:
# docs/performance.md, eleventh and twelfth sessions).
CHAIN_ROWS, CHAIN_WARPS = 64, 8
# The backward's finish kernel accumulates W's adjoint with the hidden units as M: 16-row passes,
# pipelined 2 deep (64 rows there spill; twelfth session).
FINISH_ROWS, FINISH_WARPS, FINISH_STAGES = 16, 8, 2
# bfloat16 operands: the forward update kernel keeps 16-row, 4-warp tiles (see _forward_chain_tiles).
BF16_ROWS = 16


if triton is not None:

    @triton.jit
    def _after_previous_launch(PDL: tl.constexpr):
        """With programmatic dependent launch (``PDL``): wait here until the previous launch has
        finished and its writes are visible, then let the next launch's programs start. Each launch
        thus starts up, and runs the code before this call, while its predecessor drains. The rule
        for that code: it may only *read*, and only what launches before the previous one wrote (the
        previous launch signals after its own wait, so those are complete); every program calls this
        exactly once, on every path."""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()

    @triton.jit
    def _slice_offsets(f0, D, F, rd, dmask, BF: tl.constexpr):
        """This program's hidden units f0 … f0 + BF − 1: offsets and masks of its W₁ rows ``(BF, BD)``
        (in an ``F × D`` matrix) and W₂ columns ``(BD, BF)`` (in a ``D × F`` matrix)."""
        rf = f0 + tl.arange(0, BF)
        fmask = rf < F
        return (
            rf[:, None] * D + rd[None, :],
            fmask[:, None] & dmask[None, :],
            rd[:, None] * F + rf[None, :],
            dmask[:, None] & fmask[None, :],
        )

    @triton.jit
    def _program(H, D, F, BD: tl.constexpr, BF: tl.constexpr):
        """This program's (batch·head, batch, head), its first hidden unit, the feature lanes and
        its slice offsets (:func:`_slice_offsets`). Grid ``(BH, programs per head[, …])``."""
        bh = tl.program_id(0).to(tl.int64)
        f0 = tl.program_id(1) * BF
        rd = tl.arange(0, BD)
        dmask = rd < D
        off1, mask1, off2, mask2 = _slice_offsets(f0, D, F, rd, dmask, BF)
        return bh, bh // H, bh % H, f0, rd, dmask, off1, mask1, off2, mask2

    @triton.jit
    def _chunk_state(w1_ptr, w2_ptr, bh, c, N, F, D, off1, mask1, off2, mask2):
        """Chunk c's saved start state, this program's slices: the offset of its ``(F, D)`` slot in
        the ``(BH, N + 1, …)`` state tensors (S₁, S₂ share it), W₁ ``(BF, BD)`` and W₂ ``(BD, BF)``."""
        st = (bh * (N + 1) + c) * F * D
        return st, tl.load(w1_ptr + st + off1, mask=mask1, other=0.0), tl.load(w2_ptr + st + off2, mask=mask2, other=0.0)

    @triton.jit
    def _readout(q_base, sq_t, y_ptr, out_base, c, W1, W2, rd, row_mask, D, C: tl.constexpr, RB: tl.constexpr,
                 GELU: tl.constexpr, PREC: tl.constexpr):
        """This slice's share of chunk c's read-out ``act(Q W₁ᵀ) W₂ᵀ``, added into y."""
        for r0 in range(0, C, RB):
            rows = (c * C + r0 + tl.arange(0, RB)).to(tl.int64)
            Q = tl.load(q_base + rows[:, None] * sq_t + rd[None, :], mask=row_mask, other=0.0).to(tl.float32)
            Aq = _act(_dot(Q, tl.trans(W1), None, PREC), GELU)
            Yq = _dot(Aq, tl.trans(W2), None, PREC)
            tl.atomic_add(y_ptr + (out_base + rows[:, None]) * D + rd[None, :], Yq, mask=row_mask, sem="relaxed")

    @triton.jit
    def _key_rows(k_base, v_base, pk_ptr, sk_t, sv_t, bh, rows, rd, row_mask, D, N, C: tl.constexpr):
        """Rows of K and E = prediction − V (float32, the prediction summed over all hidden units
        by the previous launch) and the rows' offsets in the ``(BH, T, D)`` buffers."""
        out_rows = (bh * N * C + rows[:, None]) * D + rd[None, :]
        K = tl.load(k_base + rows[:, None] * sk_t + rd[None, :], mask=row_mask, other=0.0).to(tl.float32)
        V = tl.load(v_base + rows[:, None] * sv_t + rd[None, :], mask=row_mask, other=0.0)
        E = tl.load(pk_ptr + out_rows, mask=row_mask, other=0.0) - V.to(tl.float32)
        return K, E, out_rows

    @triton.jit
    def _clip(K, E, aa_ptr, dd_ptr, tok, tau):
        """The clip of these rows (:mod:`.triton_mlp`'s formulas) from the totals ‖Ak_t‖², ‖D_t‖²
        over all hidden units at ``tok`` (rows of the ``(BH, T)`` buffers): ‖Ak‖², ‖D‖², ‖e‖²,
        ‖k‖², n_t = ‖e‖²‖Ak‖² + ‖D‖²‖k‖² + 1e-12, raw_t = τ / √n_t and σ_t = min(1, raw_t)."""
        aa = tl.load(aa_ptr + tok)
        dd = tl.load(dd_ptr + tok)
        ee = tl.sum(E * E, axis=1)
        kk = tl.sum(K * K, axis=1)
        nrm = ee * aa + dd * kk + 1e-12
        raw = tau * tl.rsqrt(nrm)
        return aa, dd, ee, kk, nrm, raw, tl.minimum(raw, 1.0)

    @triton.jit
    def _read_program(q_ptr, sq_b, sq_h, sq_t, H, N, D, c, BD: tl.constexpr, C: tl.constexpr):
        """The read-out kernels' prologue for chunk c of this program's (batch·head): the head's index,
        the feature lanes and mask, the chunk's rows' offsets in the ``(BH, T, D)`` buffers and its
        queries ``(C, BD)`` (float32)."""
        bh = tl.program_id(0).to(tl.int64)
        rd = tl.arange(0, BD)
        dmask = rd < D
        rows = (c * C + tl.arange(0, C)).to(tl.int64)
        out_rows = (bh * N * C + rows[:, None]) * D + rd[None, :]
        q_base = q_ptr + (bh // H) * sq_b + (bh % H) * sq_h
        Q = tl.load(q_base + rows[:, None] * sq_t + rd[None, :], mask=dmask[None, :], other=0.0).to(tl.float32)
        return bh, rd, dmask, rows, out_rows, Q

    @triton.jit
    def _split_read_kernel(
        q_ptr, sq_b, sq_h, sq_t, y_ptr, w1_ptr, w2_ptr, H, N, D: tl.constexpr, F: tl.constexpr,
        C: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, GELU: tl.constexpr, PREC: tl.constexpr,
        PDL: tl.constexpr,
    ):
        """The read-out of every chunk at once from the saved start states (it is off the chunk
        chain: nothing in the scan depends on it). Grid ``(BH, N)``: one program per chunk holds
        the chunk's rows of y and walks the hidden units ``BF`` at a time, so y is stored once,
        not summed over programs by atomics (sixteenth session: one program per ``BF`` units and
        chunk, with atomics, measured slower)."""
        c = tl.program_id(1)
        # Q before the wait: no launch of the chain writes it
        bh, rd, dmask, rows, out_rows, Q = _read_program(q_ptr, sq_b, sq_h, sq_t, H, N, D, c, BD, C)
        _after_previous_launch(PDL)
        Y = tl.zeros([C, BD], dtype=tl.float32)
        for f0 in range(0, F, BF):
            off1, mask1, off2, mask2 = _slice_offsets(f0, D, F, rd, dmask, BF)
            _st, W1, W2 = _chunk_state(w1_ptr, w2_ptr, bh, c, N, F, D, off1, mask1, off2, mask2)
            Aq = _act(_dot(Q, tl.trans(W1), None, PREC), GELU)  # (C, BF)
            Y = _dot(Aq, tl.trans(W2), Y, PREC)
        tl.store(y_ptr + out_rows, Y, mask=dmask[None, :])

    @triton.jit
    def _split_read_bwd_kernel(
        q_ptr, dy_ptr, sq_b, sq_h, sq_t, sdy_b, sdy_h, sdy_t,
        w1_ptr, w2_ptr,  # (BH, N + 1, F, D) / (BH, N + 1, D, F): each chunk's start state
        dq_ptr,  # (BH, T, D) float32: dQ, stored
        rr1_ptr, rr2_ptr,  # (BH, M, F, D) / (BH, M, D, F): the read-outs' adjoint of W, chunk c in slot c % M
        g0, H, N, M, D: tl.constexpr, F: tl.constexpr,
        C: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, GELU: tl.constexpr, PREC: tl.constexpr,
        PDL: tl.constexpr,
    ):
        """The read-out's backward for chunks g0, g0 + 1, … at once (grid ``(BH, chunks)``): dQ and
        the read-out's part of the adjoint of W_c, ``dHqᵀ Q`` and ``dYᵀ Aq``. It depends on the
        saved W_c and on dY only, not on the adjoints flowing back through the chunk chain, so it is
        off the chain, like the forward's :func:`_split_read_kernel`; the chain launch that finishes
        chunk c starts its adjoint sum from slot c % M. As there, one program per chunk walks the
        hidden units: dQ is stored once (no atomics), each slice of the adjoint as it is formed."""
        c = g0 + tl.program_id(1)
        # Q and dY before the wait: both were written before the backward's buffers were zeroed, so
        # at least two launches back (the rule of :func:`_after_previous_launch`)
        bh, rd, dmask, rows, out_rows, Q = _read_program(q_ptr, sq_b, sq_h, sq_t, H, N, D, c, BD, C)
        dy_base = dy_ptr + (bh // H) * sdy_b + (bh % H) * sdy_h
        dY = tl.load(dy_base + rows[:, None] * sdy_t + rd[None, :], mask=dmask[None, :], other=0.0).to(tl.float32)
        slot = (bh * M + c % M) * F * D
        _after_previous_launch(PDL)  # before rr's slots are overwritten
        dQ = tl.zeros([C, BD], dtype=tl.float32)
        for f0 in range(0, F, BF):
            off1, mask1, off2, mask2 = _slice_offsets(f0, D, F, rd, dmask, BF)
            _st, W1, W2 = _chunk_state(w1_ptr, w2_ptr, bh, c, N, F, D, off1, mask1, off2, mask2)  # the forward's
            Hq = _dot(Q, tl.trans(W1), None, PREC)
            dHq = _dot(dY, W2, None, PREC) * _act_grad(Hq, GELU)  # (C, BF)
            dQ = _dot(dHq, W1, dQ, PREC)
            tl.store(rr1_ptr + slot + off1, _dot(tl.trans(dHq), Q, None, PREC), mask=mask1)  # (BF, BD)
            tl.store(rr2_ptr + slot + off2, _dot(tl.trans(dY), _act(Hq, GELU), None, PREC), mask=mask2)  # (BD, BF)
        tl.store(dq_ptr + out_rows, dQ, mask=dmask[None, :])

    @triton.jit
    def _split_fwd_kernel(
        k_ptr, v_ptr, q_ptr, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sq_b, sq_h, sq_t,
        y_ptr, pk_ptr,  # (BH, T, D) float32, zeroed: read-out and keys' prediction, summed by atomics
        aa_ptr, dd_ptr,  # (BH, T) float32, zeroed (clip only): ‖Ak_t‖², ‖D_t‖², summed by atomics
        kept_ptr,  # (2, 2, BH, C, F) float32 (clip only): chunk j's Hk, D in slot j % 2 (D from :func:`_split_norm_kernel`)
        ak_ptr, am_ptr, skeep_ptr, wa_ptr, ws_ptr,  # (BH, N), (BH, N), (BH, N), (BH, N, C), (BH, N, C)
        w1_ptr, w2_ptr, s1_ptr, s2_ptr,  # (BH, NS, F, D), (BH, NS, D, F): state slots (chunk c in slot c % NS)
        c, H, N, NS, D: tl.constexpr, F: tl.constexpr, tau,
        C: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, MOM: tl.constexpr, GELU: tl.constexpr,
        PREC: tl.constexpr, RB: tl.constexpr, READ: tl.constexpr, CLIP: tl.constexpr,
        PDL: tl.constexpr,
    ):
        bh, b, h, f0, rd, dmask, off1, mask1, off2, mask2 = _program(H, D, F, BD, BF)
        if not CLIP:  # the previous launch wrote W_{c−1}, S_{c−1}
            _after_previous_launch(PDL)
        row_mask = dmask[None, :]
        rf = f0 + tl.arange(0, BF)
        kmask = (rf < F)[None, :]
        fd = F * D
        BHCF = tl.num_programs(0).to(tl.int64) * C * F  # one (BH, C, F) slot of ``kept``
        slot = bh * NS + c % NS
        k_base = k_ptr + b * sk_b + h * sk_h
        v_base = v_ptr + b * sv_b + h * sv_h
        # W₁ and S₁ are held transposed, (BD, BF), like W₂: the update's dots then have d = 128
        # rows as M (Kᵀ D, not Dᵀ K), which Hopper's warpgroup MMA takes.
        off1t = rf[None, :] * D + rd[:, None]
        mask1t = tl.trans(mask1)
        if c > 0:
            # Finish chunk c − 1 (its keys' prediction is complete: the previous launch summed it;
            # with the clip, so is ‖D‖²: :func:`_split_norm_kernel` ran in between).
            cp = c - 1
            prev = bh * NS + cp % NS
            # (".cg": with the clip these are read before the wait, from L2: see the backward's finish)
            W1 = tl.load(w1_ptr + prev * fd + off1t, mask=mask1t, other=0.0, cache_modifier=".cg")
            W2 = tl.load(w2_ptr + prev * fd + off2, mask=mask2, other=0.0, cache_modifier=".cg")
            cc = bh * N + cp
            a_keep = tl.load(ak_ptr + cc)
            acc1 = a_keep * W1
            acc2 = a_keep * W2
            if MOM:
                a_mom = tl.load(am_ptr + cc)
                s_keep = tl.load(skeep_ptr + cc)
                S1 = tl.load(s1_ptr + prev * fd + off1t, mask=mask1t, other=0.0, cache_modifier=".cg")
                S2 = tl.load(s2_ptr + prev * fd + off2, mask=mask2, other=0.0, cache_modifier=".cg")
                acc1 += a_mom * S1
                acc2 += a_mom * S2
                S1 = s_keep * S1
                S2 = s_keep * S2
            if CLIP:  # W_{c−1}, S_{c−1} are two launches old (the norm launch ran since): loaded first,
                # and in one pass (the default) the chunk's rows and Hk (the last launch but one's) too
                if RB == C:
                    rr = tl.arange(0, RB)
                    K, E, out_rows = _key_rows(k_base, v_base, pk_ptr, sk_t, sv_t, bh, (cp * C + rr).to(tl.int64), rd,
                                               row_mask, D, N, C)
                    kept = kept_ptr + (cp % 2) * 2 * BHCF + bh * C * F + rr[:, None] * F + rf[None, :]
                    Hk = tl.load(kept, mask=kmask, other=0.0, cache_modifier=".cg")
                _after_previous_launch(PDL)
            # RB rows at a time (small tiles stay in registers): the weighted gradient sums.
            for r0 in range(0, C, RB):
                rr = r0 + tl.arange(0, RB)
                rows = (cp * C + rr).to(tl.int64)
                if CLIP:  # the norm launch formed Hk and D at these weights already
                    kept = kept_ptr + (cp % 2) * 2 * BHCF + bh * C * F + rr[:, None] * F + rf[None, :]
                    if RB != C:
                        K, E, out_rows = _key_rows(k_base, v_base, pk_ptr, sk_t, sv_t, bh, rows, rd, row_mask, D, N, C)
                        Hk = tl.load(kept, mask=kmask, other=0.0)
                    Dk = tl.load(kept + BHCF, mask=kmask, other=0.0)
                else:
                    K, E, out_rows = _key_rows(k_base, v_base, pk_ptr, sk_t, sv_t, bh, rows, rd, row_mask, D, N, C)
                    Hk = _dot(K, W1, None, PREC)  # (RB, BF)
                    Dk = _dot(E, W2, None, PREC) * _act_grad(Hk, GELU)  # (RB, BF)
                Ak = _act(Hk, GELU)
                wa = tl.load(wa_ptr + cc * C + rr)
                if CLIP:  # ω = σ∘w
                    _, _, _, _, _, _, sig = _clip(K, E, aa_ptr, dd_ptr, bh * N * C + rows, tau)
                    wa = wa * sig
                # W's sums before S's, W stored first (with Hk's store before the prediction's
                # dot below: scan at 8k 10.50 -> 10.41 ms, H100, fifteenth session, two pairs)
                acc1 = _dot(tl.trans(K), Dk * (-wa)[:, None], acc1, PREC)  # (BD, BF)
                acc2 = _dot(tl.trans(E * (-wa)[:, None]), Ak, acc2, PREC)  # (BD, BF)
                if MOM:
                    ws = tl.load(ws_ptr + cc * C + rr)
                    if CLIP:
                        ws = ws * sig
                    S1 = _dot(tl.trans(K), Dk * (-ws)[:, None], S1, PREC)
                    S2 = _dot(tl.trans(E * (-ws)[:, None]), Ak, S2, PREC)
            W1 = acc1
            W2 = acc2
            tl.store(w1_ptr + slot * fd + off1t, W1, mask=mask1t)
            tl.store(w2_ptr + slot * fd + off2, W2, mask=mask2)
            if MOM:
                tl.store(s1_ptr + slot * fd + off1t, S1, mask=mask1t)
                tl.store(s2_ptr + slot * fd + off2, S2, mask=mask2)
        else:
            if CLIP:
                _after_previous_launch(PDL)
            W1 = tl.load(w1_ptr + slot * fd + off1t, mask=mask1t, other=0.0)
            W2 = tl.load(w2_ptr + slot * fd + off2, mask=mask2, other=0.0)
        if c < N:
            # Start chunk c at W_c: this slice's share of the keys' prediction, of ‖Ak‖² with the
            # clip, and of the read-out (with saved states :func:`_split_read_kernel` does all
            # chunks' at once afterwards).
            if READ:
                q_base = q_ptr + b * sq_b + h * sq_h
                _readout(q_base, sq_t, y_ptr, bh * N * C, c, tl.trans(W1), W2, rd, row_mask, D, C, RB, GELU, PREC)
            for r0 in range(0, C, RB):
                rr = r0 + tl.arange(0, RB)
                rows = (c * C + rr).to(tl.int64)
                out_rows = (bh * N * C + rows[:, None]) * D + rd[None, :]
                K = tl.load(k_base + rows[:, None] * sk_t + rd[None, :], mask=row_mask, other=0.0)
                Hk = _dot(K.to(tl.float32), W1, None, PREC)
                Ak = _act(Hk, GELU)
                if CLIP:  # stored and summed before the dot
                    # Hk for the norm launch and the next update (slot c % 2: this launch read c − 1's)
                    kept = kept_ptr + (c % 2) * 2 * BHCF + bh * C * F + rr[:, None] * F + rf[None, :]
                    tl.store(kept, Hk, mask=kmask)
                    tl.atomic_add(aa_ptr + bh * N * C + rows, tl.sum(Ak * Ak, axis=1), sem="relaxed")
                Yk = _dot(Ak, tl.trans(W2), None, PREC)
                tl.atomic_add(pk_ptr + out_rows, Yk, mask=row_mask, sem="relaxed")

    @triton.jit
    def _split_norm_kernel(
        v_ptr, sv_b, sv_h, sv_t,
        pk_ptr,  # (BH, T, D): the keys' prediction, complete for chunk c
        dd_ptr,  # (BH, T), as the forward's: this slice's share of ‖D_t‖² goes in by atomics
        kept_ptr,  # (2, 2, BH, C, F): slot c % 2 holds this slice's Hk (from the forward launch); D goes in
        w2_ptr,  # the forward's W₂ state slots
        c, H, N, NS, D: tl.constexpr, F: tl.constexpr,
        C: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, GELU: tl.constexpr, PREC: tl.constexpr,
        RB: tl.constexpr,
        PDL: tl.constexpr,
    ):
        """With the clip, between forward launches c and c + 1: ‖D_t‖² needs chunk c's whole E, so
        it is a second sum over hidden units per chunk (and a second launch). Hk (kept by the forward
        launch's start half) and D are what the update in launch c + 1 needs too: kept (L2-sized),
        not formed twice."""
        bh, b, h, f0, rd, dmask, off1, mask1, off2, mask2 = _program(H, D, F, BD, BF)
        _after_previous_launch(PDL)
        rf = f0 + tl.arange(0, BF)
        kmask = (rf < F)[None, :]
        W2 = tl.load(w2_ptr + (bh * NS + c % NS) * F * D + off2, mask=mask2, other=0.0)
        v_base = v_ptr + b * sv_b + h * sv_h
        BHCF = tl.num_programs(0).to(tl.int64) * C * F
        for r0 in range(0, C, RB):
            rows = (c * C + r0 + tl.arange(0, RB)).to(tl.int64)
            row_mask = dmask[None, :]
            V = tl.load(v_base + rows[:, None] * sv_t + rd[None, :], mask=row_mask, other=0.0)
            E = tl.load(pk_ptr + (bh * N * C + rows[:, None]) * D + rd[None, :], mask=row_mask, other=0.0) - V.to(tl.float32)
            kept = kept_ptr + (c % 2) * 2 * BHCF + bh * C * F + (r0 + tl.arange(0, RB))[:, None] * F + rf[None, :]
            Hk = tl.load(kept, mask=kmask, other=0.0)
            Dk = _dot(E, W2, None, PREC) * _act_grad(Hk, GELU)
            tl.atomic_add(dd_ptr + bh * N * C + rows, tl.sum(Dk * Dk, axis=1), sem="relaxed")
            tl.store(kept + BHCF, Dk, mask=kmask)

    @triton.jit
    def _bwd_program(k_ptr, v_ptr, sk_b, sk_h, sv_b, sv_h, H, N, D, F, C: tl.constexpr, BD: tl.constexpr,
                     BF: tl.constexpr):
        """The backward kernels' prologue: :func:`_program`'s values plus the row and hidden-unit
        masks, ``F · D``, ``BH · N`` (the stride of ``dw``'s and ``dcoef``'s second slot), one
        ``(BH, C, F)`` slot of the scratch, whether this is the head's first program, and the
        head's K and V bases."""
        bh, b, h, f0, rd, dmask, off1, mask1, off2, mask2 = _program(H, D, F, BD, BF)
        rf = f0 + tl.arange(0, BF)
        n_all = tl.num_programs(0).to(tl.int64) * N
        BHCF = tl.num_programs(0).to(tl.int64) * C * F
        return (
            bh, rd, off1, mask1, off2, mask2, dmask[None, :], rf, (rf < F)[None, :], F * D, n_all, BHCF,
            tl.program_id(1) == 0, k_ptr + b * sk_b + h * sk_h, v_ptr + b * sv_b + h * sv_h,
        )

    @triton.jit
    def _start_rows(k_base, v_base, pk_ptr, sk_t, sv_t, aa_ptr, dd_ptr, wa_ptr, ws_ptr, bh, cc, rows, rr, rd, row_mask,
                    D, N, tau, C: tl.constexpr, MOM: tl.constexpr, CLIP: tl.constexpr):
        """What the backward's start kernel reads of these rows, all written by the forward: K, E
        and their offsets (:func:`_key_rows`), the token weights w_A, w_S and, with the clip,
        ‖Ak‖², ‖k‖² and σ (else placeholders)."""
        K, E, out_rows = _key_rows(k_base, v_base, pk_ptr, sk_t, sv_t, bh, rows, rd, row_mask, D, N, C)
        wa = tl.load(wa_ptr + cc * C + rr)
        ws = wa
        if MOM:
            ws = tl.load(ws_ptr + cc * C + rr)
        aa = wa
        kk = wa
        sig = wa
        if CLIP:
            aa, _, _, kk, _, _, sig = _clip(K, E, aa_ptr, dd_ptr, bh * N * C + rows, tau)
        return K, E, out_rows, wa, ws, aa, kk, sig

    @triton.jit
    def _split_bwd_start_kernel(
        k_ptr, v_ptr, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t,
        pk_ptr,  # (BH, T, D): the forward's keys' prediction
        aa_ptr, dd_ptr,  # (BH, T): the forward's ‖Ak_t‖², ‖D_t‖² (clip only)
        wa_ptr, ws_ptr,  # (BH, N, C): the token weights, as the forward's
        w1_ptr, w2_ptr,  # (BH, N + 1, F, D) / (BH, N + 1, D, F): each chunk's start state
        g1_ptr, g2_ptr, h1_ptr, h2_ptr,  # (BH, F, D) / (BH, D, F): adjoints of W, S at chunk c's end
        scr_ptr,  # (4, BH, C, F): Hk, B, dD₀ and dAk's part without dE, for the finish kernel
        de_ptr,  # (BH, T, D) float32, zeroed: dE₀, summed over hidden units by atomics
        xe_ptr,  # (BH, T, D) float32, zeroed (clip only): ∂dE/∂dn, summed by atomics
        dsig_ptr,  # (BH, T) float32, zeroed (clip only): ∂L/∂σ, summed by atomics
        dw_ptr,  # (2, BH, N, C), zeroed: d w_A, d w_S
        c, H, N, D: tl.constexpr, F: tl.constexpr, tau,
        C: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, MOM: tl.constexpr, GELU: tl.constexpr,
        PREC: tl.constexpr, RB: tl.constexpr, CLIP: tl.constexpr,
        PDL: tl.constexpr,
    ):
        """Start chunk c (this slice's share of the sums over hidden units), given the adjoints G, H
        of its end state; ω = σ∘w (:func:`~.triton_mlp._mlp_bwd_kernel` has the derivation):

            dω_A = −rowsum(D ∘ K G₁ᵀ) − rowsum((E G₂) ∘ Ak);   ∂L/∂σ = dω_A∘w_A + dω_S∘w_S
            dD₀  = −(ω_A∘K G₁ᵀ + ω_S∘K H₁ᵀ);   dE₀ = dD₀ ∘ act'(Hk) W₂ᵀ − ω_A∘Ak G₂ᵀ − ω_S∘Ak H₂ᵀ
            xe   = ‖k‖² (D ∘ act'(Hk)) W₂ᵀ  (+ ‖Ak‖² E, once: by the head's first program)

        Every dot here has the chunk's rows as its M dimension, so whole 64-row passes run on
        Hopper's warpgroup MMA. Hk, B = E W₂, dD₀ and dAk's part without dE are kept for
        :func:`_split_bwd_finish_kernel` (no recompute)."""
        bh, rd, off1, mask1, off2, mask2, row_mask, rf, kmask, fd, n_all, BHCF, lead, k_base, v_base = _bwd_program(
            k_ptr, v_ptr, sk_b, sk_h, sv_b, sv_h, H, N, D, F, C, BD, BF
        )
        # Before the wait (:func:`_after_previous_launch`) what the forward wrote: W_c and, in one
        # pass (the default), the chunk's rows and token weights too; G, H after it.
        _st, W1, W2 = _chunk_state(w1_ptr, w2_ptr, bh, c, N, F, D, off1, mask1, off2, mask2)
        cc = bh * N + c
        if RB == C:
            rr = tl.arange(0, RB)
            rows = (c * C + rr).to(tl.int64)
            K, E, out_rows, wa, ws, aa, kk, sig = _start_rows(
                k_base, v_base, pk_ptr, sk_t, sv_t, aa_ptr, dd_ptr, wa_ptr, ws_ptr, bh, cc, rows, rr, rd, row_mask,
                D, N, tau, C, MOM, CLIP,
            )
        _after_previous_launch(PDL)
        G1 = tl.load(g1_ptr + bh * fd + off1, mask=mask1, other=0.0)
        G2 = tl.load(g2_ptr + bh * fd + off2, mask=mask2, other=0.0)
        H1 = G1
        H2 = G2
        if MOM:
            H1 = tl.load(h1_ptr + bh * fd + off1, mask=mask1, other=0.0)
            H2 = tl.load(h2_ptr + bh * fd + off2, mask=mask2, other=0.0)
        for r0 in range(0, C, RB):
            if RB != C:
                rr = r0 + tl.arange(0, RB)
                rows = (c * C + rr).to(tl.int64)
                K, E, out_rows, wa, ws, aa, kk, sig = _start_rows(
                    k_base, v_base, pk_ptr, sk_t, sv_t, aa_ptr, dd_ptr, wa_ptr, ws_ptr, bh, cc, rows, rr, rd, row_mask,
                    D, N, tau, C, MOM, CLIP,
                )
            om_a = wa
            if CLIP:
                tok = bh * N * C + rows
                om_a = wa * sig
            # The order matters more than the dot count (H100, fifteenth session, scan at 8k): the
            # dots with K and E, then xe (E's last use, its atomic out early), then dE's three terms
            # (11.33 ms with xe and its atomic last, 10.61 with xe first, 10.44 as here). G, H load
            # before the loop: loading them just before their dots measured 11.52.
            Hk = _dot(K, tl.trans(W1), None, PREC)
            Ak = _act(Hk, GELU)
            B = _dot(E, W2, None, PREC)
            kept = scr_ptr + bh * C * F + rr[:, None] * F + rf[None, :]
            tl.store(kept + BHCF, B, mask=kmask)
            Dk = B * _act_grad(Hk, GELU)
            KG1 = _dot(K, tl.trans(G1), None, PREC)
            EG2 = _dot(E, G2, None, PREC)
            if MOM:
                KH1 = _dot(K, tl.trans(H1), None, PREC)
                EH2 = _dot(E, H2, None, PREC)
            if CLIP:
                xe = tl.where(lead, aa, 0.0)[:, None] * E
                xe = _dot(kk[:, None] * Dk * _act_grad(Hk, GELU), tl.trans(W2), xe, PREC)
                tl.atomic_add(xe_ptr + out_rows, xe, mask=row_mask, sem="relaxed")
            g_a = tl.sum(Dk * KG1, axis=1) + tl.sum(Ak * EG2, axis=1)
            dw_a = -g_a
            if CLIP:  # d w = dω ∘ σ;  ∂L/∂σ = Σ dω ∘ w
                dw_a = dw_a * sig
                dsig = -g_a * wa
            tl.atomic_add(dw_ptr + cc * C + rr, dw_a, sem="relaxed")
            dD = -om_a[:, None] * KG1
            X = -om_a[:, None] * EG2  # dAk's part without dE
            if MOM:
                om_s = ws
                if CLIP:
                    om_s = ws * sig
                g_s = tl.sum(Dk * KH1, axis=1) + tl.sum(Ak * EH2, axis=1)
                dw_s = -g_s
                if CLIP:
                    dw_s = dw_s * sig
                    dsig -= g_s * ws
                tl.atomic_add(dw_ptr + (n_all + cc) * C + rr, dw_s, sem="relaxed")
                dD -= om_s[:, None] * KH1
                X -= om_s[:, None] * EH2
            if CLIP:
                tl.atomic_add(dsig_ptr + tok, dsig, sem="relaxed")
            tl.store(kept + 3 * BHCF, X, mask=kmask)
            dE = _dot(-om_a[:, None] * Ak, tl.trans(G2), None, PREC)
            if MOM:
                dE = _dot(-om_s[:, None] * Ak, tl.trans(H2), dE, PREC)
            dE = _dot(dD * _act_grad(Hk, GELU), tl.trans(W2), dE, PREC)
            tl.store(kept, Hk, mask=kmask)
            tl.store(kept + 2 * BHCF, dD, mask=kmask)
            tl.atomic_add(de_ptr + out_rows, dE, mask=row_mask, sem="relaxed")

    @triton.jit
    def _split_bwd_finish_kernel(
        k_ptr, v_ptr, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t,
        pk_ptr,  # (BH, T, D): the forward's keys' prediction
        aa_ptr, dd_ptr,  # (BH, T): the forward's ‖Ak_t‖², ‖D_t‖² (clip only)
        ak_ptr, am_ptr, skeep_ptr, wa_ptr, ws_ptr,  # as the forward's
        w1_ptr, w2_ptr, s1_ptr, s2_ptr,  # (BH, N + 1, F, D) / (BH, N + 1, D, F): each chunk's start state
        g1_ptr, g2_ptr, h1_ptr, h2_ptr,  # (BH, F, D) / (BH, D, F): adjoints of W, S; chunk c's end in, start out
        r1_ptr, r2_ptr,  # the read weights' adjoint (written at chunk 0)
        rr1_ptr, rr2_ptr,  # (BH, M, F, D) / (BH, M, D, F): the read-outs' part, from :func:`_split_read_bwd_kernel`
        scr_ptr,  # (4, BH, C, F): what :func:`_split_bwd_start_kernel` kept
        de_ptr,  # (BH, T, D): dE₀ of chunk c, complete (the start launch summed it)
        dk_ptr,  # (BH, T, D) float32, zeroed, summed by atomics
        xe_ptr, dsig_ptr,  # complete for chunk c (clip only)
        dv_ptr,  # (BH, T, D) float32: dV = −dE, written by each head's first program
        dcoef_ptr,  # (3, BH, N), zeroed: d a_keep, d a_mom, d s_keep
        c, H, N, M, D: tl.constexpr, F: tl.constexpr, tau,
        C: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, MOM: tl.constexpr, GELU: tl.constexpr,
        PREC: tl.constexpr, RB: tl.constexpr, CLIP: tl.constexpr,
        PDL: tl.constexpr,
    ):
        """Finish chunk c with the totals over hidden units (dn = 2 ∂L/∂n):

            dn  = −∂L/∂σ · raw / n where raw ≤ 1, else 0
            dE  = dE₀ + dn xe,   dD = dD₀ + dn ‖k‖² D
            dAk = dE W₂ − ω_A∘E G₂ − ω_S∘E H₂ + dn ‖e‖² Ak
            dHk = dAk ∘ act'(Hk) + dD ∘ B ∘ act''(Hk)
            dK  = dHk W₁ − ω_A∘D G₁ − ω_S∘D H₁ (+ dn ‖D‖² K, once)
            G  ← a_keep G + (via W₁: dHkᵀ K + dHqᵀ Q; via W₂: Eᵀ (dD ∘ act'(Hk)) + dEᵀ Ak + dYᵀ Aq)
            H  ← a_mom G + s_keep H

        (the read-out's terms dHqᵀ Q, dYᵀ Aq come from :func:`_split_read_bwd_kernel`). What needs
        only the chunk's saved state and the incoming adjoints (the coefficients' gradients, H's
        update, a_keep G: G₂, H₂ and S are read for nothing else) is loaded and formed before the
        wait, while the previous launch drains, not after the row passes: the launch ends with its
        passes and G's store (34 → 30 µs per launch at 8k, 1.2 → 0.6 KB of stack; H100, fourteenth
        session). The passes are 16 rows (64-row ones spill and measured slower: twelfth session),
        so most of their dots run on the older MMA (summing W₁'s adjoint transposed, so that its dot
        has d = 128 rows as M and takes the warpgroup MMA, measured slower too)."""
        bh, rd, off1, mask1, off2, mask2, row_mask, rf, kmask, fd, n_all, BHCF, lead, k_base, v_base = _bwd_program(
            k_ptr, v_ptr, sk_b, sk_h, sv_b, sv_h, H, N, D, F, C, BD, BF
        )
        cc = bh * N + c
        # Before the wait (:func:`_after_previous_launch`) only what was written at least two launches
        # ago: W_c, S_c (the forward's), G, H (the previous finish launch's) and the read-outs' part.
        # (".cg": from L2, never a line an SM's L1 kept from an earlier launch.)
        st, W1, W2 = _chunk_state(w1_ptr, w2_ptr, bh, c, N, F, D, off1, mask1, off2, mask2)
        G1 = tl.load(g1_ptr + bh * fd + off1, mask=mask1, other=0.0, cache_modifier=".cg")
        G2 = tl.load(g2_ptr + bh * fd + off2, mask=mask2, other=0.0, cache_modifier=".cg")
        a_keep = tl.load(ak_ptr + cc)
        d_keep = _pair_inner(G1, W1, G2, W2)
        H1 = G1
        if MOM:
            H1 = tl.load(h1_ptr + bh * fd + off1, mask=mask1, other=0.0, cache_modifier=".cg")
            H2 = tl.load(h2_ptr + bh * fd + off2, mask=mask2, other=0.0, cache_modifier=".cg")
            S1 = tl.load(s1_ptr + st + off1, mask=mask1, other=0.0, cache_modifier=".cg")
            S2 = tl.load(s2_ptr + st + off2, mask=mask2, other=0.0, cache_modifier=".cg")
            a_mom = tl.load(am_ptr + cc)
            s_keep = tl.load(skeep_ptr + cc)
            d_mom = _pair_inner(G1, S1, G2, S2)
            d_skeep = _pair_inner(H1, S1, H2, S2)
            H2 = a_mom * G2 + s_keep * H2
        # The adjoint of W_c via everything in the chunk: the read-out's part (summed off the chain
        # by :func:`_split_read_bwd_kernel`), a_keep G (chunk c > 0; chunk 0's read weights are a
        # separate input), then the keys' part row pass by row pass.
        rslot = (bh * M + c % M) * fd
        R1 = tl.load(rr1_ptr + rslot + off1, mask=mask1, other=0.0, cache_modifier=".cg")
        R2 = tl.load(rr2_ptr + rslot + off2, mask=mask2, other=0.0, cache_modifier=".cg")
        _after_previous_launch(PDL)  # the start launch's sums for chunk c
        tl.atomic_add(dcoef_ptr + cc, d_keep, sem="relaxed")
        if MOM:
            tl.atomic_add(dcoef_ptr + n_all + cc, d_mom, sem="relaxed")
            tl.atomic_add(dcoef_ptr + 2 * n_all + cc, d_skeep, sem="relaxed")
            tl.store(h1_ptr + bh * fd + off1, a_mom * G1 + s_keep * H1, mask=mask1)
            tl.store(h2_ptr + bh * fd + off2, H2, mask=mask2)
        if c > 0:
            R1 += a_keep * G1
            R2 += a_keep * G2
        else:
            tl.store(g1_ptr + bh * fd + off1, a_keep * G1, mask=mask1)
            tl.store(g2_ptr + bh * fd + off2, a_keep * G2, mask=mask2)
        for r0 in range(0, C, RB):
            rr = r0 + tl.arange(0, RB)
            rows = (c * C + rr).to(tl.int64)
            K, E, out_rows = _key_rows(k_base, v_base, pk_ptr, sk_t, sv_t, bh, rows, rd, row_mask, D, N, C)
            dE = tl.load(de_ptr + out_rows, mask=row_mask, other=0.0)
            kept = scr_ptr + bh * C * F + rr[:, None] * F + rf[None, :]
            Hk = tl.load(kept, mask=kmask, other=0.0)
            B = tl.load(kept + BHCF, mask=kmask, other=0.0)
            dD = tl.load(kept + 2 * BHCF, mask=kmask, other=0.0)
            dAk = tl.load(kept + 3 * BHCF, mask=kmask, other=0.0)
            Ak = _act(Hk, GELU)
            Dk = B * _act_grad(Hk, GELU)
            wa = tl.load(wa_ptr + cc * C + rr)
            if CLIP:
                tok = bh * N * C + rows
                _, dd, ee, kk, nrm, raw, sig = _clip(K, E, aa_ptr, dd_ptr, tok, tau)
                dn = tl.where(raw <= 1.0, -tl.load(dsig_ptr + tok) * raw / nrm, 0.0)
                dE += dn[:, None] * tl.load(xe_ptr + out_rows, mask=row_mask, other=0.0)
                dD += (dn * kk)[:, None] * Dk
                dAk += (dn * ee)[:, None] * Ak
                wa = wa * sig
            if lead:
                tl.store(dv_ptr + out_rows, -dE, mask=row_mask)
            dAk = _dot(dE, W2, dAk, PREC)
            dK = _dot(-wa[:, None] * Dk, G1, None, PREC)
            if CLIP:
                dK += (tl.where(lead, dn * dd, 0.0))[:, None] * K
            if MOM:
                ws = tl.load(ws_ptr + cc * C + rr)
                if CLIP:
                    ws = ws * sig
                dK = _dot(-ws[:, None] * Dk, H1, dK, PREC)
            dHk = dAk * _act_grad(Hk, GELU) + dD * B * _act_grad2(Hk, GELU)
            dK = _dot(dHk, W1, dK, PREC)
            tl.atomic_add(dk_ptr + out_rows, dK, mask=row_mask, sem="relaxed")
            R1 = _dot(tl.trans(dHk), K, R1, PREC)
            R2 = _dot(tl.trans(E), dD * _act_grad(Hk, GELU), R2, PREC)
            R2 = _dot(tl.trans(dE), Ak, R2, PREC)
        if c > 0:  # chunk c reads its start accumulator: the read path joins G
            tl.store(g1_ptr + bh * fd + off1, R1, mask=mask1)
            tl.store(g2_ptr + bh * fd + off2, R2, mask=mask2)
        else:  # chunk 0's read weights are a separate input
            tl.store(r1_ptr + bh * fd + off1, R1, mask=mask1)
            tl.store(r2_ptr + bh * fd + off2, R2, mask=mask2)


def _block(hidden: int, env: str) -> int:
    cap = max(16, triton.next_power_of_2(hidden))
    return _env_rows(env, min(BLOCK, cap), cap)


def _read_group(chunks: int) -> int:
    """Chunks per launch of the read-outs' backward (``OLMO_MIRAS_TRITON_SPLIT_READ_GROUP``, default
    8): its buffer holds ``2 · F · d`` floats per (batch, head) and chunk of a group (32 MiB at
    OLMo2-1B shapes), and a group's 16 heads × 8 chunks fill the GPU's SMs once. Groups of 16 and
    32 chunks took the same time (scan at 8k: 9.94 / 9.94 ms at 8, 9.98 / 10.00 at 16, 9.96 /
    9.93 at 32; H100, seventeenth session) for 2× / 4× the buffer, 32 until then."""
    env = os.environ.get("OLMO_MIRAS_TRITON_SPLIT_READ_GROUP")
    group = int(env) if env and env.isdigit() else (0 if env else READ_GROUP)
    if group < 1:
        raise ValueError(f"OLMO_MIRAS_TRITON_SPLIT_READ_GROUP must be a positive number of chunks, got {env!r}")
    return max(1, min(group, chunks))


def _read_block(hidden: int) -> int:
    """Hidden units per step of the read-out kernels (forward and backward), which run off the
    chunk chain, one program per chunk: ``OLMO_MIRAS_TRITON_SPLIT_READ_BLOCK`` (default 32)."""
    _refuse_replaced_knobs("read-out")
    return _block(hidden, "OLMO_MIRAS_TRITON_SPLIT_READ_BLOCK")


def _read_precision(prec: str) -> str:
    """The read-out kernels' dot precision: the chain's, except that with bfloat16 operands they
    keep tf32. Their whole-chunk (64-row) tiles failed the GPU tests with bfloat16 operands (H100,
    Triton 3.6, sixteenth session), as the chain kernels' larger tiles did (:func:`_forward_chain_tiles`);
    off the chain, the bf16 mode's few percent come from the chain, not from them."""
    return "tf32" if prec == "bf16" else prec


def _read_args(hidden: int, prec: str) -> dict:
    """The read-out kernels' hidden units per step (:func:`_read_block`), dot precision
    (:func:`_read_precision`) and launch options: ``OLMO_MIRAS_TRITON_SPLIT_WARPS``, default 4 (8
    measured slower with a whole 64-row chunk per program: 1.09 / 0.29 ms against 1.01 / 0.26 for
    the backward / forward at 8k; H100, sixteenth session)."""
    warps = _opts("OLMO_MIRAS_TRITON_SPLIT_WARPS", FWD_WARPS)
    return dict(BF=_read_block(hidden), PREC=_read_precision(prec), **warps)


def _rows_per_pass(chunk: int, name: str, default: int) -> int:
    """Rows per pass (``RB``) from the knob ``name``, else ``default`` (at most the chunk)."""
    env = os.environ.get(name)
    rows = (int(env) if env.isdigit() else 0) if env else min(default, chunk)
    if rows < 1 or rows & (rows - 1) or chunk % rows:
        raise ValueError(f"{name} must be a power of two dividing the chunk ({chunk}), got {env!r}")
    return rows


def _forward_chain_tiles(chunk: int, prec: str) -> Tuple[int, dict, int, dict]:
    """Rows per pass and launch options of the forward chain's update kernel and (with the clip)
    norm kernel: ``OLMO_MIRAS_TRITON_SPLIT_FWD_ROWS`` / ``_FWD_WARPS`` and ``_NORM_ROWS`` /
    ``_NORM_WARPS``, default 64 rows and 8 warps. With bfloat16 operands
    (``OLMO_MIRAS_TRITON_PRECISION=bf16``) the update kernel keeps 16-row, 4-warp tiles: at 64
    rows and 8 warps it returned NaN without the clip (H100, Triton 3.6, eleventh session; cause not
    found), so larger update tiles are refused there rather than risked."""
    default_rows, default_warps = (BF16_ROWS, FWD_WARPS) if prec == "bf16" else (CHAIN_ROWS, CHAIN_WARPS)
    rows = _rows_per_pass(chunk, "OLMO_MIRAS_TRITON_SPLIT_FWD_ROWS", default_rows)
    opts = _opts("OLMO_MIRAS_TRITON_SPLIT_FWD_WARPS", default_warps)
    if prec == "bf16" and (rows > BF16_ROWS or opts.get("num_warps", FWD_WARPS) != FWD_WARPS):
        raise ValueError(
            f"OLMO_MIRAS_TRITON_PRECISION=bf16 runs the forward update kernel at {BF16_ROWS} rows and "
            f"{FWD_WARPS} warps only (larger tiles gave NaN on an H100); got "
            f"OLMO_MIRAS_TRITON_SPLIT_FWD_ROWS={rows}, _FWD_WARPS={opts.get('num_warps')}"
        )
    norm_rows = _rows_per_pass(chunk, "OLMO_MIRAS_TRITON_SPLIT_NORM_ROWS", CHAIN_ROWS)
    return rows, opts, norm_rows, _opts("OLMO_MIRAS_TRITON_SPLIT_NORM_WARPS", CHAIN_WARPS)


# Knobs that are no longer read, per group of kernels: why, and what replaced each. The single
# backward kernel's became the start and finish kernels' (twelfth session).
_REPLACED_KNOBS = {
    "backward": (
        "the backward is now a start and a finish kernel",
        {
            "OLMO_MIRAS_TRITON_SPLIT_ROWS": "OLMO_MIRAS_TRITON_SPLIT_BWD_START_ROWS / _BWD_FINISH_ROWS",
            "OLMO_MIRAS_TRITON_SPLIT_BWD_WARPS": "OLMO_MIRAS_TRITON_SPLIT_BWD_START_WARPS / _BWD_FINISH_WARPS",
            "OLMO_MIRAS_TRITON_SPLIT_BWD_STAGES": "OLMO_MIRAS_TRITON_SPLIT_BWD_START_STAGES / _BWD_FINISH_STAGES",
        },
    ),
    # the read-out kernels' rows per program (sixteenth session: a program takes the whole chunk)
    "read-out": (
        "the read-out kernels take a whole chunk's rows per program",
        {"OLMO_MIRAS_TRITON_SPLIT_READ_ROWS": "OLMO_MIRAS_TRITON_SPLIT_READ_BLOCK / OLMO_MIRAS_TRITON_SPLIT_WARPS"},
    ),
}


def _refuse_replaced_knobs(kernels: str) -> None:
    """Raise if one of ``kernels``' replaced knobs (:data:`_REPLACED_KNOBS`) is set, naming what
    replaced it: a setting of one would otherwise be ignored without a word."""
    why, knobs = _REPLACED_KNOBS[kernels]
    for old, new in knobs.items():
        if os.environ.get(old):
            raise ValueError(f"{old} is no longer read ({why}); set {new}")


def _backward_chain_tiles(chunk: int, prec: str) -> Tuple[int, dict, int, dict]:
    """Rows per pass and launch options of the backward's start kernel
    (``OLMO_MIRAS_TRITON_SPLIT_BWD_START_ROWS`` / ``_WARPS`` / ``_STAGES``, default 64 / 8 / 1) and
    finish kernel (``OLMO_MIRAS_TRITON_SPLIT_BWD_FINISH_ROWS`` / ``_WARPS`` / ``_STAGES``, default
    16 / 8 / 2). With bfloat16 operands the start kernel keeps 16-row passes and refuses larger
    ones: at 64 rows it failed the GPU test with the clip (H100, Triton 3.6, twelfth session), as
    the forward update kernel did (:func:`_forward_chain_tiles`). The old single kernel's knobs
    are refused with the names that replace them."""
    _refuse_replaced_knobs("backward")
    start_rows = _rows_per_pass(chunk, "OLMO_MIRAS_TRITON_SPLIT_BWD_START_ROWS", BF16_ROWS if prec == "bf16" else CHAIN_ROWS)
    if prec == "bf16" and start_rows > BF16_ROWS:
        raise ValueError(
            f"OLMO_MIRAS_TRITON_PRECISION=bf16 runs the backward start kernel at {BF16_ROWS} rows or fewer "
            f"(larger tiles failed on an H100); got OLMO_MIRAS_TRITON_SPLIT_BWD_START_ROWS={start_rows}"
        )
    start = _opts("OLMO_MIRAS_TRITON_SPLIT_BWD_START_WARPS", CHAIN_WARPS, "OLMO_MIRAS_TRITON_SPLIT_BWD_START_STAGES", 1)
    finish_rows = _rows_per_pass(chunk, "OLMO_MIRAS_TRITON_SPLIT_BWD_FINISH_ROWS", FINISH_ROWS)
    finish = _opts(
        "OLMO_MIRAS_TRITON_SPLIT_BWD_FINISH_WARPS", FINISH_WARPS, "OLMO_MIRAS_TRITON_SPLIT_BWD_FINISH_STAGES", FINISH_STAGES
    )
    return start_rows, start, finish_rows, finish


PDL_ENV = "OLMO_MIRAS_TRITON_PDL"


def _launch_pdl(device: torch.device) -> dict:
    """Launch arguments for programmatic dependent launch (``OLMO_MIRAS_TRITON_PDL``, default 1):
    on Hopper and later each of the chain's back-to-back launches starts its programs while the
    previous launch drains (:func:`_after_previous_launch`), instead of after it. Off where the GPU
    (compute capability < 9), the interpreter or the Triton build cannot do it."""
    env = os.environ.get(PDL_ENV, "1")
    if env not in ("0", "1"):
        raise ValueError(f"{PDL_ENV} must be 0 (plain launches) or 1 (programmatic dependent launch), got {env!r}")
    on = (
        env == "1"
        and gdc_wait is not None
        and not _interpreted()
        and device.type == "cuda"
        and torch.cuda.get_device_capability(device)[0] >= 9
    )
    return dict(PDL=True, launch_pdl=True) if on else dict(PDL=False)


def _opts(env: str, warps: int, stages_env: str = "OLMO_MIRAS_TRITON_SPLIT_STAGES", stages: int = STAGES) -> dict:
    if _interpreted():
        return {}
    chosen = os.environ.get(stages_env) or os.environ.get("OLMO_MIRAS_TRITON_SPLIT_STAGES", str(stages))
    return dict(num_warps=int(os.environ.get(env, str(warps))), num_stages=int(chosen))


class _SplitMLPScan(torch.autograd.Function):
    """Same inputs and outputs as :class:`~.triton_mlp._MLPScan` (``tau`` None: no clip)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, k, v, q, a_keep, a_mom, s_keep, w_a, w_s, r1, r2, a1, a2, m1, m2, chunk, tau, gelu
    ):
        b, h, t, d = k.shape
        n = t // chunk
        mom = m1 is not None
        k, v, q = _rows(k), _rows(v), _rows(q)
        ak, wa = _f32(a_keep), _f32(w_a)
        am, sk, ws = (_f32(a_mom), _f32(s_keep), _f32(w_a if w_s is None else w_s)) if mom else (ak, ak, wa)
        save = any(ctx.needs_input_grad)
        hidden = a1.shape[-2]
        # Chunk c's start state lives in slot c % NS: every chunk when saving for backward, else two.
        ns = n + 1 if save else 2
        dev = k.device
        w1 = torch.empty(b, h, ns, hidden, d, device=dev, dtype=torch.float32)
        w2 = torch.empty(b, h, ns, d, hidden, device=dev, dtype=torch.float32)
        w1[:, :, 0], w2[:, :, 0] = a1.detach(), a2.detach()
        if mom:
            s1, s2 = torch.empty_like(w1), torch.empty_like(w2)
            s1[:, :, 0], s2[:, :, 0] = m1.detach(), m2.detach()
        else:
            s1, s2 = w1, w2  # never read without MOM
        # y: stored whole by the read-out kernel when saving, else summed by the chain's atomics
        y = (torch.empty if save else torch.zeros)(b, h, t, d, device=dev, dtype=torch.float32)
        pk = torch.zeros_like(y)
        clip = tau is not None
        # With the clip, ‖Ak_t‖² and ‖D_t‖² summed over hidden units (kept for the backward).
        aa, dd = (torch.zeros(b * h, t, device=dev, dtype=torch.float32) for _ in range(2)) if clip else (pk, pk)
        # With the clip, the last chunk's Hk and D from the norm launch (read by the next update).
        kept = torch.empty(2, 2, b * h, chunk, hidden, device=dev, dtype=torch.float32) if clip else pk
        tau_ = float(tau) if clip else 1.0
        prec = _precision(dev, allow_bf16=True)
        bf = _block(hidden, "OLMO_MIRAS_TRITON_SPLIT_BLOCK")
        grid = (b * h, triton.cdiv(hidden, bf))
        rb, opts, norm_rb, norm_opts = _forward_chain_tiles(chunk, prec)
        pdl = _launch_pdl(dev)
        for c in range(n + 1):
            _split_fwd_kernel[grid](
                k, v, q, *_strides(k), *_strides(v), *_strides(q), y, pk, aa, dd, kept, ak, am, sk, wa, ws, w1, w2, s1, s2,
                c, h, n, ns, d, hidden, tau_, C=chunk, BD=_bd(d), BF=bf, MOM=mom, GELU=gelu, PREC=prec, RB=rb,
                READ=not save, CLIP=clip, **opts, **pdl,
            )
            if clip and c < n:  # chunk c's ‖D‖², before launch c + 1 applies its update
                _split_norm_kernel[grid](
                    v, *_strides(v), pk, dd, kept, w2, c, h, n, ns, d, hidden,
                    C=chunk, BD=_bd(d), BF=bf, GELU=gelu, PREC=prec, RB=norm_rb, **norm_opts, **pdl,
                )
        if save:  # every chunk's start state is kept: all read-outs at once
            _split_read_kernel[(b * h, n)](
                q, *_strides(q), y, w1, w2, h, n, d, hidden,
                C=chunk, BD=_bd(d), GELU=gelu, **_read_args(hidden, prec), **pdl,
            )
        last = n % ns
        outs = [w1[:, :, last].clone(), w2[:, :, last].clone()]
        if mom:
            outs += [s1[:, :, last].clone(), s2[:, :, last].clone()]
        if save:
            ctx.save_for_backward(k, v, q, pk, aa, dd, ak, am, sk, wa, ws, w1, w2, s1, s2)
            ctx.meta = (chunk, tau, gelu, mom, prec, [x.dtype if x is not None else None for x in
                        (k, v, q, a_keep, a_mom, s_keep, w_a, w_s, r1, r2, a1, a2, m1, m2)])
        return (y.to(q.dtype), *outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dw1, dw2, *ds):  # type: ignore[override]
        k, v, q, pk, aa, dd, ak, am, sk, wa, ws, w1, w2, s1, s2 = ctx.saved_tensors
        chunk, tau, gelu, mom, prec, dtypes = ctx.meta
        clip = tau is not None
        b, h, t, d = k.shape
        n = t // chunk
        hidden = w1.shape[-2]
        dev = k.device
        dy = torch.zeros_like(q) if dy is None else _rows(dy)

        g1, g2, h1, h2, r1, r2 = _state_adjoints(dw1, dw2, ds, mom, (b, h, hidden, d), dev)
        de, dk = (torch.zeros(b, h, t, d, device=dev, dtype=torch.float32) for _ in range(2))
        dq = torch.empty_like(de)  # stored whole by the read-outs' backward
        dw = torch.zeros(2, b * h, n, chunk, device=dev, dtype=torch.float32)
        dcoef = torch.zeros(3, b * h, n, device=dev, dtype=torch.float32)
        kept = torch.empty(4, b * h, chunk, hidden, device=dev, dtype=torch.float32)  # start → finish
        dv = torch.empty_like(de)  # −dE, from the finish kernel
        if clip:  # dE's part along dn and ∂L/∂σ (both summed by atomics)
            xe = torch.zeros_like(de)
            dsig = torch.zeros(b * h, t, device=dev, dtype=torch.float32)
        else:
            xe, dsig = de, dcoef  # never touched without CLIP
        bf = _block(hidden, "OLMO_MIRAS_TRITON_SPLIT_BWD_BLOCK")
        # The finish kernel's own hidden units per program, else the backward's.
        finish_block = "OLMO_MIRAS_TRITON_SPLIT_BWD_FINISH_BLOCK"
        fbf = _block(hidden, finish_block) if os.environ.get(finish_block) else bf
        srb, sopts, frb, fopts = _backward_chain_tiles(chunk, prec)
        # The read-outs' backward runs off the chunk chain, a group of chunks at a time (just before
        # the chain reaches the group: its buffer holds one group, not every chunk).
        group = _read_group(n)
        rr1 = torch.empty(b * h, group, hidden, d, device=dev, dtype=torch.float32)
        rr2 = torch.empty(b * h, group, d, hidden, device=dev, dtype=torch.float32)
        read_args = _read_args(hidden, prec)
        tau_ = float(tau) if clip else 1.0
        kv = (k, v, *_strides(k), *_strides(v))  # 2N launches: formed once, not per launch
        pdl = _launch_pdl(dev)
        for c in range(n - 1, -1, -1):  # start chunk c (its share of the sums), then finish it
            if c == n - 1 or (c + 1) % group == 0:
                g0 = c - c % group
                _split_read_bwd_kernel[(b * h, c + 1 - g0)](
                    q, dy, *_strides(q), *_strides(dy), w1, w2, dq, rr1, rr2, g0, h, n, group, d, hidden,
                    C=chunk, BD=_bd(d), GELU=gelu, **read_args, **pdl,
                )
            _split_bwd_start_kernel[(b * h, triton.cdiv(hidden, bf))](
                *kv, pk, aa, dd, wa, ws, w1, w2, g1, g2, h1, h2, kept, de, xe, dsig, dw,
                c, h, n, d, hidden, tau_,
                C=chunk, BD=_bd(d), BF=bf, MOM=mom, GELU=gelu, PREC=prec, RB=srb, CLIP=clip, **sopts, **pdl,
            )
            _split_bwd_finish_kernel[(b * h, triton.cdiv(hidden, fbf))](
                *kv, pk, aa, dd, ak, am, sk, wa, ws, w1, w2, s1, s2, g1, g2, h1, h2,
                r1, r2, rr1, rr2, kept, de, dk, xe, dsig, dv, dcoef, c, h, n, group, d, hidden, tau_,
                C=chunk, BD=_bd(d), BF=fbf, MOM=mom, GELU=gelu, PREC=prec, RB=frb, CLIP=clip, **fopts, **pdl,
            )
        return _input_grads(dk, dv, dq, dcoef, dw, (r1, r2, g1, g2, h1, h2), mom, chunk, dtypes)


def unsupported_reason(
    rule: MemoryRule, state: ScanState, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, chunk_size: int
) -> Optional[str]:
    """Why the hidden-split kernels cannot run this call at all (None: they can), independent of
    where the piece starts and ends (see :func:`split_mlp_scan` for that): the knob, else the
    checks every MLP kernel makes (:func:`~.triton_mlp.unsupported_reason`, no opt-in needed)."""
    if os.environ.get(SPLIT_ENV, "1") == "0":
        return f"{SPLIT_ENV}=0"
    return triton_mlp.unsupported_reason(rule, state, k, v, q, None, chunk_size, training_gate=False)


def split_mlp_scan(
    rule: MemoryRule, state: ScanState, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, gates: Gates, chunk_size: int
) -> Tuple[torch.Tensor, ScanState]:
    """The hidden-split kernels: whole chunks from a chunk boundary. Same contract as
    ``chunked_scan``; raises ``ValueError`` (with the reason) where they cannot run this call."""
    reason = unsupported_reason(rule, state, k, v, q, chunk_size) or piece_reason(state, k.shape[2], chunk_size)
    if reason is not None:
        raise ValueError(reason)
    return triton_mlp.apply_scan_function(_SplitMLPScan, rule, state, k, v, q, gates, chunk_size)
