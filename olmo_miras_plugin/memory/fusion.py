"""The layer's elementwise work around the memory scan, fused by ``torch.compile`` on CUDA.

Between the input projection and the scan (short conv + SiLU, q/k/v split, cast to the inner
dtype, head-major layout, q/k L2 norm, gates) and between the scan and the output projection
(RMS norm, token-major layout, cast) the layer does only pointwise work and row reductions over
``head_dim``. Run eagerly that was ~50 kernel launches forward+backward, ~9.5 of the layer's 15 ms
at T = 16k on an H100 (the scan: 3.6 ms): each op reads and writes a (T, 6144) tensor, plus casts,
layout copies and the concatenation behind ``split``'s backward. Compiled, :func:`prepare` and
:func:`finish` are a few kernels each way that read their inputs once and write the layouts the
scan and the output projection consume. On CUDA the preparation runs by hand-written Triton
kernels instead (:mod:`.triton_prepare`): the compiled backward was ~10× its memory traffic.

CPU stays eager (tests and the CPU demo would pay seconds of C++ compilation per shape) unless
:func:`compile_mode` forces the compiled path, which the tests use to compare the two.
"""

from __future__ import annotations

import math
import os
import types
import zlib
from contextlib import contextmanager
from typing import Any, Callable, Dict, Hashable, Iterator, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from . import triton_prepare
from .conv import causal_conv_silu
from .scan import Gates

__all__ = ["compile_mode", "gates_from_logits", "prepare", "finish"]

Prepared = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Gates, Optional[torch.Tensor]]


def gates_from_logits(
    logits: Sequence[torch.Tensor], dtype: torch.dtype, theta_max: float, eta_max: float = 1.0
) -> Gates:
    """Gates ``(batch, heads, seq)`` in ``dtype``, contiguous, from the θ, α (, η) logits ``(batch, seq, heads)``:
    θ = θ_max σ(z_θ), α = σ(z_α), η = η_max σ(z_η) (log η = log η_max + log σ(z_η), stable)."""
    # shape: (batch, heads, seq)
    z_theta, z_alpha, *z_eta = (rearrange(z.to(dtype), "b t h -> b h t") for z in logits)
    theta = (theta_max * torch.sigmoid(z_theta)).contiguous()
    if z_eta:
        eta = (eta_max * torch.sigmoid(z_eta[0])).contiguous()
        log_eta = (F.logsigmoid(z_eta[0]) + math.log(eta_max)).contiguous()
    else:
        eta = log_eta = torch.zeros_like(theta)
    alpha, log_keep = torch.sigmoid(z_alpha).contiguous(), F.logsigmoid(-z_alpha).contiguous()
    return Gates(theta, eta, alpha, log_eta, log_keep)


def _prepare(
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
) -> Prepared:
    """The fused projection ``z = [q | k | v | gate logits]`` ``(batch, seq, 3·heads·head_dim + n_gates·heads)``
    → q, k, v ``(batch, heads, seq, head_dim)`` (contiguous, ``dtype``), the gates and the new conv context.

    The conv runs in ``dtype`` (float32 under bf16 autocast): one rounding of its output instead of one per tap.
    """
    n_qkv = 3 * n_heads * head_dim
    qkv, gate_logits = z[..., :n_qkv].to(dtype), z[..., n_qkv:]
    new_context = conv_context
    if conv_weight is not None:
        assert conv_context is not None
        qkv, new_context = causal_conv_silu(qkv, conv_weight.to(dtype), conv_context.to(dtype))
    # shape: (batch, heads, seq, head_dim) each
    q, k, v = (rearrange(t, "b t (h d) -> b h t d", h=n_heads) for t in qkv.chunk(3, dim=-1))
    if qk_norm:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    gates = gates_from_logits(gate_logits.chunk(gate_logits.shape[-1] // n_heads, dim=-1), dtype, theta_max, eta_max)
    return q.contiguous(), k.contiguous(), v.contiguous(), gates, new_context


def _finish(y: torch.Tensor, norm_weight: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Read-outs ``(batch, heads, seq, head_dim)`` → RMS-normed per head, ``(batch, seq, heads·head_dim)`` in ``out_dtype``."""
    y = F.rms_norm(y, (y.shape[-1],), weight=norm_weight.to(y.dtype), eps=1e-6)
    # shape: (batch, seq, heads·head_dim)
    return rearrange(y, "b h t d -> b t (h d)").to(out_dtype)


# ---------------------------------------------------------------------------------------- dispatch
_MODE: Optional[bool] = None
_COMPILED: Dict[Tuple[Hashable, ...], Callable] = {}


@contextmanager
def compile_mode(mode: Optional[bool]) -> Iterator[None]:
    """``True``: compile on every device (CPU inductor: for tests); ``False``: always eager;
    ``None`` (default): compile on CUDA only."""
    global _MODE
    previous, _MODE = _MODE, mode
    try:
        yield
    finally:
        _MODE = previous


def _use_compiled(t: torch.Tensor) -> bool:
    # Inside an enclosing torch.compile (OLMo-core compiling a whole block) the eager code is
    # traced into that graph: a nested compiled function would only break it.
    if torch.compiler.is_compiling():
        return False
    return t.is_cuda if _MODE is None else _MODE


def _prepare_recomputing(
    z: torch.Tensor, conv_weight: Optional[torch.Tensor], conv_context: Optional[torch.Tensor], **kwargs: Any
) -> Prepared:
    """:func:`_prepare` saving only its inputs for backward (the compiled path).

    Left alone, AOTAutograd's partitioner saves the conv taps: it never recomputes a pad, so it
    stores several float32 ``(T, channels)`` tensors forward to read them back in backward.
    Checkpointing marks every op inside for recomputation: backward reads ``z`` (bf16) again.
    """
    return checkpoint(_prepare, z, conv_weight, conv_context, use_reentrant=False, **kwargs)


def _inductor_options(conv_kernel: int) -> Dict[str, Any]:
    """Inductor writes out a pointwise value used by several consumers once it reads more than
    4–8 inputs or holds 30 ops. A K-tap conv is past that, so its output would go to memory in
    float32 forward and twice more backward; in these memory-bound kernels recomputing the taps
    in each consumer costs nothing. Scaled with K; without a conv the defaults stand."""
    if conv_kernel == 0:
        return {}
    return {
        "realize_reads_threshold": 8 * conv_kernel,
        "realize_acc_reads_threshold": 8 * conv_kernel,
        "realize_opcount_threshold": 50 * conv_kernel,
    }


def _compiled(fn: Callable, key: Tuple[Hashable, ...], options: Optional[Dict[str, Any]] = None) -> Callable:
    """``fn`` under ``torch.compile``, one copy per ``key``: layer type and :func:`_call_class`.

    Dynamo keeps compiled graphs on the *code object*, at most ``recompile_limit`` (8) of them,
    and runs the function eagerly past that. Grad / no-grad × batch 1 / more × 1 token / more
    alone would fill it for one layer type; a copy of the code per key holds one graph each (as
    ``scan._compiled_chunk_step`` keeps one copy per layer).
    """
    full_key = (fn.__name__, *key)
    compiled = _COMPILED.get(full_key)
    if compiled is None:
        # Named by the key, not the call order: Dynamo's profile of dynamic dims (kept between
        # runs in its cache) is looked up by code name.
        name = f"{fn.__name__.lstrip('_')}_{zlib.crc32(repr(key).encode()):08x}"
        code = fn.__code__.replace(co_name=name)
        copy = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
        copy.__kwdefaults__ = fn.__kwdefaults__
        compiled = _COMPILED[full_key] = torch.compile(copy, options=options)
    return compiled


def _call_class(batch: int, seq: int) -> Tuple[bool, bool, bool]:
    """What separates one layer type's graphs: grad mode (guarded global state) and batch or
    sequence of size 1 (sizes Dynamo always specialises). Other sizes are symbolic
    (:func:`_mark_dynamic`): evaluation at many lengths reuses one graph, and a 1-token
    generation step compiles once."""
    return torch.is_grad_enabled(), batch == 1, seq == 1


def _mark_dynamic(t: Optional[torch.Tensor], *dims: int) -> None:
    if t is None:
        return
    for d in dims:
        if t.shape[d] > 1:
            torch._dynamo.maybe_mark_dynamic(t, d)


PREPARE_ENV = "OLMO_MIRAS_PREPARE"
_PREPARE_BACKENDS = ("triton", "compiled")


def _prepare_backend() -> str:
    """``OLMO_MIRAS_PREPARE``: ``triton`` (default; falls back to ``compiled`` where the kernels
    cannot run) or ``compiled``, for comparisons."""
    backend = os.environ.get(PREPARE_ENV, "triton")
    if backend not in _PREPARE_BACKENDS:
        raise ValueError(f"{PREPARE_ENV} must be one of {', '.join(_PREPARE_BACKENDS)}, got {backend!r}")
    return backend


def prepare(
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
) -> Prepared:
    """:func:`_prepare` on CUDA by the Triton kernels of :mod:`.triton_prepare` where they run this
    call (``OLMO_MIRAS_PREPARE=compiled``: never), else compiled (see :func:`compile_mode`)."""
    kwargs = dict(n_heads=n_heads, head_dim=head_dim, qk_norm=qk_norm, theta_max=theta_max, dtype=dtype, eta_max=eta_max)
    if not _use_compiled(z):
        return _prepare(z, conv_weight, conv_context, **kwargs)  # type: ignore[arg-type]
    if (
        z.is_cuda
        and _prepare_backend() == "triton"
        and triton_prepare.unsupported_reason(z, conv_weight, conv_context, n_heads, head_dim, dtype) is None
    ):
        return triton_prepare.run(z, conv_weight, conv_context, **kwargs)  # type: ignore[arg-type]
    kernel = 0 if conv_weight is None else conv_weight.shape[1]
    # A context carried from a previous piece with grad is one more guarded variant.
    carried = conv_context is not None and conv_context.requires_grad
    key = (n_heads, head_dim, kernel, z.shape[-1], qk_norm, theta_max, eta_max, carried, *_call_class(z.shape[0], z.shape[1]))
    fn = _compiled(_prepare_recomputing, key, _inductor_options(kernel))
    _mark_dynamic(z, 0, 1)
    _mark_dynamic(conv_context, 0)
    return fn(z, conv_weight, conv_context, **kwargs)


def finish(y: torch.Tensor, norm_weight: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """:func:`_finish`, compiled on CUDA (see :func:`compile_mode`)."""
    if not _use_compiled(y):
        return _finish(y, norm_weight, out_dtype)
    fn = _compiled(_finish, (y.shape[1], y.shape[-1], *_call_class(y.shape[0], y.shape[2])))
    if y._base is not None or not y.is_contiguous():
        # A scan ending inside its only chunk returns a slice of a longer buffer; Dynamo guards
        # on an input's strides, offset and base, so such views would each compile a graph.
        y = y.clone(memory_format=torch.contiguous_format)
    _mark_dynamic(y, 0, 2)
    return fn(y, norm_weight, out_dtype)
