"""Does the memory actually remember? Train a window-only model and its memory twin on MQAR, then
measure recall by query distance and by number of pairs.

The experiment
--------------
Task: raw-token MQAR (``tasks.py``, Zoology-style): ``[noise][k1 v1 … kn vn][gap: noise][k v …]``.
Keys, values and noise come from disjoint id ranges; each query key must be answered with the
value it was paired with, ``gap`` noise tokens earlier. The loss is on the answers only.

Models (identical except for the memory): OLMo3-style blocks where *every* layer is sliding-window
attention (window 64; unlike ``tiny_miras``, no full-attention layer, so nothing but the memory
can see past the window):

* ``window`` — attention only. Its receptive field is ``n_layers × (window − 1)`` tokens (each
  layer can relay information one window further); beyond that it can only guess: chance is
  ``1 / n_values``.
* ``mag:titans`` (and/or ``mal:titans``, other presets) — the same with a Titans/MIRAS memory
  block. The memory is written by gradient steps at test time, so a pair seen 2,000 tokens ago is
  as close as one seen 100 tokens ago if the model learns to write pairs and skip noise.

Why this setup can learn long-distance recall in minutes (see ``docs/results.md``):

* *One binding step, all local.* At a value token the short causal conv of the memory's k/v
  projections sees the key token right before it, so a single memory write can bind
  ``key → value``; at the query key the read returns the value. No multi-hop attention circuit
  has to form first (that is what makes MQAR slow for attention models).
* *Gates make distance free.* θ (write rate) and α (forget) are per-token functions of the input,
  and noise ids are a distinct range, so "don't write / don't forget on noise" is a linear
  readout. ``alpha_init=1e-3`` (Titans' default 1e-2 would leave e^-20 of a write after 2,000
  tokens) starts the memory long-lived, so long-gap examples give gradient signal from step 0.
* *Adaptive curriculum.* Level 0 is one pair with short gaps: the model only has to learn to
  write, keep and read one value (on CPU this leaves the 1/96 plateau after ~200 steps). The
  level rises by ``curriculum_level_step`` whenever the training answer accuracy reaches
  ``curriculum_threshold``; level 1 is ``train_pairs`` pairs and gaps up to the whole sequence.
  A floor ``(progress / curriculum_frac)²`` guarantees the full task late in the run. Adaptive,
  because the step count the GPU delivers is not known in advance (fused vs eager memory path).
* *No shortcut.* Training gaps start beyond attention's receptive field, so every training
  example needs the memory (and the control can only learn the value prior).
* *Dense supervision.* Every pair is queried; 64 sequences per step.
* The LR schedule (warmup + cosine) and the curriculum floor follow *progress* = max(step /
  steps, elapsed / time allowance), the clock starting after the first step (which includes
  compilation), so a run cut by the time budget still anneals.

Outputs (``output_dir``): ``results.json`` (config, per-model training log and eval cells; written
after every model, so an interrupted run keeps what finished), ``recall_vs_distance.png``,
``recall_vs_pairs.png``, ``<model>/config.json`` + ``model.pt`` (evaluable with
``scripts/evaluate.py``), and the table on stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from olmo_core.config import Config
from olmo_core.nn.attention import SlidingWindowAttentionConfig
from olmo_core.nn.transformer import TransformerConfig

from ..memory import MemoryImpl
from ..memory import PRESETS
from ..models import REVISION_1_STEP, MirasMemoryConfig, set_memory_impl, tiny_miras
from ..atomic_files import write_text_atomic
from .harness import evaluate_examples, resolve_device
from .scoring import CellScore, EvalResults, format_table
from .tasks import IGNORE_INDEX, EvalExample, MQARTokenSpec, mqar_token_examples

__all__ = [
    "RecallExperimentConfig",
    "Variant",
    "build_model_config",
    "main",
    "mqar_batch",
    "parse_variants",
    "run_experiment",
    "save_model",
]

log = logging.getLogger(__name__)

WINDOW_ONLY = "window"

# θ_init, θ_max per preset for this task: revision 1 of the presets (``preset_revision=1``), their
# values when docs/results.md was measured. Recall needs one-shot writes on short sequences (2k
# tokens, chunk 16, linear memory by default), where these larger steps were stable; the presets
# now start 5–100× lower for long backprop spans through OLMo hidden states (docs/memory.md,
# "Inner step size and backprop span").
RECALL_STEP: Dict[str, Tuple[float, float]] = REVISION_1_STEP


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@dataclass
class Variant(Config):
    """One model of the comparison: attention only (``block_type=None``) or with a memory block."""

    name: str
    block_type: Optional[str] = None
    """``mal``, ``mag``, ``mac``, ``lm2``; ``None``: the window-only control."""
    preset: str = "titans"


def parse_variants(spec: str) -> List[Variant]:
    """``"window,mag:titans,mal:yaad"`` -> variants (``block`` alone means the titans preset)."""
    out: List[Variant] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item == WINDOW_ONLY:
            out.append(Variant(name=WINDOW_ONLY))
            continue
        block, _, preset = item.partition(":")
        preset = preset or "titans"
        if block not in ("mal", "mag", "mac", "lm2"):
            raise ValueError(f"unknown variant {item!r}: use 'window' or '<mal|mag|mac|lm2>[:<preset>]'")
        if preset not in PRESETS:
            raise ValueError(f"unknown memory preset {preset!r} in {item!r}; valid: {', '.join(PRESETS)}")
        out.append(Variant(name=f"{block}:{preset}" if block != "lm2" else "lm2", block_type=block, preset=preset))
    if not out:
        raise ValueError(f"no variants in {spec!r}")
    names = [v.name for v in out]
    if len(set(names)) != len(names):
        raise ValueError(f"variants listed twice in {spec!r}")
    return out


@dataclass
class RecallExperimentConfig(Config):
    """Everything the experiment does; the CLI flags map one-to-one onto these fields."""

    output_dir: str = "runs/recall"
    device: str = "auto"
    variants: List[Variant] = field(
        default_factory=lambda: [Variant(name=WINDOW_ONLY), Variant(name="mag:titans", block_type="mag")]
    )
    seed: int = 0

    # model (shared by all variants)
    d_model: int = 256
    n_layers: int = 1
    """One layer: on CPU, two-layer twins stayed on the 1/96 plateau 2x longer than one-layer ones
    (the memory does the binding itself; a second layer only lengthens the path to the head)."""
    n_heads: int = 4
    window: int = 64
    memory_layers: List[int] = field(default_factory=lambda: [0])
    memory_chunk_size: int = 16
    """Tokens per memory update. Writes inside a chunk are taken at the same weights (no
    delta-rule correction between them), so pairs sharing a chunk interfere: on CPU, chunk 8/16
    learned 12-pair recall far faster per step than 16/32."""
    memory_impl: str = "auto"
    """``auto``: ``graphed`` on CUDA (falls back to ``chunked`` if it fails), ``chunked`` on CPU."""
    memory_heads: Optional[int] = None
    memory_depth: Optional[int] = 1
    """Memory network depth: 1 = linear memory (a ``head_dim × head_dim`` matrix per head, written
    by the titans rule: ℓ2 objective, momentum, decay); ``None`` keeps the preset's MLP (titans: 2).
    On CPU the linear memory reached 0.92 training recall on 1-12 pairs in 1,000 steps where the
    depth-2 MLP was at 0.62 (same chunk 16), and it costs about half as much per step."""
    alpha_init: Optional[float] = 1e-3
    """Initial forget rate per token (``None``: the preset's; titans 1e-2)."""
    theta_init: Optional[float] = None
    """Initial memory learning rate θ (``None``: :data:`RECALL_STEP`'s for the variant's preset)."""
    theta_max: Optional[float] = None
    """Cap of θ (``None``: :data:`RECALL_STEP`'s for the variant's preset)."""
    eta_init: Optional[float] = None
    """Initial momentum η (``None``: the preset's; titans 0.9)."""

    # data
    spec: MQARTokenSpec = field(default_factory=MQARTokenSpec)
    seq_len: int = 2048
    train_pairs: Tuple[int, int] = (4, 32)
    gap_min: Optional[int] = None
    """Smallest training gap (``None``: the attention's receptive field + 1, so no training
    example can be solved without the memory)."""
    curriculum_start_gap: int = 256
    """At curriculum level 0 gaps are at most this long; at level 1 as long as a sequence allows."""
    curriculum_start_pairs: int = 1
    """At level 0 at most this many pairs (1: learn to write, keep and read a value before having
    to tell keys apart); at level 1 ``train_pairs``."""
    curriculum_threshold: float = 0.85
    """Adaptive curriculum: raise the level by ``curriculum_level_step`` whenever the training
    answer accuracy over the last ``curriculum_check_every`` steps reaches this."""
    curriculum_level_step: float = 0.1
    curriculum_check_every: int = 20
    curriculum_frac: float = 0.6
    """Floor of the level: ``(progress / curriculum_frac)²``, so the full task is reached by this
    fraction of the run even if the accuracy threshold is not (``1``: no floor until the end)."""

    # optimisation
    steps: int = 20000
    """Upper bound; on a GPU the time budget is what ends training."""
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    grad_clip: float = 1.0
    time_budget_s: float = 420.0
    """Wall clock for the whole run (all models, their evals, writing outputs)."""
    eval_reserve_s: float = 25.0
    """Of the budget, kept per model for its evaluation."""
    control_budget_s: float = 45.0
    """Of the budget, kept for each window-only control (trained after the memory models, for as
    many steps as they got; it is several times faster per step)."""
    log_every: int = 100
    autocast: bool = True
    """bf16 autocast on CUDA (memory state stays float32)."""

    # evaluation
    eval_distances: Tuple[int, ...] = (128, 256, 512, 1024, 2048)
    eval_pairs: int = 16
    """Pairs per example for the distance sweep."""
    eval_pairs_sweep: Tuple[int, ...] = (4, 8, 16, 32, 64)
    eval_pairs_distance: int = 1024
    """Query distance for the pairs sweep."""
    eval_n_per_cell: int = 32
    eval_batch_size: int = 32
    eval_length: Optional[int] = None
    """Length of every eval sequence (``None``: the smallest multiple of 256 that fits the grid)."""
    eval_segment_len: Optional[int] = None
    """Stream eval sequences in pieces (memory state carried); ``None``: whole sequences."""

    @classmethod
    def quick(cls, **kwargs: Any) -> "RecallExperimentConfig":
        """CPU smoke preset (< 1 minute): tiny model, short sequences, a handful of steps."""
        base: Dict[str, Any] = dict(
            device="cpu",
            d_model=32,
            n_layers=1,
            n_heads=2,
            window=16,
            memory_chunk_size=16,
            seq_len=128,
            train_pairs=(2, 4),
            curriculum_start_gap=32,
            spec=MQARTokenSpec(),
            steps=6,
            batch_size=4,
            lr=3e-3,
            warmup_steps=2,
            time_budget_s=50.0,
            eval_reserve_s=5.0,
            control_budget_s=8.0,
            log_every=2,
            eval_distances=(16, 64),
            eval_pairs=4,
            eval_pairs_sweep=(2, 4),
            eval_pairs_distance=32,
            eval_n_per_cell=2,
            eval_batch_size=8,
        )
        base.update(kwargs)
        return cls(**base)

    # ------------------------------------------------------------------ derived
    def receptive_field(self) -> int:
        """How far back attention alone can carry information: ``n_layers × (window − 1)``."""
        return self.n_layers * (self.window - 1)

    def resolved_gap_min(self) -> int:
        return self.receptive_field() + 1 if self.gap_min is None else self.gap_min

    def resolved_eval_length(self) -> int:
        if self.eval_length is not None:
            return self.eval_length
        need = max(
            [d + 4 * self.eval_pairs for d in self.eval_distances]
            + [self.eval_pairs_distance + 4 * n for n in self.eval_pairs_sweep]
        )
        return int(math.ceil((need + 1) / 256) * 256) if need > 256 else need + 1

    def validate(self) -> None:
        self.spec.validate()
        if not self.variants:
            raise ValueError("no variants to train")
        lo, hi = self.train_pairs
        if not 1 <= lo <= hi:
            raise ValueError(f"train_pairs={self.train_pairs} must satisfy 1 <= lo <= hi")
        if hi > self.spec.n_keys:
            raise ValueError(f"train_pairs max {hi} exceeds the {self.spec.n_keys} keys of the spec")
        if max(self.eval_pairs_sweep + (self.eval_pairs,)) > self.spec.n_keys:
            raise ValueError(f"eval pairs exceed the {self.spec.n_keys} keys of the spec")
        if self.seq_len < 4 * hi + self.resolved_gap_min() + 1:
            raise ValueError(
                f"seq_len={self.seq_len} can't hold {hi} pairs, their queries and a gap of "
                f"{self.resolved_gap_min()} (need >= {4 * hi + self.resolved_gap_min() + 1})"
            )
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        for name in ("steps", "batch_size", "log_every", "eval_n_per_cell", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.eval_segment_len is not None and self.eval_segment_len < 1:
            raise ValueError(f"eval_segment_len={self.eval_segment_len} must be >= 1 (or None: whole sequences)")
        try:
            resolve_device(self.device)  # found before training, not after
        except RuntimeError as e:
            raise ValueError(f"device={self.device!r}: {e}") from None
        if not 0 < self.curriculum_frac <= 1:
            raise ValueError(f"curriculum_frac={self.curriculum_frac} must be in (0, 1]")
        if not 0 < self.curriculum_level_step <= 1 or self.curriculum_check_every < 1:
            raise ValueError("curriculum_level_step must be in (0, 1] and curriculum_check_every >= 1")
        if self.time_budget_s <= 0:
            raise ValueError(f"time_budget_s={self.time_budget_s} must be > 0")
        for m in self.memory_layers:
            if not 0 <= m < self.n_layers:
                raise ValueError(f"memory layer {m} out of range for n_layers={self.n_layers}")
        if self.memory_impl != "auto":
            MemoryImpl(self.memory_impl)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def _all_windowed(base: TransformerConfig, window: int) -> None:
    """Every layer sliding-window (no full-attention first/last layer), in place."""
    mixer = base.block.sequence_mixer  # type: ignore[union-attr]
    mixer.sliding_window = SlidingWindowAttentionConfig(
        pattern=[window], force_full_attention_on_first_layer=False, force_full_attention_on_last_layer=False
    )


def build_model_config(cfg: RecallExperimentConfig, variant: Variant, impl: Optional[str] = None) -> Any:
    """The OLMo-core model config of one variant: a plain ``TransformerConfig`` for the window-only
    control, a ``MirasModelConfig`` otherwise (same base, same init seed -> same base weights)."""
    memory = MirasMemoryConfig(
        block_type=variant.block_type or "mag",  # type: ignore[arg-type]
        layers=list(cfg.memory_layers),
        preset=variant.preset,
        chunk_size=cfg.memory_chunk_size,
        n_heads=cfg.memory_heads,
        depth=cfg.memory_depth,
        preset_revision=1,  # RECALL_STEP's θ unless set here
        theta_init=cfg.theta_init,
        theta_max=cfg.theta_max,
        eta_init=cfg.eta_init,
        alpha_init=cfg.alpha_init,
        check_finite=False,
        impl=None if impl is None else MemoryImpl(impl),
    )
    mc = tiny_miras(
        vocab_size=cfg.spec.vocab_size,
        d_model=cfg.d_model,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        window=cfg.window,
        memory=memory,
    )
    _all_windowed(mc.base, cfg.window)
    mc.base.init_seed = cfg.seed
    if variant.block_type is None:
        return mc.base
    return mc


def build_model(cfg: RecallExperimentConfig, variant: Variant, device: torch.device, impl: Optional[str]) -> Tuple[nn.Module, Any]:
    """The initialised model of ``variant`` on ``device`` (OLMo-core ``init_weights``: the memory
    output starts at zero) and its config."""
    mc = build_model_config(cfg, variant, impl)
    model = mc.build(init_device="cpu")
    model.init_weights(max_seq_len=max(cfg.seq_len, cfg.resolved_eval_length()), device=device)
    return model.to(device), mc


def save_model(model: nn.Module, model_config: Any, directory: Path, extra: Optional[Dict[str, Any]] = None) -> Path:
    """``directory/config.json`` (``{"model": <OLMo-core config dict>, ...extra}``) and
    ``directory/model.pt`` (the state dict): the "saved model" format ``scripts/evaluate.py`` reads."""
    directory.mkdir(parents=True, exist_ok=True)
    payload = {"model": model_config.as_config_dict(), **(extra or {})}
    (directory / "config.json").write_text(json.dumps(payload, indent=1, default=str))
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, directory / "model.pt")
    return directory


# ---------------------------------------------------------------------------------------------
# Data: batched raw-token MQAR, vectorised
# ---------------------------------------------------------------------------------------------


def mqar_batch(
    batch_size: int,
    seq_len: int,
    n_pairs: torch.Tensor,
    gaps: torch.Tensor,
    spec: MQARTokenSpec,
    generator: torch.Generator,
    device: torch.device,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)`` of ``batch_size`` raw-token MQAR sequences, laid out exactly like
    :func:`~.tasks.mqar_token_examples` (``[noise][k v]*n[gap noise][k v]*n``, every pair queried
    in random order), with per-row ``n_pairs`` / ``gaps``. ``labels`` are shifted (OLMo-core
    convention): ``labels[t]`` is the value to predict after query key ``t``, ``-100`` elsewhere.

    Vectorised tensor ops on the CPU and one copy to ``device`` (building 64 × 2k tokens in
    Python, as the per-example generators do, would cost more than a training step).
    """
    b, t = batch_size, seq_len
    n_max = int(n_pairs.max())
    g = generator
    cpu = torch.device("cpu")
    n_keys, n_vals = spec.n_keys, spec.n_values
    noise = torch.randint(spec.noise_range[0], spec.noise_range[1], (b, t + 1), generator=g, device=cpu)
    keys = torch.rand(b, n_keys, generator=g, device=cpu).argsort(dim=1)[:, :n_max] + spec.key_range[0]
    values = torch.randint(0, n_vals, (b, n_max), generator=g, device=cpu) + spec.value_range[0]
    j = torch.arange(n_max)
    live = j[None, :] < n_pairs[:, None]  # (b, n_max)
    # query order: a random permutation of the live pairs
    order = torch.rand(b, n_max, generator=g, device=cpu).masked_fill(~live, 2.0).argsort(dim=1)
    q_start = t - 2 * n_pairs  # (b,)
    p_start = q_start - gaps - 2 * n_pairs
    if bool((p_start < 0).any()):
        raise ValueError("a row's pairs, gap and queries don't fit seq_len")
    dump = torch.full_like(keys, t)  # dead slots write to the extra column t
    pk = torch.where(live, p_start[:, None] + 2 * j[None, :], dump)
    qk = torch.where(live, q_start[:, None] + 2 * j[None, :], dump)
    ids = noise
    ids.scatter_(1, pk, keys)
    ids.scatter_(1, torch.where(live, pk + 1, dump), values)
    q_keys = keys.gather(1, order)
    q_vals = values.gather(1, order)
    ids.scatter_(1, qk, q_keys)
    ids.scatter_(1, torch.where(live, qk + 1, dump), q_vals)
    labels = torch.full((b, t + 1), IGNORE_INDEX, dtype=torch.long)
    labels.scatter_(1, qk, q_vals)
    return ids[:, :t].to(device, non_blocking=True), labels[:, :t].to(device, non_blocking=True)


def _gap_cap(cfg: RecallExperimentConfig, level: float) -> int:
    """The largest training gap at curriculum ``level`` (0 -> 1)."""
    start = min(cfg.curriculum_start_gap, cfg.seq_len)
    return int(start + min(1.0, level) * (cfg.seq_len - start))


def _pairs_range(cfg: RecallExperimentConfig, level: float) -> Tuple[int, int]:
    """Pairs per sequence at curriculum ``level``: from ``[1, start]`` to ``train_pairs``."""
    lo, hi = cfg.train_pairs
    start = min(cfg.curriculum_start_pairs, hi)
    t = min(1.0, level)
    cur_hi = int(round(start + t * (hi - start)))
    cur_lo = int(round(min(1, lo) + t * (lo - min(1, lo))))
    return min(cur_lo, cur_hi), cur_hi


def _level_floor(cfg: RecallExperimentConfig, progress: float) -> float:
    return min(1.0, progress / cfg.curriculum_frac) ** 2


def _draw_batch(
    cfg: RecallExperimentConfig, level: float, generator: torch.Generator, device: torch.device
) -> Tuple[torch.Tensor, torch.Tensor]:
    """A training batch at curriculum ``level``: pairs and gaps uniform up to the level's caps."""
    lo, hi = _pairs_range(cfg, level)
    b = cfg.batch_size
    n = torch.randint(lo, hi + 1, (b,), generator=generator)
    gap_lo = cfg.resolved_gap_min()
    room = cfg.seq_len - 4 * n  # the largest gap each row can hold
    cap = _gap_cap(cfg, level)
    hi_gap = torch.clamp(torch.minimum(room, torch.full_like(room, cap)), min=gap_lo)
    u = torch.rand(b, generator=generator)
    gaps = (gap_lo + u * (hi_gap - gap_lo + 1).float()).long().clamp(max=hi_gap)
    return mqar_batch(b, cfg.seq_len, n, gaps, cfg.spec, generator, device)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


class _Stop:
    """SIGINT/SIGTERM -> finish the current step, skip to evaluation and writing results."""

    def __init__(self) -> None:
        self.requested = False
        self._old: Dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some test runners)
                pass

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        if self.requested:  # second signal: give up
            self.restore()
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n[recall] signal {signum}: stopping training, evaluating and saving what we have", flush=True)

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


def _param_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """Decay matrices only: embeddings, norms, biases, gate biases and the memory's initial
    weights are left alone (decaying the initial memory towards 0 would fight the write rule)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "embeddings" in name or "memory_init" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _lr_factor(progress: float, step: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _answer_acc(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction of answer positions whose argmax is right (a device tensor: no host sync)."""
    mask = labels != IGNORE_INDEX
    hit = (logits.argmax(-1) == labels) & mask
    return hit.sum().float() / mask.sum().clamp(min=1).float()


_FALLBACK = {"graphed": "compiled", "compiled": "chunked"}
"""If a fused memory path fails (compiler missing, capture error), train on with the next one."""


def train_variant(
    cfg: RecallExperimentConfig,
    variant: Variant,
    device: torch.device,
    deadline: float,
    stop: _Stop,
    printer: Any = print,
    steps: Optional[int] = None,
) -> Tuple[nn.Module, Any, Dict[str, Any]]:
    """Train one model for ``steps`` (default ``cfg.steps``) or until the wall-clock ``deadline``;
    returns the model, its config and the training log."""
    max_steps = cfg.steps if steps is None else max(1, int(steps))
    impl: Optional[str] = None
    if variant.block_type is not None:
        impl = cfg.memory_impl if cfg.memory_impl != "auto" else ("graphed" if device.type == "cuda" else "chunked")
    torch.manual_seed(cfg.seed)
    model, mc = build_model(cfg, variant, device, impl)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    use_ac = cfg.autocast and device.type == "cuda"
    t0 = time.monotonic()
    t1: Optional[float] = None  # end of the first step
    allowance = max(1.0, deadline - t0)
    history: List[Dict[str, Any]] = []
    # running sums stay on the device: one host sync per log interval, not per step
    run_loss = torch.zeros((), device=device)
    run_acc = torch.zeros((), device=device)
    run_n = 0
    step = 0
    level = 0.0
    cur_acc = torch.zeros((), device=device)
    cur_n = 0
    stopped_by = "steps"
    fallback_note: Optional[str] = None
    printer(
        f"[recall] training {variant.name}: {n_params:,d} params, memory impl {impl or '-'}, "
        f"{max_steps} steps max, {allowance:.0f}s allowed"
    )
    while step < max_steps:
        now = time.monotonic()
        if now >= deadline:
            stopped_by = "time budget"
            break
        if stop.requested:
            stopped_by = "signal"
            break
        # the clock starts after the first step: compilation / CUDA-graph capture (up to a minute
        # or two) must not eat into the LR schedule or push the curriculum past its easy start
        progress = max(step / max_steps, 0.0 if t1 is None else (now - t1) / max(1.0, deadline - t1))
        lr = cfg.lr * _lr_factor(progress, step, cfg.warmup_steps)
        for group in opt.param_groups:
            group["lr"] = lr
        level = max(level, _level_floor(cfg, progress))
        ids, labels = _draw_batch(cfg, level, gen, device)
        try:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_ac):
                logits = model(ids)
            loss = torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
        except Exception as e:  # noqa: BLE001 - fused memory paths: graphed -> compiled -> chunked
            if impl in _FALLBACK:
                note = f"memory impl {impl} failed at step {step} ({type(e).__name__}: {str(e)[:300]}); using {_FALLBACK[impl]}"
                fallback_note = note if fallback_note is None else f"{fallback_note}; {note}"
                printer(f"[recall] WARNING: {note}")
                impl = _FALLBACK[impl]
                set_memory_impl(model, impl)
                opt.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            raise
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        if t1 is None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t1 = time.monotonic()
            printer(f"[recall] {variant.name}: first step (incl. compilation) took {t1 - t0:.1f}s")
        with torch.no_grad():
            acc = _answer_acc(logits.detach(), labels)
            run_loss += loss.detach()
            run_acc += acc
            cur_acc += acc
        run_n += 1
        cur_n += 1
        if cur_n >= cfg.curriculum_check_every:
            # adaptive curriculum: harder once the current mix is mostly solved (one sync)
            if float(cur_acc) / cur_n >= cfg.curriculum_threshold and level < 1.0:
                level = min(1.0, level + cfg.curriculum_level_step)
            cur_acc.zero_()
            cur_n = 0
        if step % cfg.log_every == 0 or step == 1:
            elapsed = time.monotonic() - t0
            rec = {
                "step": step,
                "elapsed_s": round(elapsed, 2),
                "loss": float(run_loss) / run_n,
                "answer_acc": float(run_acc) / run_n,
                "lr": lr,
                "level": round(level, 3),
                "max_gap": _gap_cap(cfg, level),
                "pairs": list(_pairs_range(cfg, level)),
                "progress": round(progress, 4),
            }
            history.append(rec)
            printer(
                f"[recall] {variant.name} step {step:>5d}  {elapsed:7.1f}s  loss {rec['loss']:.4f}  "
                f"answer acc {rec['answer_acc']:.3f}  lr {lr:.2e}  level {level:.2f} (gap <= {rec['max_gap']}, "
                f"pairs {rec['pairs'][0]}-{rec['pairs'][1]})"
            )
            run_loss.zero_()
            run_acc.zero_()
            run_n = 0
    elapsed = time.monotonic() - t0
    info = {
        "steps": step,
        "seconds": round(elapsed, 2),
        "stopped_by": stopped_by,
        "steps_per_s": round(step / max(elapsed, 1e-9), 3),
        "n_params": n_params,
        "memory_impl": impl,
        "final_level": round(level, 3),
        "history": history,
    }
    if fallback_note:
        info["note"] = fallback_note
    printer(f"[recall] {variant.name}: {step} steps in {elapsed:.1f}s (stopped by {stopped_by})")
    if impl in ("graphed", "compiled", "triton_graphed"):
        # eval runs without gradients: eager chunked (no graph captures or recompiles for the
        # eval batches' new shapes), and the Triton forward kernels where they apply
        set_memory_impl(model, "chunked")
        set_memory_impl(model, "auto", device)
    model.eval()
    return model, mc, info


# ---------------------------------------------------------------------------------------------
# Evaluation and reporting
# ---------------------------------------------------------------------------------------------


def eval_examples(cfg: RecallExperimentConfig) -> List[EvalExample]:
    """The distance sweep (``eval_pairs`` pairs) and the pairs sweep (at ``eval_pairs_distance``),
    all at one length, so the only thing that changes along each axis is the axis."""
    length = cfg.resolved_eval_length()
    seed = cfg.seed + 12345  # disjoint from anything the training stream could draw
    ex = mqar_token_examples(
        (length,), cfg.eval_pairs, cfg.eval_distances, cfg.eval_n_per_cell, seed, spec=cfg.spec
    )
    seen = {(e.n_pairs, e.distance) for e in ex}
    pairs = [n for n in cfg.eval_pairs_sweep if (n, cfg.eval_pairs_distance) not in seen]
    if pairs:
        ex += mqar_token_examples(
            (length,), pairs, (cfg.eval_pairs_distance,), cfg.eval_n_per_cell, seed, spec=cfg.spec
        )
    return ex


def _cells(res: EvalResults) -> List[Dict[str, Any]]:
    return [dataclasses.asdict(c) for c in res.cells]


def recall_table(models: Dict[str, Dict[str, Any]], cfg: RecallExperimentConfig) -> str:
    """Per-query recall by distance and by pairs, one column per model."""
    names = list(models)
    lines: List[str] = []

    def row(label: str, vals: List[Optional[float]]) -> str:
        return f"{label:>22}  " + "  ".join(f"{'-' if v is None else f'{v:.3f}':>12}" for v in vals)

    def lookup(name: str, n_pairs: int, distance: int) -> Optional[float]:
        for c in models[name].get("cells", []):
            if c["n_pairs"] == n_pairs and c["distance"] == distance:
                return c["query_accuracy"]
        return None

    header = f"{'':>22}  " + "  ".join(f"{n[:12]:>12}" for n in names)
    lines.append(f"per-query recall, {cfg.eval_pairs} pairs, by distance (receptive field of attention: "
                 f"{cfg.receptive_field()} tokens; chance {1 / cfg.spec.n_values:.3f})")
    lines.append(header)
    for d in cfg.eval_distances:
        lines.append(row(f"distance {d}", [lookup(n, cfg.eval_pairs, d) for n in names]))
    lines.append("")
    lines.append(f"per-query recall at distance {cfg.eval_pairs_distance}, by number of pairs")
    lines.append(header)
    for p in cfg.eval_pairs_sweep:
        lines.append(row(f"{p} pairs", [lookup(n, p, cfg.eval_pairs_distance) for n in names]))
    lines.append("")
    steps = [models[n].get("train", {}).get("steps") for n in names]
    lines.append(f"{'train steps':>22}  " + "  ".join(f"{'-' if v is None else v:>12}" for v in steps))
    secs = [models[n].get("train", {}).get("seconds") for n in names]
    lines.append(f"{'train seconds':>22}  " + "  ".join(f"{'-' if v is None else round(v):>12}" for v in secs))
    return "\n".join(lines)


def _plots(results: Dict[str, Any], cfg: RecallExperimentConfig, out: Path) -> List[str]:
    from .plot import plot_accuracy

    models = {n: m["cells"] for n, m in results["models"].items() if m.get("cells")}
    if not models:
        return []
    chance = {"mqar_tokens": 1.0 / cfg.spec.n_values}
    vl = {f"attention reach {cfg.receptive_field()}": float(cfg.receptive_field())}
    paths = [
        plot_accuracy(
            models, out / "recall_vs_distance.png", x="distance", metric="query_accuracy",
            where={"n_pairs": cfg.eval_pairs}, chance=chance, vlines=vl,
            title=f"MQAR recall vs query distance ({cfg.eval_pairs} pairs, window {cfg.window})",
        ),
        plot_accuracy(
            models, out / "recall_vs_pairs.png", x="n_pairs", metric="query_accuracy",
            where={"distance": cfg.eval_pairs_distance}, chance=chance,
            title=f"MQAR recall vs pairs (distance {cfg.eval_pairs_distance})",
        ),
    ]
    return [str(p) for p in paths]


def _write_json(path: Path, payload: Dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(payload, indent=1, default=str))


def run_experiment(cfg: RecallExperimentConfig, printer: Any = print) -> Dict[str, Any]:
    """Train and evaluate every variant; returns (and writes) the results dict."""
    cfg.validate()
    t_start = time.monotonic()
    deadline_all = t_start + cfg.time_budget_s
    device = resolve_device(cfg.device)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    examples = eval_examples(cfg)
    results: Dict[str, Any] = {
        "status": "running",
        "config": cfg.as_config_dict(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "eval_length": cfg.resolved_eval_length(),
        "receptive_field": cfg.receptive_field(),
        "chance": 1.0 / cfg.spec.n_values,
        "models": {},
    }
    printer(
        f"[recall] device {results['device']}; {len(cfg.variants)} models; budget {cfg.time_budget_s:.0f}s; "
        f"train seq {cfg.seq_len}, eval length {results['eval_length']} ({len(examples)} sequences per model)"
    )
    stop = _Stop()
    stop.install()
    # Memory models first (they are what the time budget is for); the window-only control then
    # trains for as many steps as the memory models got, which takes it far less time.
    memory = [v for v in cfg.variants if v.block_type is not None]
    controls = [v for v in cfg.variants if v.block_type is None]
    for v in cfg.variants:  # table/JSON order = the order given
        results["models"][v.name] = {"variant": v.as_config_dict()}
    trained_steps: List[int] = []
    try:
        for k, variant in enumerate(memory + controls):
            if stop.requested:
                results["models"][variant.name]["error"] = "not trained: interrupted"
                continue
            now = time.monotonic()
            left = len(memory) + len(controls) - k
            steps = cfg.steps
            if variant.block_type is not None:
                n_mem_left = len(memory) - k
                reserve = cfg.control_budget_s * len(controls) + cfg.eval_reserve_s * left
                deadline = now + max((deadline_all - now - reserve) / n_mem_left, 1.0)
            else:
                if trained_steps:
                    steps = max(trained_steps)
                deadline = now + max((deadline_all - now - cfg.eval_reserve_s * left) / (len(controls) - (k - len(memory))), 1.0)
            entry = results["models"][variant.name]
            try:
                model, mc, info = train_variant(cfg, variant, device, deadline, stop, printer, steps=steps)
            except Exception as e:  # noqa: BLE001 - record the failure, keep the other models
                entry["error"] = f"{type(e).__name__}: {e}"
                printer(f"[recall] {variant.name} FAILED: {entry['error']}")
                _write_json(out / "results.json", results)
                continue
            if variant.block_type is not None:
                trained_steps.append(int(info["steps"]))
            entry["train"] = info
            # Saved before the evaluation, so a failing evaluation never loses a trained model.
            save_model(model, mc, out / variant.name.replace(":", "_"), {"recall_experiment": cfg.as_config_dict()})
            t_eval = time.monotonic()
            res = evaluate_examples(
                model, examples, batch_size=cfg.eval_batch_size, segment_len=cfg.eval_segment_len,
                autocast=False,
            )
            entry["eval_seconds"] = round(time.monotonic() - t_eval, 2)
            entry["cells"] = _cells(res)
            entry["summary"] = {"accuracy": res.accuracy(), "query_accuracy": _mean_query_acc(res.cells)}
            printer(f"[recall] {variant.name} evaluated in {entry['eval_seconds']:.1f}s\n{format_table(res)}")
            _write_json(out / "results.json", results)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    except BaseException as e:  # recorded, so results.json never says "done" after a crash
        results["error"] = f"{type(e).__name__}: {e}"
        results["status"] = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        raise
    finally:
        stop.restore()
        if results["status"] == "running":
            results["status"] = "interrupted" if stop.requested else "done"
        results["seconds"] = round(time.monotonic() - t_start, 2)
        try:
            results["plots"] = _plots(results, cfg, out)
        except Exception as e:  # noqa: BLE001 - a plotting problem must not lose the numbers
            results["plot_error"] = f"{type(e).__name__}: {e}"
        _write_json(out / "results.json", results)
    table = recall_table(results["models"], cfg)
    (out / "table.txt").write_text(table + "\n")
    printer("\n" + table)
    printer(f"\n[recall] {results['status']} in {results['seconds']:.0f}s; results in {out}/")
    return results


def _mean_query_acc(cells: Sequence[CellScore]) -> float:
    n = sum(c.n_examples for c in cells)
    return sum(c.query_accuracy * c.n_examples for c in cells) / max(n, 1)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    d = RecallExperimentConfig()
    p = argparse.ArgumentParser(
        prog="recall_experiment.py",
        description="Train a window-only model and its MIRAS-memory twin on MQAR; measure recall by "
        "query distance and number of pairs. Defaults: sized for one H100 in <= 8 minutes.",
    )
    p.add_argument("--quick", action="store_true", help="CPU smoke preset (< 1 minute); other flags still apply")
    p.add_argument("--output-dir", default=d.output_dir)
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--variants", default="window,mag:titans",
                   help="comma list: window, <mal|mag|mac|lm2>[:<titans|moneta|yaad|memora>]")
    p.add_argument("--seed", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--time-budget-s", type=float, help="wall clock for the whole run (all models)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--log-every", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--train-pairs", type=int, nargs=2, metavar=("LO", "HI"), help="pairs per training sequence at full curriculum level")
    p.add_argument("--curriculum-start-gap", type=int)
    p.add_argument("--curriculum-start-pairs", type=int)
    p.add_argument("--curriculum-frac", type=float, help="the curriculum is complete by this fraction of the run")
    p.add_argument("--curriculum-threshold", type=float, help="training answer accuracy that raises the level")
    p.add_argument("--d-model", type=int)
    p.add_argument("--layers", type=int, dest="n_layers")
    p.add_argument("--heads", type=int, dest="n_heads")
    p.add_argument("--window", type=int)
    p.add_argument("--memory-layers", type=int, nargs="+")
    p.add_argument("--memory-chunk-size", type=int)
    p.add_argument("--memory-impl", choices=["auto"] + [i.value for i in MemoryImpl])
    p.add_argument("--memory-heads", type=int)
    p.add_argument("--memory-depth", type=int)
    p.add_argument("--alpha-init", type=float, help="initial forget rate (titans preset: 0.01)")
    p.add_argument("--theta-init", type=float, help="initial memory learning rate (default: RECALL_STEP's)")
    p.add_argument("--theta-max", type=float, help="cap of the memory learning rate (default: RECALL_STEP's)")
    p.add_argument("--eta-init", type=float, help="initial memory momentum (titans preset: 0.9)")
    p.add_argument("--no-autocast", action="store_true", help="fp32 training on CUDA")
    p.add_argument("--eval-distances", type=int, nargs="+")
    p.add_argument("--eval-pairs", type=int)
    p.add_argument("--eval-pairs-sweep", type=int, nargs="+")
    p.add_argument("--eval-pairs-distance", type=int)
    p.add_argument("--eval-n-per-cell", type=int)
    p.add_argument("--eval-length", type=int)
    p.add_argument("--eval-segment-len", type=int, help="stream eval sequences in segments of this length")
    for action in p._actions:  # show the config's defaults (flags default to None = "keep the config's")
        if action.dest in _FLAG_FIELDS and hasattr(d, action.dest):
            v = getattr(d, action.dest)
            shown = " ".join(map(str, v)) if isinstance(v, (list, tuple)) else v
            action.help = f"{action.help + '; ' if action.help else ''}default: {shown}"
    return p


_FLAG_FIELDS = (
    "seed", "steps", "time_budget_s", "batch_size", "lr", "weight_decay", "warmup_steps", "log_every",
    "seq_len", "train_pairs", "curriculum_start_gap", "curriculum_start_pairs", "curriculum_frac", "curriculum_threshold", "d_model", "n_layers", "n_heads",
    "window", "memory_layers", "memory_chunk_size", "memory_impl", "memory_heads", "memory_depth",
    "alpha_init", "theta_init", "theta_max", "eta_init", "eval_distances", "eval_pairs", "eval_pairs_sweep", "eval_pairs_distance",
    "eval_n_per_cell", "eval_length", "eval_segment_len",
)


def config_from_args(args: argparse.Namespace) -> RecallExperimentConfig:
    kwargs: Dict[str, Any] = {"output_dir": args.output_dir, "device": args.device}
    for name in _FLAG_FIELDS:
        v = getattr(args, name, None)
        if v is not None:
            kwargs[name] = list(v) if name == "memory_layers" else (tuple(v) if isinstance(v, list) else v)
    kwargs["variants"] = parse_variants(args.variants)
    if args.no_autocast:
        kwargs["autocast"] = False
    if args.quick:
        if args.device == "auto":
            kwargs["device"] = "cpu"
        return RecallExperimentConfig.quick(**kwargs)
    return RecallExperimentConfig(**kwargs)


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        cfg.validate()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = run_experiment(cfg, printer=lambda s: print(s, flush=True))
    failed = [n for n, m in results["models"].items() if "error" in m]
    return 1 if failed else 0
