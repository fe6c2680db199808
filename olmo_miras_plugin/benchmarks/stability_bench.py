"""Does the memory's outer gradient stay at scale while a model trains? (docs/memory.md, "Inner
step size and backprop span".)

Trains OLMo2-1B (or any OLMo-core preset) with memory layers for a few dozen steps, a fresh
sequence per step, and reports per step the loss, the largest gradient norm among the memory's
parameters and the total gradient norm (before clipping), the memory layers' largest effective
inner step θ/(1 − η) and mean θ, η (the gates the outer optimiser moves), then the median, the
maximum and the spikes (> 100× the median) of the memory's gradient norm. The exploding outer gradients this looks for grow
with the backprop span: ``--seq`` here (the whole sequence, no segments), or
``--memory-backprop-span`` where the memory layers cut their own graph inside the sequence.

Text: byte tokens of ``--corpus`` files (default: this repository's ``.py`` and ``.md`` files,
so it runs offline), or ``--random-tokens`` (one fixed random batch, the throughput benchmark's
data: it flatters the memory).
"""

from __future__ import annotations

import argparse
import datetime
import math
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

from ..memory import NeuralMemory
from ..models import is_memory_param
from .timing import device_description, write_payload
from ..argtypes import int_at_least
from .train_bench import add_model_args, build_model

__all__ = ["main"]

REPO_ROOT = Path(__file__).resolve().parents[2]
SPIKE = 100.0
"""A step's memory gradient norm counts as a spike past this multiple of the run's median."""


def byte_corpus(paths: Optional[List[str]]) -> torch.Tensor:
    """Byte tokens (0–255) of the given files, or of the repository's ``.py`` / ``.md`` files."""
    if paths:
        files = [Path(p) for p in paths]
    else:
        files = sorted(
            p for p in REPO_ROOT.rglob("*")
            if p.suffix in (".py", ".md") and not any(part.startswith(".") for part in p.relative_to(REPO_ROOT).parts)
        )
    data = b"".join(f.read_bytes() for f in files)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def nan_max(values: List[float]) -> float:
    """The largest of ``values``, NaN if any is NaN (Python's ``max`` skips or keeps a NaN
    depending on where it stands)."""
    values = list(values)
    return math.nan if any(math.isnan(v) for v in values) else max(values)


def run(args) -> Dict[str, Any]:
    if args.steps < 1 or args.warmup < 0:
        raise ValueError(f"steps={args.steps}, warmup={args.warmup}: needs steps >= 1 and warmup >= 0")
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = build_model(args, True, str(device))
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    memories = [m for m in model.modules() if isinstance(m, NeuralMemory)]
    for m in memories:  # gate statistics of every forward (a few reductions per layer)
        m.record_diagnostics = True
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=device.type == "cuda")
    # Linear warm-up over ``warmup`` steps; 0 (like 1): the full rate from the first step.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(args.warmup, 1)))
    g = torch.Generator().manual_seed(args.seed)
    if args.random_tokens:
        fixed = torch.randint(0, args.vocab_size, (1, args.seq), generator=g)
    else:
        tokens = byte_corpus(args.corpus)
        if len(tokens) <= args.seq:
            raise ValueError(f"the corpus has {len(tokens):,} tokens; --seq {args.seq} needs more")
    steps: List[Dict[str, float]] = []
    for step in range(args.steps):
        if args.random_tokens:
            x = fixed
        else:
            i = int(torch.randint(0, len(tokens) - args.seq, (1,), generator=g))
            x = tokens[None, i : i + args.seq]
        x = x.to(device)
        loss = F.cross_entropy(model(x)[0, :-1].float(), x[0, 1:])
        diags = [m.last_diagnostics for m in memories if m.last_diagnostics]
        step_max = nan_max([d["effective_step_max"].item() for d in diags])
        eta = statistics.fmean(d["eta"].item() for d in diags) if all("eta" in d for d in diags) else math.nan
        theta = statistics.fmean(d["theta"].item() for d in diags)
        loss.backward()
        memory = nan_max([p.grad.float().norm().item() for n, p in model.named_parameters() if p.grad is not None and is_memory_param(n)])
        clip = args.clip if args.clip > 0 else math.inf
        total = torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        steps.append({"loss": loss.item(), "memory_grad_norm": memory, "total_grad_norm": total,
                      "effective_step_max": step_max, "theta_mean": theta, "eta_mean": eta})
        print(f"step {step:3d}  loss {loss.item():8.4f}  memory grad {memory:9.3g}  total grad {total:9.3g}  "
              f"max θ/(1-η) {step_max:8.3g}  mean θ {theta:8.3g}  mean η {eta:6.4f}", flush=True)
    mem = [s["memory_grad_norm"] for s in steps]
    finite = [m for m in mem if math.isfinite(m)]
    median = statistics.median(finite) if finite else math.inf
    # Diverged: a NaN/Inf loss, or a NaN/Inf gradient norm (the optimiser step it feeds makes the
    # weights non-finite, with or without clipping).
    keys = ("loss", "memory_grad_norm", "total_grad_norm")
    bad = [i for i, s in enumerate(steps) if not all(math.isfinite(s[k]) for k in keys)]
    summary = {
        "memory_grad_median": median,
        "memory_grad_max": nan_max(mem),
        "spikes": [i for i, m in enumerate(mem) if not m < SPIKE * median],
        "effective_step_max": nan_max([s["effective_step_max"] for s in steps]),
        "loss_first": steps[0]["loss"],
        "loss_last10": statistics.fmean(s["loss"] for s in steps[-10:]),
        # the first step with a NaN/Inf loss or gradient norm (None: none); the JSON writes NaN as null
        "diverged_at": bad[0] if bad else None,
    }
    return {"steps": steps, "summary": summary}


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, impl="triton_graphed")
    p.add_argument("--seq", type=int_at_least(2, " (next-token loss needs 2 tokens)"), default=8192, help="tokens per sequence: the backprop span")
    p.add_argument("--steps", type=int_at_least(1), default=60)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument(
        "--warmup", type=int_at_least(0), default=10,
        help="linear learning-rate warm-up steps (0 or 1: none; default: %(default)s)",
    )
    p.add_argument("--clip", type=float, default=1.0, help="global gradient clipping (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corpus", nargs="+", help="text files to read as byte tokens (default: this repository's)")
    p.add_argument("--random-tokens", action="store_true", help="one fixed batch of random tokens instead")
    p.add_argument("--json", default="runs/bench/bench_stability.json", help="where the JSON goes (default: %(default)s)")
    args = p.parse_args(argv)
    if args.vocab_size < 256 and not args.random_tokens:
        p.error(f"--vocab-size {args.vocab_size} is too small for byte tokens (needs >= 256)")
    result = run(args)
    s = result["summary"]
    print(
        f"\n{device_description(torch.device(args.device))}; {args.preset} + {args.block_type} every {args.every}, "
        f"T={args.seq}, memory backprop span {args.memory_backprop_span or args.seq}, {args.steps} steps\nmemory grad norm: median {s['memory_grad_median']:.3g}, "
        f"max {s['memory_grad_max']:.3g}, spikes (> {SPIKE:g}x median) at steps {s['spikes']}; "
        f"largest θ/(1-η) {s['effective_step_max']:.3g}; "
        f"loss {s['loss_first']:.3f} -> {s['loss_last10']:.3f} (mean of the last 10)"
    )
    meta = {"device": device_description(torch.device(args.device)), "date": datetime.date.today().isoformat(), "args": vars(args)}
    write_payload(args.json, {"meta": meta, **result})
    if s["diverged_at"] is not None:
        raise SystemExit(
            f"non-finite loss or gradient norm from step {s['diverged_at']}: the run diverged, its figures are not a stability result "
            f"(NaN/Inf written as null in {args.json}; see the steps above)"
        )
