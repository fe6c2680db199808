"""``impl="triton"``: route each call to a Triton kernel, with the PyTorch scan for what it can't do.

Kernels (one module each): ``triton_linear`` (linear memory), ``triton_mlp_split`` (depth-2 MLP
memory with or without the per-token clip: hidden units split over programs) and ``triton_mlp``
(depth-2 MLP memory, one program per head: only with ``OLMO_MIRAS_TRITON_SPLIT=0``), each forward
and backward. A kernel takes whole chunks from a chunk boundary; :func:`scan` runs any partial head/tail chunk through :func:`~.scan.chunked_scan`
and the whole chunks in between through the kernel. Where no kernel can run the call at all
(another rule, no CUDA, Triton missing, float64, ...) everything
goes to ``chunked_scan`` (``compiled`` on CUDA), with the reason logged once.
"""

from __future__ import annotations

import logging
from typing import Callable, List, Optional, Tuple

import torch

from . import triton_linear, triton_mlp, triton_mlp_split
from .scan import Gates, MemoryRule, ScanState, chunked_scan

try:
    from triton.runtime.errors import OutOfResources
except Exception:  # pragma: no cover - triton missing: no kernel ever launches

    class OutOfResources(Exception):  # type: ignore[no-redef]
        pass


__all__ = ["kernel_for", "rule_supported", "scan"]

log = logging.getLogger(__name__)

ScanFn = Callable[..., Tuple[torch.Tensor, ScanState]]

_LOGGED: set = set()
_FAILED: set = set()  # (kernel, device type, head_dim, chunk) that ran out of resources before


def rule_supported(rule: MemoryRule) -> bool:
    """Whether a kernel computes this rule at all (whether a call reaches it also depends on the
    tensors, see :func:`kernel_for`)."""
    if not triton_linear.available():
        return False
    if rule.architecture.depth == 1:
        return triton_linear.rule_reason(rule) is None
    return triton_mlp.rule_reason(rule) is None


def kernel_for(
    rule: MemoryRule, state: ScanState, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, gates: Gates, chunk_size: int
) -> Tuple[Optional[ScanFn], Optional[str]]:
    """``(kernel, None)`` for the kernel that can run this call, or ``(None, why none can)``."""
    if rule.architecture.depth == 1:
        fn, reason = triton_linear.linear_scan, triton_linear.unsupported_reason(rule, state, k, chunk_size, v, q)
    else:
        fn, reason = triton_mlp_split.split_mlp_scan, triton_mlp_split.unsupported_reason(rule, state, k, v, q, chunk_size)
        if reason is not None:  # OLMO_MIRAS_TRITON_SPLIT=0 (or a shared check, refused again)
            split_reason = reason
            fn, reason = triton_mlp.mlp_scan, triton_mlp.unsupported_reason(rule, state, k, v, q, gates, chunk_size)
            if reason is not None and reason != split_reason:  # both reasons: the first one is usually the point
                reason = f"{split_reason}; and the one-program-per-head kernel: {reason}"
    if reason is None and (fn.__name__, k.device.type, k.shape[-1], chunk_size) in _FAILED:
        reason = "the triton kernel failed to launch for this shape before (see the log)"
    return (fn, None) if reason is None else (None, reason)


def scan(
    rule: MemoryRule, state: ScanState, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, gates: Gates, chunk_size: int
) -> Tuple[torch.Tensor, ScanState]:
    """Same contract as :func:`~.scan.chunked_scan`; whole chunks through a Triton kernel."""
    kernel, reason = kernel_for(rule, state, k, v, q, gates, chunk_size)
    if kernel is None:
        if reason not in _LOGGED:
            _LOGGED.add(reason)
            log.info("impl='triton' falls back to the PyTorch chunked scan: %s", reason)
        return chunked_scan(rule, state, k, v, q, gates, chunk_size, compiled=k.is_cuda)
    c, t = chunk_size, k.shape[2]
    head = min(t, (c - state.position % c) % c)
    if head == 0 and t >= c and not triton_linear._reads_accum(state):
        head = c
    n_full = (t - head) // c
    # (start, stop, through the kernel?)
    pieces = [(0, head, False), (head, head + n_full * c, True), (head + n_full * c, t, False)]
    outs: List[torch.Tensor] = []
    for start, stop, through_kernel in pieces:
        if stop <= start:
            continue
        sub = Gates(*(g[:, :, start:stop] for g in gates))
        args = (rule, state, k[:, :, start:stop], v[:, :, start:stop], q[:, :, start:stop], sub, c)
        if through_kernel:
            try:
                y, new = kernel(*args)
            except OutOfResources as e:  # a safety net: see the kernels' unsupported_reason
                log.warning("impl='triton': %s; using the PyTorch chunked scan for this shape", e)
                _FAILED.add((kernel.__name__, k.device.type, k.shape[-1], c))
                y, new = chunked_scan(*args, compiled=k.is_cuda)
        else:
            y, new = chunked_scan(*args)
        state = new
        outs.append(y)
    if not outs:  # zero tokens
        return chunked_scan(rule, state, k, v, q, gates, chunk_size)
    return (torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]), state
