"""Whole-model training throughput: OLMo2-1B vs. OLMo2-1B with memory layers (same harness).

Single GPU (default): bf16 weights, fused AdamW, SDPA, batch 1 × T, forward + backward + step,
median over steps — the harness of ``shared/reference/anchors_gpu3.py``, so the base row is
comparable with the recorded anchor. ``--fsdp`` (under ``torchrun``): OLMo-core's ``apply_fsdp``
over all ranks (meta-device build, bf16 params, fp32 reduce), a few steps on fixed random
tokens, loss and tokens/s per rank.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import statistics
import time
from typing import List, Optional

import torch
import torch.nn.functional as F

from ..argtypes import int_at_least
from ..memory import MemoryImpl
from ..models import MirasMemoryConfig, miras_from_preset, parameter_report
from .timing import Measurement, device_description, format_table, profile_kernels, write_json, write_payload

__all__ = ["main"]

WARMUP_STEPS = 3
"""Untimed steps at the start of every run (allocator, autotuning, graph capture): the step time is
the median of the steps after these, so ``--steps`` must exceed it."""


def memory_presets() -> List[str]:
    """The OLMo-core presets a memory model can be built on (``TransformerConfig``'s OLMo2/OLMo3)."""
    from olmo_core.nn.transformer import TransformerConfig

    return [n for n, v in vars(TransformerConfig).items() if isinstance(v, classmethod) and n.startswith(("olmo2_", "olmo3_"))]


def preset_name(name: str) -> str:
    """argparse type of ``--preset``: one of :func:`memory_presets`."""
    valid = memory_presets()
    if name not in valid:
        raise argparse.ArgumentTypeError(f"unknown preset {name!r}; valid: {', '.join(valid)}")
    return name


def _finite(losses: List[float]) -> bool:
    return all(math.isfinite(l) for l in losses)


def build_model(args, memory: bool, device: str):
    from olmo_core.nn.attention import AttentionBackendName
    from olmo_core.nn.transformer import TransformerConfig

    if not memory:
        cfg = getattr(TransformerConfig, args.preset)(vocab_size=args.vocab_size, attn_backend=AttentionBackendName.torch)
        return cfg.build(init_device=device)
    mem = MirasMemoryConfig(
        block_type=args.block_type, every=args.every, offset=args.every - 1, preset=args.memory_preset,
        chunk_size=args.chunk, impl=MemoryImpl(args.impl), check_finite=False,
        depth=args.memory_depth, max_grad_norm=args.memory_max_grad_norm,
        theta_init=getattr(args, "theta_init", None), theta_max=getattr(args, "theta_max", None),
        eta_init=getattr(args, "eta_init", None), eta_max=getattr(args, "eta_max", None),
        backprop_span=getattr(args, "memory_backprop_span", None),
    )
    return miras_from_preset(args.preset, args.vocab_size, memory=mem).build(init_device=device)


def train_steps(model, opt, x: torch.Tensor, steps: int, device: torch.device) -> tuple[List[float], List[float]]:
    """``steps`` next-token training steps on the fixed batch ``x`` (1, T): seconds and loss of each."""
    times, losses = [], []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        logits = model(x)
        loss = F.cross_entropy(logits[0, :-1].float(), x[0, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    return times, losses


def time_train_steps(
    model, seq: int, steps: int, vocab: int, device: torch.device, profile_label: Optional[str] = None,
    profile_top: int = 25,
) -> tuple[float, float, List[float], Optional[dict]]:
    """Median step time over the steps after the first :data:`WARMUP_STEPS`, peak memory in GiB
    (CUDA; else None), every loss; with ``profile_label`` (CUDA) one more step under the profiler,
    its top GPU kernels printed and returned (:func:`~.timing.kernel_summary`; else None)."""
    if steps <= WARMUP_STEPS:
        raise ValueError(f"steps={steps}: needs more than the {WARMUP_STEPS} warm-up steps (the median is over the rest)")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=device.type == "cuda")
    x = torch.randint(0, vocab, (1, seq), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = train_steps(model, opt, x, steps, device)
    warm = times[WARMUP_STEPS:]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    profile = None
    if profile_label is not None and device.type == "cuda" and _finite(losses):
        profile = profile_kernels(lambda: train_steps(model, opt, x, 1, device), profile_label, top=profile_top)
    return statistics.median(warm), peak, losses, profile


def _memory_desc(args) -> str:
    parts = [args.impl]
    if args.memory_depth is not None:
        parts.append("linear" if args.memory_depth == 1 else f"depth {args.memory_depth}")
    if args.memory_max_grad_norm is not None:
        parts.append("no clip" if math.isinf(args.memory_max_grad_norm) else f"clip {args.memory_max_grad_norm:g}")
    if getattr(args, "memory_backprop_span", None) is not None:
        parts.append(f"backprop span {args.memory_backprop_span}")
    return ", ".join(parts)


def single_device(args) -> None:
    device = torch.device(args.device)
    rows: List[Measurement] = []
    for seq in args.seq:
        for memory in (False, True):
            torch.manual_seed(0)
            model = build_model(args, memory, str(device)).to(torch.bfloat16)
            counts = parameter_report(model)
            name = f"{args.preset} + {args.block_type} every {args.every} ({_memory_desc(args)})" if memory else f"{args.preset} base"
            label = f"{name}, T={seq}" if getattr(args, "profile", False) else None
            sec, peak, losses, profile = time_train_steps(
                model, seq, args.steps, args.vocab_size, device, label, getattr(args, "profile_top", 25)
            )
            extra = {"params": counts["total"], "memory_params": counts["memory"], "losses": [round(l, 4) for l in losses]}
            if _finite(losses):
                rows.append(
                    Measurement(name, dict(model=name, seq=seq), sec * 1e3, peak,
                                extra={"tok_per_s": round(seq / sec), **extra}, profile=profile)
                )
            else:
                # A step time is only a result if the steps trained: NaN/Inf take other code paths.
                rows.append(Measurement(name, dict(model=name, seq=seq), None, peak, error="diverged", extra=extra))
            print(format_table(rows[-1:], ["model", "seq"]).splitlines()[-1], flush=True)
            print(f"  losses per step: {[round(l, 3) for l in losses]}", flush=True)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
        base, mem = rows[-2], rows[-1]
        if base.ms and mem.ms:  # neither diverged
            mem.extra["vs_base"] = f"{base.ms / mem.ms:.1%} of base tok/s"
    print(f"\n{device_description(device)}; train step (fwd+bwd+AdamW), bf16 weights, batch 1")
    print(format_table(rows, ["model", "seq"]))
    write_json(args.json, rows, {"device": device_description(device), "date": datetime.date.today().isoformat(), "args": vars(args)})
    diverged = [f"{r.name}, T={r.params['seq']}" for r in rows if r.error == "diverged"]
    if diverged:
        raise SystemExit(
            f"non-finite loss in {diverged}: a diverged run, so no step time is reported for it "
            f"(marked error=diverged in {args.json}; see the losses above)"
        )


def fsdp(args) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = torch.cuda.is_available() and args.device != "cpu"
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    mesh = init_device_mesh(device.type, (world,))
    torch.manual_seed(0)
    model = build_model(args, True, "meta")
    model.apply_fsdp(dp_mesh=mesh, param_dtype=torch.bfloat16 if use_cuda else None, reduce_dtype=torch.float32)
    model.init_weights(max_seq_len=max(args.seq), device=device)
    counts = parameter_report(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    seq = args.seq[0]
    g = torch.Generator().manual_seed(rank)
    x = torch.randint(0, args.vocab_size, (1, seq), generator=g).to(device)
    times, losses = train_steps(model, opt, x, args.steps, device)
    # Diverged on any rank (each trains on its own tokens): then no rank reports a step time.
    bad = torch.tensor([0.0 if _finite(losses) else 1.0], device=device)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    diverged = bool(bad.item())
    sec = None if diverged else statistics.median(times[WARMUP_STEPS:])
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if use_cuda else None
    timing = "diverged (non-finite loss), no step time" if sec is None else f"step {sec*1e3:.0f} ms, {seq/sec:.0f} tok/s/rank"
    line = (f"rank {rank}/{world}: {args.preset} + {args.block_type} every {args.every}, FSDP2, T={seq}, "
            f"params {counts['total']:,} (memory {counts['memory']:,}), {timing}, "
            f"peak {'—' if peak is None else f'{peak:.1f}'} GiB, losses {[round(l, 3) for l in losses]}")
    print(line, flush=True)
    if rank == 0 and args.json:
        write_payload(args.json, {
            "device": device_description(device), "world": world, "seq": seq,
            "step_ms": None if sec is None else sec * 1e3, "tok_per_s_per_rank": None if sec is None else seq / sec,
            "peak_gib": peak, "losses": losses, "error": "diverged" if diverged else None, "params": counts,
            "date": datetime.date.today().isoformat(), "args": vars(args),
        })
    dist.destroy_process_group()
    if diverged:
        raise SystemExit(f"rank {rank}: non-finite loss on some rank: a diverged run, so no step time is reported (see the losses above)")


def add_model_args(p: argparse.ArgumentParser, impl: str) -> None:
    """The flags :func:`build_model` reads (the device, OLMo-core preset and the memory layers),
    shared by the benchmarks that train a whole model; ``impl``: the default memory impl."""
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", type=preset_name, default="olmo2_1B", help="OLMo-core TransformerConfig preset (OLMo2/OLMo3)")
    p.add_argument("--vocab-size", type=int, default=100352)
    p.add_argument("--block-type", default="mal")
    p.add_argument("--every", type=int, default=4)
    p.add_argument("--memory-preset", default="titans")
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--impl", default=impl, choices=[i.value for i in MemoryImpl])
    p.add_argument("--memory-depth", type=int, default=None, help="memory MLP depth (1: linear memory); default: the preset's")
    p.add_argument(
        "--memory-max-grad-norm", type=float, default=None, help="inner-gradient clip (inf: off); default: the preset's"
    )
    p.add_argument("--theta-init", type=float, default=None, help="default: the preset's")
    p.add_argument("--theta-max", type=float, default=None, help="default: the preset's")
    p.add_argument("--eta-init", type=float, default=None, help="default: the preset's (must be below --eta-max)")
    p.add_argument("--eta-max", type=float, default=None, help="cap of the momentum gate (default: the preset's, 1: none)")
    p.add_argument(
        "--memory-backprop-span", type=int, default=None,
        help="cut the memory's backprop every this many tokens inside the sequence (default: no cut)",
    )


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    add_model_args(p, impl="graphed")
    p.add_argument("--seq", type=int_at_least(2, " (next-token loss needs 2 tokens)"), nargs="+", default=[8192])
    p.add_argument(
        "--steps", type=int_at_least(WARMUP_STEPS + 1, f" (the first {WARMUP_STEPS} steps are untimed warm-up)"), default=13,
        help=f"training steps per model; the step time is the median after the first {WARMUP_STEPS} (default: %(default)s)",
    )
    p.add_argument("--profile", action="store_true", help="print the top GPU kernels of one more step per model, and write them to the JSON (CUDA)")
    p.add_argument("--profile-top", type=int_at_least(1), default=25, help="how many kernels --profile prints (default: %(default)s)")
    p.add_argument("--fsdp", action="store_true", help="run under torchrun: FSDP2 over all ranks")
    p.add_argument("--json", default="runs/bench/bench_train.json", help="where the JSON goes (default: %(default)s)")
    args = p.parse_args(argv)
    if args.fsdp and len(args.seq) > 1:
        p.error(f"--fsdp times one sequence length; got --seq {' '.join(map(str, args.seq))} (run once per length)")
    if args.fsdp and args.profile:
        p.error("--profile is for the single-device run; --fsdp does not profile")
    fsdp(args) if args.fsdp else single_device(args)
