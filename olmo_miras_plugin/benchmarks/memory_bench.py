"""Forward+backward cost of one memory layer vs. causal SDPA (and titans-pytorch when installed)."""

from __future__ import annotations

import argparse
import datetime
import gc
import os
from typing import List, Optional

import torch
import torch.nn.functional as F

from ..argtypes import float_at_least, int_at_least
from ..memory import NeuralMemoryConfig
from .timing import Measurement, device_description, format_table, measure, profile_kernels, write_json

__all__ = ["main", "check_against_reference"]

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def layer_config(args, impl: str) -> NeuralMemoryConfig:
    """The benchmarked memory layer: ``--preset`` at the command line's shapes, ``--depth``,
    ``--expansion`` and ``--max-grad-norm`` (inf: no per-token clip, the row-split Triton kernel)."""
    cfg = NeuralMemoryConfig.from_preset(
        args.preset, d_model=args.d_model, n_heads=args.heads, head_dim=args.head_dim,
        chunk_size=args.chunk, impl=impl, check_finite=False,
    )
    cfg.architecture.depth = args.depth
    cfg.architecture.expansion = args.expansion
    if args.max_grad_norm is not None:
        cfg.optimizer.max_grad_norm = args.max_grad_norm
    return cfg


def bench_miras(args, seq: int, impl: str, device: torch.device) -> Measurement:
    params = dict(layer=f"miras/{args.preset}/{impl}", seq=seq, batch=args.batch, chunk=args.chunk)
    note = _path_note(impl, device)
    torch.manual_seed(0)
    layer = layer_config(args, impl).build(init_device=str(device))
    x = torch.randn(args.batch, seq, args.d_model, device=device, requires_grad=True)
    autocast = torch.autocast(device.type, dtype=DTYPES[args.dtype], enabled=args.dtype != "fp32")

    def step():
        with autocast:
            y, _ = layer(x)
        y.float().sum().backward()
        x.grad = None
        layer.zero_grad(set_to_none=True)

    if args.scan_only:
        params["layer"] += " (scan only)"
        step = _scan_step(layer, args, seq, device)

    try:
        profile = profile_kernels(step, f"miras/{impl} T={seq}") if args.profile else None
        ms, peak = measure(step, device)
        return Measurement("miras", params, ms, peak, profile=profile, extra={"path": note} if note else {})
    except Exception as e:  # report OOMs and unsupported configs in the table instead of dying
        if not _oom(e):
            raise
        return Measurement("miras", params, None, None, error="OOM")
    finally:
        del layer, x
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _scan_step(layer, args, seq: int, device: torch.device):
    """Forward+backward of the memory scan alone (what fla's kernel computes: normalised q, k and
    v, per-token gates in, read-outs out), without the layer's projections, conv and norms."""
    from ..memory.scan import ScanState

    b, h, d = args.batch, layer.n_heads, layer.head_dim
    q, k = (F.normalize(torch.randn(b, h, seq, d, device=device), dim=-1).requires_grad_() for _ in range(2))
    v = torch.randn(b, h, seq, d, device=device, requires_grad=True)
    logits = torch.randn(b, seq, 3 * h, device=device, requires_grad=True)
    inputs = [q, k, v, logits]

    def step():
        gates = layer._gates_from_logits(torch.float32, list(logits.chunk(3, dim=-1)))
        s = layer.init_state(b, device)
        y, _ = layer.scan(ScanState(s.accum, s.momentum, s.read_weights, s.position), k, v, q, gates)
        y.sum().backward()
        for t in inputs:
            t.grad = None
        layer.zero_grad(set_to_none=True)

    return step


def bench_sdpa(args, seq: int, device: torch.device) -> Measurement:
    params = dict(layer="causal SDPA", seq=seq, batch=args.batch, chunk="")
    dtype = DTYPES[args.dtype]
    shape = (args.batch, args.heads, seq, args.head_dim or args.d_model // args.heads)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))

    def step():
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        o.float().sum().backward()
        q.grad = k.grad = v.grad = None

    try:
        ms, peak = measure(step, device)
        return Measurement("sdpa", params, ms, peak)
    except Exception as e:
        if not _oom(e):
            raise
        return Measurement("sdpa", params, None, None, error="OOM")


def bench_fla(args, seq: int, device: torch.device) -> Optional[Measurement]:
    """fla's ``chunk_delta_rule`` (the yardstick for the linear memory), when fla is installed."""
    try:
        from fla.ops.delta_rule import chunk_delta_rule  # type: ignore
    except ImportError:
        return None
    params = dict(layer="fla chunk_delta_rule", seq=seq, batch=args.batch, chunk=64)
    dtype = DTYPES[args.dtype]
    shape = (args.batch, seq, args.heads, args.head_dim or args.d_model // args.heads)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    beta = torch.rand(shape[:3], device=device, dtype=dtype).requires_grad_()

    def step():
        o = chunk_delta_rule(q, k, v, beta, use_qk_l2norm_in_kernel=True)[0]
        o.float().sum().backward()
        q.grad = k.grad = v.grad = beta.grad = None

    try:
        profile = profile_kernels(step, f"fla T={seq}") if args.profile else None
        ms, peak = measure(step, device)
        return Measurement("fla", params, ms, peak, profile=profile)
    except Exception as e:  # an fla/triton mismatch is reported, not fatal
        return Measurement("fla", params, None, None, error=f"{type(e).__name__}: {str(e)[:80]}")


def bench_titans_pytorch(args, seq: int, device: torch.device) -> Optional[Measurement]:
    try:
        from titans_pytorch import NeuralMemory as TitansNeuralMemory  # type: ignore
    except ImportError:
        return None
    params = dict(layer="titans-pytorch NeuralMemory", seq=seq, batch=args.batch, chunk=args.chunk)
    mem = TitansNeuralMemory(
        dim=args.d_model, chunk_size=args.chunk, heads=args.heads, dim_head=args.head_dim or args.d_model // args.heads
    ).to(device)
    x = torch.randn(args.batch, seq, args.d_model, device=device, requires_grad=True)

    def step():
        with torch.autocast(device.type, dtype=DTYPES[args.dtype], enabled=args.dtype != "fp32"):
            y, _ = mem(x)
        y.float().sum().backward()
        x.grad = None
        mem.zero_grad(set_to_none=True)

    try:
        ms, peak = measure(step, device)
        return Measurement("titans-pytorch", params, ms, peak)
    except Exception as e:
        if not _oom(e):
            raise
        return Measurement("titans-pytorch", params, None, None, error="OOM")


def bench_streaming(args, impl: str, device: torch.device) -> List[Measurement]:
    """Inference: stream ``--stream-tokens`` through one layer in ``--stream-segment`` pieces with the
    state carried; peak memory and tokens/s at each power-of-two milestone (should stay flat)."""
    import time

    torch.manual_seed(0)
    layer = layer_config(args, impl).build(init_device=str(device)).eval()
    autocast = torch.autocast(device.type, dtype=DTYPES[args.dtype], enabled=args.dtype != "fp32")
    seg = args.stream_segment
    x = torch.randn(args.batch, seg, args.d_model, device=device)
    rows, state, done = [], None, 0
    milestone = 8192
    with torch.no_grad(), autocast:
        # warm-up: kernel compilation is not streaming cost; a call from a fresh state and one
        # carrying it take different paths (e.g. the conv's context), each compiled once
        layer(x, layer(x, None)[1])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    with torch.no_grad(), autocast:
        while done < args.stream_tokens:
            y, state = layer(x, state)
            done += seg
            if done >= milestone or done >= args.stream_tokens:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                    peak = torch.cuda.max_memory_allocated(device) / 2**30
                else:
                    peak = None
                elapsed = time.perf_counter() - t0
                params = dict(layer=f"stream/{args.preset}/{impl}", seq=done, batch=args.batch, chunk=args.chunk)
                extra = {"tok_per_s": round(done * args.batch / elapsed)}
                if _path_note(impl, device):
                    extra["path"] = _path_note(impl, device)
                rows.append(Measurement("stream", params, elapsed * 1e3, peak, extra=extra))
                print(format_table(rows[-1:], ["layer", "seq"]).splitlines()[-1], flush=True)
                milestone *= 2
    assert state is not None and state.is_finite(), "memory state became non-finite while streaming"
    return rows


# Largest relative errors ``--check`` accepts (output, input gradient): a gate against a wrong
# implementation, looser than the tests. Low precision: bf16 projections (~5e-3 on an H100);
# float32: the Triton kernels' TF32 dots. memora under bf16 is ill-conditioned (its weights live on
# the simplex and its read-out norm amplifies the common mode: output up to ~6e-2, input gradient
# 0.15-0.5 depending on the chunk; docs/performance.md), so it gets its own, looser pair.
CHECK_TOLERANCE = {"low": (3e-2, 5e-2), "fp32": (1e-2, 1e-2)}
MEMORA_LOW_PRECISION_TOLERANCE = (0.15, 1.0)


def check_failures(check: dict) -> List[str]:
    """Why ``check`` (one :func:`check_against_reference` result) fails its tolerances; empty if it passes."""
    low = check["dtype"] != str(torch.float32)
    out_tol, grad_tol = CHECK_TOLERANCE["low" if low else "fp32"]
    if low and check["preset"] == "memora":
        out_tol, grad_tol = MEMORA_LOW_PRECISION_TOLERANCE
    bad = [] if check["finite"] else ["non-finite outputs or gradients"]
    for key, tol in (("out_rel_err", out_tol), ("no_grad_out_rel_err", out_tol), ("grad_rel_err", grad_tol)):
        if not check[key] <= tol:  # NaN fails too
            bad.append(f"{key} {check[key]:.2e} > {tol:.0e}")
    return bad


def check_against_reference(
    preset: str,
    device: torch.device,
    impl: str = "chunked",
    dtype: torch.dtype = torch.bfloat16,
    depth: Optional[int] = None,
    max_grad_norm: Optional[float] = None,
    chunk_size: int = 16,
    expansion: Optional[float] = None,
) -> dict:
    """Fresh random inputs: ``impl`` under ``dtype`` autocast vs the fp32 reference loop on ``device``.

    ``depth`` / ``max_grad_norm`` (``math.inf``: no clip) / ``chunk_size`` / ``expansion`` override the
    preset's, so the check covers the configuration being benchmarked (e.g. the linear memory that
    ``impl="triton"`` runs), at a small width (d_model 64, 4 heads) and three and a bit chunks.
    """
    torch.manual_seed(torch.seed() % 2**31)
    cfg = NeuralMemoryConfig.from_preset(preset, d_model=64, n_heads=4, chunk_size=chunk_size, impl="reference")
    if depth is not None:
        cfg.architecture.depth = depth
    if expansion is not None:
        cfg.architecture.expansion = expansion
    if max_grad_norm is not None:
        cfg.optimizer.max_grad_norm = max_grad_norm
    ref = cfg.build(init_device=str(device))
    x = torch.randn(2, 3 * chunk_size + 11, 64, device=device, requires_grad=True)
    y_ref, _ = ref(x)
    (g_ref,) = torch.autograd.grad(y_ref.square().sum(), x)
    ref.impl = impl  # type: ignore[assignment]
    for _ in range(2):  # the second call replays a captured graph (impl="graphed")
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            y, _ = ref(x)
        (g,) = torch.autograd.grad(y.float().square().sum(), x)
    # Inference takes other kernels (e.g. the MLP memory's forward-only Triton kernel): check it too.
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        y_infer, _ = ref(x)
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    finite = bool(torch.isfinite(y).all() and torch.isfinite(g).all() and torch.isfinite(y_infer).all())
    return {
        "preset": preset,
        "impl": impl,
        "chunk_size": chunk_size,
        "depth": cfg.architecture.depth,
        "max_grad_norm": cfg.optimizer.max_grad_norm,
        "dtype": str(dtype),
        "out_rel_err": rel(y, y_ref),
        "grad_rel_err": rel(g, g_ref),
        "no_grad_out_rel_err": rel(y_infer, y_ref),
        "finite": finite,
    }


def _path_note(impl: str, device: torch.device) -> Optional[str]:
    """What a row really runs when its impl can't run here (the table must not hide a fallback)."""
    if device.type == "cuda":
        return None
    if impl.startswith("triton") and os.environ.get("TRITON_INTERPRET") != "1":
        return "ran chunked: triton needs CUDA"
    if impl in ("graphed", "triton_graphed"):
        return "no CUDA graph on CPU"
    return None


def main(argv: Optional[List[str]] = None) -> None:
    from ..memory.config import MemoryImpl
    from ..memory.config import PRESETS as _PRESETS

    pos = int_at_least(1)
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seq", type=pos, nargs="+", default=[4096, 16384])
    p.add_argument("--batch", type=pos, default=1)
    p.add_argument("--d-model", type=pos, default=2048)
    p.add_argument("--heads", type=pos, default=16)
    p.add_argument("--head-dim", type=pos, default=128)
    p.add_argument("--depth", type=pos, default=2)
    p.add_argument("--expansion", type=float_at_least(0, strict=True), default=2.0)
    p.add_argument("--chunk", type=pos, default=64)
    p.add_argument("--preset", default="titans", choices=sorted(_PRESETS))
    p.add_argument("--impl", nargs="+", default=["chunked"], choices=[i.value for i in MemoryImpl])
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--no-sdpa", action="store_true")
    p.add_argument("--scan-only", action="store_true", help="time the memory scan alone (no projections/conv/norm)")
    p.add_argument("--fla", action="store_true", help="also time fla's chunk_delta_rule (linear-memory yardstick)")
    p.add_argument(
        "--max-grad-norm", type=float, default=None,
        help="per-token inner-gradient clip (default: the preset's; inf turns it off)",
    )
    p.add_argument("--tf32", action="store_true", help="allow TF32 for float32 matmuls (torch.backends.cuda.matmul)")
    p.add_argument("--profile", action="store_true", help="print the top GPU kernels of one step per row, and write them to the JSON (CUDA)")
    p.add_argument("--check", action="store_true", help="compare against the reference on fresh random inputs first")
    p.add_argument("--json", default="runs/bench/bench_memory.json", help="where the JSON goes (default: %(default)s)")
    p.add_argument("--stream-tokens", type=int_at_least(0), default=0, help="also stream this many tokens (inference)")
    p.add_argument("--stream-segment", type=pos, default=4096)
    args = p.parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device {args.device!r}: expected cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available on this machine")
    if args.profile and device.type != "cuda":
        p.error("--profile reads GPU kernel times: it needs --device cuda")
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True

    rows: List[Measurement] = []
    checks = []
    if args.check:
        for impl in args.impl:
            for preset in ("titans", "moneta", "yaad", "memora"):
                c = check_against_reference(
                    preset, device, impl, dtype=DTYPES[args.dtype], depth=args.depth,
                    max_grad_norm=args.max_grad_norm, chunk_size=args.chunk, expansion=args.expansion,
                )
                c["failures"] = check_failures(c)
                checks.append(c)
                print(
                    f"check {impl}/{preset}: output rel err {c['out_rel_err']:.2e}, "
                    f"input-grad rel err {c['grad_rel_err']:.2e}, "
                    f"no-grad output rel err {c['no_grad_out_rel_err']:.2e}, finite={c['finite']}"
                    + (f"  FAILED: {'; '.join(c['failures'])}" if c["failures"] else "")
                )
        failed = [f"{c['impl']}/{c['preset']}" for c in checks if c["failures"]]
        if failed:
            raise SystemExit(f"--check failed for {', '.join(failed)}: not benchmarking an implementation "
                             "that disagrees with the reference (tolerances: CHECK_TOLERANCE in memory_bench.py)")
    for seq in args.seq:
        for impl in args.impl:
            rows.append(bench_miras(args, seq, impl, device))
            print(format_table(rows[-1:], ["layer", "seq"]).splitlines()[-1], flush=True)
        if not args.no_sdpa:
            rows.append(bench_sdpa(args, seq, device))
        if args.fla:
            f = bench_fla(args, seq, device)
            if f is None:
                print("--fla: fla (flash-linear-attention) is not installed; no fla row")
            else:
                rows.append(f)
                print(format_table(rows[-1:], ["layer", "seq"]).splitlines()[-1], flush=True)
        t = bench_titans_pytorch(args, seq, device)
        if t is not None:
            rows.append(t)
    if args.stream_tokens:
        for impl in args.impl:
            rows.extend(bench_streaming(args, impl, device))
    meta = {
        "device": device_description(device),
        "date": datetime.date.today().isoformat(),
        "args": vars(args),
        "checks": checks,
    }
    print(f"\n{meta['device']}, {args.dtype}, d_model={args.d_model}, heads={args.heads}x{args.head_dim}, "
          f"depth={args.depth}, expansion={args.expansion}; forward+backward")
    print(format_table(rows, ["layer", "seq", "batch", "chunk"]))
    write_json(args.json, rows, meta)
    print(f"wrote {args.json}")
