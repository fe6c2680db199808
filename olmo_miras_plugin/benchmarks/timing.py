"""Timing and peak-memory measurement shared by the benchmark scripts."""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

from ..atomic_files import write_text_atomic

__all__ = [
    "Measurement", "measure", "format_table", "write_json", "write_payload", "finite_or_none", "device_description",
    "profile_kernels", "kernel_summary",
]


@dataclass
class Measurement:
    name: str
    params: Dict[str, Any]
    ms: Optional[float]
    peak_gib: Optional[float]
    error: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    # ``--profile``: one step's GPU kernels (:func:`kernel_summary`); in the JSON, not the table
    profile: Optional[Dict[str, Any]] = None


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    import platform

    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads (torch {torch.__version__})"


def measure(fn: Callable[[], Any], device: torch.device, warmup: int = 2, reps: int = 5) -> tuple[float, Optional[float]]:
    """Median milliseconds of ``fn`` and its peak device memory in GiB (CUDA only).

    On CUDA this uses ``triton.testing.do_bench`` (CUDA events, median) when triton is present.
    """
    if device.type == "cuda":
        fn()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30
        try:
            from triton.testing import do_bench

            ms = float(do_bench(fn, warmup=25, rep=200, return_mode="median"))
        except ImportError:
            times = []
            for _ in range(reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize(device)
                times.append(start.elapsed_time(end))
            ms = statistics.median(times)
        return ms, peak
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), None


def format_table(rows: List[Measurement], columns: List[str]) -> str:
    header = columns + ["ms", "peak GiB", "note"]
    body = []
    for r in rows:
        body.append(
            [str(r.params.get(c, "")) for c in columns]
            + [
                "—" if r.ms is None else f"{r.ms:.2f}",
                "—" if r.peak_gib is None else f"{r.peak_gib:.2f}",
                r.error or ", ".join(f"{k}={v}" for k, v in r.extra.items()),
            ]
        )
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(b) for b in body]
    return "\n".join(out)


def write_json(path: str, rows: List[Measurement], meta: Dict[str, Any]) -> None:
    """Write the table as JSON (parent folders created), replacing ``path`` atomically."""
    write_payload(path, {"meta": meta, "results": [asdict(r) for r in rows]})


def finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, ±inf) inside dicts, lists and tuples replaced
    by None: strict JSON has no NaN / Infinity, and an unknown figure is null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def write_payload(path: str, payload: Dict[str, Any]) -> None:
    """Write any JSON payload as strict JSON (non-finite floats as null, :func:`finite_or_none`;
    parent folders created), replacing ``path`` atomically."""
    write_text_atomic(path, json.dumps(finite_or_none(payload), indent=2, allow_nan=False), make_parents=True)


def kernel_summary(events, top: int) -> Dict[str, Any]:
    """Where a profiled step's GPU time went, from profiler events (``key``, ``count``,
    ``self_device_time_total`` in µs): total milliseconds, the number of GPU ops, and the ``top``
    kernels by time (name, ms, launches), so that a benchmark's JSON carries the per-kernel
    figures its documentation quotes."""
    total_us = sum(e.self_device_time_total for e in events)
    kernels = [
        {"name": e.key, "ms": e.self_device_time_total / 1e3, "count": e.count}
        for e in sorted(events, key=lambda e: -e.self_device_time_total)[:top]
    ]
    return {"gpu_ms": total_us / 1e3, "gpu_ops": sum(e.count for e in events), "kernels": kernels}


def profile_kernels(step: Callable[[], Any], label: str, top: int = 15) -> Dict[str, Any]:
    """Run ``step`` once to warm up and once under the profiler (CUDA), print where the second
    run's GPU time went and return it (:func:`kernel_summary`)."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    summary = kernel_summary(events, top)
    print(f"profile {label}: {summary['gpu_ops']} GPU ops, {summary['gpu_ms']:.2f} ms of GPU time")
    for k in summary["kernels"]:
        print(f"  {k['ms']:8.2f} ms {k['count']:6d}x  {k['name'][:110]}")
    return summary
