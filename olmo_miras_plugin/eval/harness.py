"""Running the long-context suite on a model: batching, segment-by-segment streaming, the suite config.

Why a harness on top of :func:`~.scoring.score_examples`: a memory model is meant to read inputs
far longer than one forward call should hold, so the harness can feed every sequence in
``segment_len`` pieces with the memory state carried between them
(:class:`~olmo_miras_plugin.blocks.carry_memory_states`). Streamed and whole-sequence scores
agree up to float rounding (the state API's exactness guarantee), which the tests check.

Why it never materialises ``[batch, seq, vocab]`` logits for a whole sequence: with OLMo's
100k-token vocabulary a 32k-token sequence would need ~13 GB of float32 logits. The harness keeps
only the rows that are scored (the positions right before each answer token) and hands those to
``score_examples`` as a *compact* example (a one-token prompt followed by just the answer tokens),
so the scoring rules (strict argmax, log-probabilities) are exactly the ones in ``scoring.py``.
Position-bucketed perplexity is accumulated segment by segment the same way.

A "model" is an ``nn.Module`` returning logits (OLMo-core ``Transformer``) or an object with
``.logits`` (Hugging Face), or any ``logits_fn(input_ids) -> logits`` callable (whole sequences
only: a bare callable has no state to carry).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from olmo_core.config import Config

from ..atomic_files import write_text_atomic
from ..blocks import carry_memory_states, memory_state_modules
from ..tokenizer import ByteTokenizer
from ..models import INFERENCE_IMPL_CHOICES, set_memory_impl, upgrade_saved_config
from .scoring import EvalResults, ExampleScore, LogitsFn, PositionBucket, logits_fn_from_module, score_examples
from .scoring import _aggregate  # per-cell aggregation exactly as score_examples does it
from .tasks import (
    BabilongTaskConfig,
    EvalExample,
    MQARTaskConfig,
    MQARTokenSpec,
    PasskeyTaskConfig,
    TokenizerLike,
)

__all__ = [
    "ModelLike",
    "PerplexityConfig",
    "LongContextSuiteConfig",
    "SuiteResults",
    "SUITE_PRESETS",
    "suite_preset",
    "evaluate_examples",
    "position_loss",
    "load_perplexity_documents",
    "run_suite",
    "resolve_device",
    "supports_streaming",
    "CheckpointFormatError",
    "LoadedModel",
    "load_model_for_eval",
    "evaluate_main",
]

log = logging.getLogger(__name__)

ModelLike = Union[nn.Module, LogitsFn]
"""What the harness evaluates: a module (streamable if it has miras stateful mixers) or a callable."""


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------


@dataclass
class PerplexityConfig(Config):
    """Loss by token position over long documents: does loss keep falling with more context?"""

    source: str = "stdlib"
    """``"stdlib"`` (the installed Python standard library, available offline everywhere) or a
    path to a UTF-8 text file, cut into consecutive ``doc_length``-token documents."""
    doc_length: int = 4096
    n_docs: int = 8
    bucket_edges: Optional[List[int]] = None
    """Bucket boundaries on the predicted-token position; default ``[1, 64, 128, 256, ...,
    doc_length]`` (doubling), which is what makes "later buckets are lower" readable."""

    def resolved_edges(self) -> List[int]:
        if self.bucket_edges is not None:
            return [int(e) for e in self.bucket_edges]
        edges = [1]
        e = 64
        while e < self.doc_length:
            edges.append(e)
            e *= 2
        edges.append(self.doc_length)
        return edges

    def validate(self) -> None:
        if self.doc_length < 2:
            raise ValueError(f"perplexity.doc_length={self.doc_length} must be >= 2")
        if self.n_docs < 1:
            raise ValueError(f"perplexity.n_docs={self.n_docs} must be >= 1")
        if self.source != "stdlib" and not Path(self.source).is_file():
            raise ValueError(
                f"perplexity.source={self.source!r} is not a file; use 'stdlib' or a path to a UTF-8 text file"
            )


@dataclass
class LongContextSuiteConfig(Config):
    """Which tasks at which lengths, and how to run them. ``None`` leaves a task out."""

    name: str = "custom"
    passkey: Optional[PasskeyTaskConfig] = None
    mqar: Optional[MQARTaskConfig] = None
    """Text-form MQAR (needs a tokenizer)."""
    mqar_tokens: Optional[MQARTaskConfig] = None
    """Raw token-id MQAR (``token_form`` is forced on); needs ``vocab_size >= spec.vocab_size``."""
    babilong_qa1: Optional[BabilongTaskConfig] = None
    babilong_qa2: Optional[BabilongTaskConfig] = None
    perplexity: Optional[PerplexityConfig] = None
    batch_size: int = 8
    """Sequences per forward call (only sequences of equal length share a batch)."""
    segment_len: Optional[int] = None
    """Feed sequences in pieces of this many tokens with memory state carried between them
    (``None``: whole sequences). Models without stateful mixers are always fed whole."""
    autocast: bool = True
    """bf16 autocast on CUDA (the memory state stays float32); ignored on CPU."""

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")
        if self.segment_len is not None and self.segment_len < 1:
            raise ValueError(f"segment_len={self.segment_len} must be >= 1 (or None)")
        if self.perplexity is not None:
            self.perplexity.validate()
        if self.babilong_qa1 is not None and self.babilong_qa1.task != "qa1":
            raise ValueError(f"babilong_qa1.task must be 'qa1', got {self.babilong_qa1.task!r}")
        if self.babilong_qa2 is not None and self.babilong_qa2.task != "qa2":
            raise ValueError(f"babilong_qa2.task must be 'qa2', got {self.babilong_qa2.task!r}")

    def task_configs(self) -> List[Tuple[str, Config]]:
        out: List[Tuple[str, Config]] = []
        for name in ("passkey", "mqar", "mqar_tokens", "babilong_qa1", "babilong_qa2"):
            cfg = getattr(self, name)
            if cfg is not None:
                out.append((name, cfg))
        return out

    def build_examples(self, tokenizer: Optional[TokenizerLike] = None) -> List[EvalExample]:
        """Every example of every task, in task order (deterministic; see ``tasks.py``).

        MQAR grids are built length by length, leaving out the (length, distance) cells whose
        pairs, gap and queries don't fit (logged), so one distance list can span short and long
        contexts: long contexts get the long distances that are the point of measuring them.
        """
        self.validate()
        examples: List[EvalExample] = []
        for name, cfg in self.task_configs():
            if isinstance(cfg, MQARTaskConfig):
                if name == "mqar_tokens":
                    cfg = dataclasses.replace(cfg, token_form=True)
                examples.extend(_mqar_fitting_cells(cfg, tokenizer))
            else:
                examples.extend(cfg.build(tokenizer))  # type: ignore[attr-defined]
        return examples

    def max_length(self) -> int:
        lengths = [0]
        for _, cfg in self.task_configs():
            lengths.extend(getattr(cfg, "lengths", ()))
        if self.perplexity is not None:
            lengths.append(self.perplexity.doc_length)
        return max(lengths)


def _mqar_fitting_cells(cfg: MQARTaskConfig, tokenizer: Optional[TokenizerLike]) -> List[EvalExample]:
    out: List[EvalExample] = []
    skipped = []
    for length in cfg.lengths:
        for n in cfg.n_pairs:
            for d in cfg.distances:
                cell = dataclasses.replace(cfg, lengths=(length,), n_pairs=(n,), distances=(d,))
                try:
                    out.extend(cell.build(tokenizer))
                except ValueError as e:
                    if "too short" not in str(e):
                        raise
                    skipped.append((length, n, d))
    if skipped:
        log.info("%s: skipped (length, n_pairs, distance) cells that don't fit: %s",
                 "mqar_tokens" if cfg.token_form else "mqar", skipped)
    if not out:
        raise ValueError(
            f"no MQAR cell fits: lengths {tuple(cfg.lengths)} are too short for n_pairs "
            f"{tuple(cfg.n_pairs)} at distances {tuple(cfg.distances)}"
        )
    return out


def _pow2_distances(lengths: Sequence[int]) -> Tuple[int, ...]:
    """Powers of two from ``max(64, shortest / 16)`` to ``longest / 2``: each length is scored at
    every distance that fits it (see ``build_examples``)."""
    d = 64
    while d < min(lengths) // 16:
        d *= 2
    out = []
    while d <= max(lengths) // 2:
        out.append(d)
        d *= 2
    return tuple(out) or (max(1, min(lengths) // 4),)


def suite_preset(
    name: str = "default",
    lengths: Optional[Sequence[int]] = None,
    *,
    n_per_cell: Optional[int] = None,
    perplexity: bool = True,
) -> LongContextSuiteConfig:
    """Named suites: ``quick`` (seconds on CPU: the in-training callback), ``default`` and ``long``.

    ``lengths`` replaces the preset's lengths; ``n_per_cell`` its examples per cell.
    """
    if name not in SUITE_PRESETS:
        raise ValueError(f"unknown suite {name!r}; valid: {', '.join(SUITE_PRESETS)}")
    base_lengths, n, depths = SUITE_PRESETS[name]
    lengths = tuple(int(x) for x in (lengths or base_lengths))
    if not lengths or min(lengths) < 64:
        raise ValueError(f"suite lengths must be >= 64 tokens, got {lengths}")
    n = n_per_cell if n_per_cell is not None else n
    n_pairs = 8 if min(lengths) < 512 else 16
    return LongContextSuiteConfig(
        name=name,
        passkey=PasskeyTaskConfig(lengths=lengths, depths=depths, n_per_cell=n),
        mqar_tokens=MQARTaskConfig(
            lengths=lengths,
            n_pairs=(n_pairs,),
            distances=_pow2_distances(lengths),
            n_per_cell=n,
            token_form=True,
        ),
        babilong_qa1=BabilongTaskConfig(task="qa1", lengths=lengths, n_per_cell=n),
        babilong_qa2=BabilongTaskConfig(task="qa2", lengths=lengths, n_per_cell=n)
        if name != "quick"
        else None,
        perplexity=PerplexityConfig(doc_length=max(lengths), n_docs=4 if name == "quick" else 8)
        if perplexity
        else None,
        batch_size=8,
    )


SUITE_PRESETS: Dict[str, Tuple[Tuple[int, ...], int, Tuple[float, ...]]] = {
    # name: (lengths, examples per cell, passkey depths)
    "quick": ((256, 512), 4, (0.0, 0.5, 1.0)),
    "default": ((1024, 2048, 4096), 10, (0.0, 0.25, 0.5, 0.75, 1.0)),
    "long": ((4096, 8192, 16384, 32768), 10, (0.0, 0.25, 0.5, 0.75, 1.0)),
}


# ---------------------------------------------------------------------------------------------
# Model plumbing
# ---------------------------------------------------------------------------------------------


def resolve_device(device: Optional[Union[str, torch.device]] = None) -> torch.device:
    """``"auto"``/``None`` -> CUDA when available, else CPU; clear error for an absent GPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} requested but CUDA is not available on this machine")
    return dev


def _is_hf_miras(model: ModelLike) -> bool:
    """An exported ``OlmoMirasForCausalLM``: it streams through a ``MirasCache``, not block state."""
    return isinstance(model, nn.Module) and getattr(getattr(model, "config", None), "model_type", None) == "olmo_miras"


def supports_streaming(model: ModelLike) -> bool:
    """Whether ``model`` can carry state between calls (miras stateful mixers, or an HF olmo-miras model)."""
    return isinstance(model, nn.Module) and (bool(memory_state_modules(model)) or _is_hf_miras(model))


def _model_device(model: ModelLike) -> Optional[torch.device]:
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return p.device
    return None


def _as_logits_fn(model: ModelLike) -> LogitsFn:
    if isinstance(model, nn.Module):
        return logits_fn_from_module(model)
    if callable(model):
        return model
    raise TypeError(f"model must be an nn.Module or a logits_fn callable, got {type(model).__name__}")


@contextlib.contextmanager
def _eval_mode(model: ModelLike, device: torch.device, autocast: bool) -> Iterator[None]:
    """``model.eval()``, ``no_grad`` and (on CUDA) bf16 autocast; the previous mode is restored."""
    was_training = isinstance(model, nn.Module) and model.training
    if isinstance(model, nn.Module):
        model.eval()
    ac = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if autocast and device.type == "cuda"
        else contextlib.nullcontext()
    )
    try:
        with torch.no_grad(), ac:
            yield
    finally:
        if was_training:
            model.train()  # type: ignore[union-attr]


def _effective_segment_len(model: ModelLike, segment_len: Optional[int], warn: bool = True) -> Optional[int]:
    if segment_len is None:
        return None
    if not supports_streaming(model):
        if warn:
            log.warning(
                "%s has no stateful miras mixers, so it can't carry state between segments; "
                "feeding whole sequences instead (segment_len=%d ignored)",
                type(model).__name__,
                segment_len,
            )
        return None
    return segment_len


def _forward_pieces(
    model: ModelLike,
    ids: torch.Tensor,
    segment_len: Optional[int],
    fn: LogitsFn,
) -> Iterator[Tuple[int, torch.Tensor]]:
    """Yield ``(start, logits of ids[:, start:start + len])`` piece by piece (one piece if whole)."""
    t = ids.shape[1]
    if segment_len is None or segment_len >= t:
        yield 0, fn(ids)
        return
    if _is_hf_miras(model):
        from ..hf.modeling_olmo_miras import MirasCache

        cache = MirasCache(config=model.config)  # type: ignore[union-attr]
        for s in range(0, t, segment_len):
            yield s, model(ids[:, s : s + segment_len], cache=cache, use_cache=True).logits  # type: ignore[operator]
        return
    with carry_memory_states(model):  # type: ignore[arg-type]
        for s in range(0, t, segment_len):
            yield s, fn(ids[:, s : s + segment_len])


def _check_vocab(examples: Sequence[EvalExample], logits: torch.Tensor) -> None:
    vocab = logits.shape[-1]
    top = max((max(ex.full_ids) for ex in examples), default=-1)
    if top >= vocab:
        raise ValueError(
            f"an example uses token id {top} but the model's vocabulary has only {vocab} entries "
            "(raw-token MQAR needs vocab_size >= its spec.vocab_size; check the tokenizer)"
        )


class _Progress:
    """A tqdm bar when available and wanted, else nothing."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = None
        if enabled and total > 0:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc=desc, unit="seq", file=sys.stderr, leave=False)
            except ImportError:  # pragma: no cover - tqdm is a dependency
                self.bar = None

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------
# Task scoring
# ---------------------------------------------------------------------------------------------


def _compact(ex: EvalExample, key: int) -> EvalExample:
    """``ex`` reduced to a one-token prompt (``key``, an index, never looked up) followed by just
    its answer tokens, spans re-indexed; every other field (length, depth, ...) is kept, so
    ``score_examples`` reports and aggregates it exactly as the original."""
    answers = ex.answer_token_ids()
    target: List[int] = []
    spans: List[Tuple[int, int]] = []
    for a in answers:
        spans.append((len(target), len(target) + len(a)))
        target.extend(a)
    return dataclasses.replace(ex, input_ids=[key], target_ids=target, answer_spans=spans)


def evaluate_examples(
    model: ModelLike,
    examples: Sequence[EvalExample],
    *,
    batch_size: int = 8,
    segment_len: Optional[int] = None,
    device: Optional[Union[str, torch.device]] = None,
    autocast: bool = True,
    progress: bool = False,
    desc: str = "eval",
) -> EvalResults:
    """Score ``examples`` on ``model`` (teacher-forced exact match, as ``score_examples``).

    With ``segment_len`` each batch is fed in pieces with the memory state carried, and only the
    logits rows that are scored are kept (see the module docstring).
    """
    if not examples:
        raise ValueError("no examples to evaluate")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    dev = _model_device(model) or resolve_device(device)
    seg = _effective_segment_len(model, segment_len)
    fn = _as_logits_fn(model)

    groups: Dict[int, List[int]] = {}
    for i, ex in enumerate(examples):
        if not ex.input_ids:
            raise ValueError(f"example {ex.task}/{ex.index} has an empty prompt")
        groups.setdefault(len(ex.full_ids), []).append(i)

    scores: List[Optional[ExampleScore]] = [None] * len(examples)
    bar = _Progress(len(examples), desc, progress)
    try:
        with _eval_mode(model, dev, autocast):
            for _, idxs in sorted(groups.items()):
                for b0 in range(0, len(idxs), batch_size):
                    chunk = idxs[b0 : b0 + batch_size]
                    ids = torch.tensor([examples[i].full_ids for i in chunk], dtype=torch.long, device=dev)
                    # rows to keep per example: the position before each answer token, in order
                    need = [
                        torch.tensor([p - 1 for ps in examples[i].answer_positions() for p in ps], dtype=torch.long)
                        for i in chunk
                    ]
                    got: List[List[torch.Tensor]] = [[] for _ in chunk]
                    checked = False
                    for start, logits in _forward_pieces(model, ids, seg, fn):
                        if not checked:
                            _check_logits_shape(logits, len(chunk), ids.shape[1] if seg is None else None)
                            _check_vocab([examples[i] for i in chunk], logits)
                            checked = True
                        end = start + logits.shape[1]
                        for r, pos in enumerate(need):
                            sel = pos[(pos >= start) & (pos < end)] - start
                            if sel.numel():
                                got[r].append(logits[r].index_select(0, sel.to(logits.device)).float().cpu())
                        del logits
                    rows = {i: torch.cat(got[r], dim=0) for r, i in enumerate(chunk)}
                    # score this batch now: kept rows are n_answers x vocab floats per example
                    batch_res = score_examples(_lookup(rows), [_compact(examples[i], i) for i in chunk],
                                               batch_size=len(chunk))
                    for i, sc in zip(chunk, batch_res.examples):
                        scores[i] = sc
                    del rows, got
                    bar.update(len(chunk))
    finally:
        bar.close()
    done = [sc for sc in scores if sc is not None]
    return EvalResults(examples=done, cells=_aggregate(examples, done))


def _lookup(rows: Dict[int, torch.Tensor]) -> LogitsFn:
    """A ``logits_fn`` for compact examples: ``ids[:, 0]`` holds each one's example index; the row
    after the last answer token predicts nothing and is zeros."""

    def fn(ids: torch.Tensor) -> torch.Tensor:
        out = torch.stack([rows[int(k)] for k in ids[:, 0].tolist()])
        return torch.cat([out, out.new_zeros(out.shape[0], 1, out.shape[2])], dim=1)

    return fn


def _check_logits_shape(logits: Any, batch: int, seq: Optional[int]) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[0] != batch:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"model must return [batch={batch}, seq, vocab] logits, got {shape}")
    if seq is not None and logits.shape[1] != seq:
        raise ValueError(f"model returned logits for {logits.shape[1]} positions, expected {seq}")


# ---------------------------------------------------------------------------------------------
# Loss by position
# ---------------------------------------------------------------------------------------------


def load_perplexity_documents(
    config: PerplexityConfig, tokenizer: Optional[TokenizerLike] = None
) -> List[List[int]]:
    """``n_docs`` documents of exactly ``doc_length`` tokens from the configured source.

    stdlib: whole source files long enough, spread evenly over the (sorted) candidates, each cut
    to ``doc_length`` — one file per document, so "position" means position inside one coherent
    document. A text file: consecutive ``doc_length``-token pieces of it.
    """
    config.validate()
    tok = tokenizer if tokenizer is not None else ByteTokenizer()

    def encode(text: str) -> List[int]:
        try:
            return list(tok.encode(text, add_special_tokens=False))  # type: ignore[call-arg]
        except TypeError:
            return list(tok.encode(text))

    n, length = config.n_docs, config.doc_length
    if config.source == "stdlib":
        from ..data import stdlib_source_files

        # Token counts are at most byte counts for byte-level/BPE tokenizers, so filter on size
        # first (cheap), then check the real token count.
        files = [p for p in stdlib_source_files() if p.stat().st_size >= length]
        docs: List[List[int]] = []
        if files:
            stride = max(1, len(files) // (4 * n))
            for p in files[::stride] + files:
                ids = encode(p.read_text(encoding="utf-8"))
                if len(ids) >= length:
                    docs.append(ids[:length])
                    if len(docs) == n:
                        break
        if len(docs) < n:
            raise ValueError(
                f"the stdlib corpus has only {len(docs)} files of >= {length} tokens (wanted {n}); "
                "lower perplexity.doc_length / n_docs or pass a text file as the source"
            )
        return docs
    path = Path(config.source)
    if not path.is_file():
        raise FileNotFoundError(f"perplexity source '{config.source}' is neither 'stdlib' nor an existing file")
    ids = encode(path.read_text(encoding="utf-8", errors="replace"))
    if len(ids) < length:
        raise ValueError(f"'{path}' has {len(ids)} tokens, fewer than one document of {length}")
    n_avail = len(ids) // length
    if n_avail < n:
        log.warning("'%s' holds only %d documents of %d tokens (wanted %d)", path, n_avail, length, n)
    return [ids[i * length : (i + 1) * length] for i in range(min(n, n_avail))]


def position_loss(
    model: ModelLike,
    docs: Sequence[Sequence[int]],
    bucket_edges: Sequence[int],
    *,
    batch_size: int = 1,
    segment_len: Optional[int] = None,
    device: Optional[Union[str, torch.device]] = None,
    autocast: bool = True,
    progress: bool = False,
) -> List[PositionBucket]:
    """Like :func:`~.scoring.perplexity_by_position` (same buckets and definitions: position
    ``t`` is the index of the predicted token), but streamed: per-position losses are computed
    segment by segment, so no whole-document logits are held."""
    edges = [int(e) for e in bucket_edges]
    if len(edges) < 2 or any(e < 0 for e in edges) or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"bucket_edges={list(bucket_edges)!r} must be >= 2 strictly increasing non-negative ints")
    if not docs:
        raise ValueError("no documents")
    dev = _model_device(model) or resolve_device(device)
    seg = _effective_segment_len(model, segment_len)
    fn = _as_logits_fn(model)
    n_b = len(edges) - 1
    sums = torch.zeros(n_b, dtype=torch.float64)
    counts = torch.zeros(n_b, dtype=torch.long)
    edge_t = torch.tensor(edges, dtype=torch.long)
    groups: Dict[int, List[Sequence[int]]] = {}
    for d in docs:
        if len(d) < 2:
            raise ValueError(f"a document has {len(d)} tokens; at least 2 are needed")
        groups.setdefault(len(d), []).append(d)
    bar = _Progress(len(docs), "perplexity", progress)
    try:
        with _eval_mode(model, dev, autocast):
            for t_len, group in groups.items():
                positions = torch.arange(1, t_len)
                bucket = torch.bucketize(positions, edge_t, right=True) - 1
                valid = (bucket >= 0) & (bucket < n_b)
                for b0 in range(0, len(group), batch_size):
                    chunk = group[b0 : b0 + batch_size]
                    ids = torch.tensor([list(d) for d in chunk], dtype=torch.long, device=dev)
                    per_pos = torch.zeros(t_len - 1, dtype=torch.float64)
                    for start, logits in _forward_pieces(model, ids, seg, fn):
                        end = start + logits.shape[1]
                        stop = min(end, t_len - 1)  # logits row j predicts token j + 1
                        if stop > start:
                            nll = F.cross_entropy(
                                logits[:, : stop - start].float().reshape(-1, logits.shape[-1]),
                                ids[:, start + 1 : stop + 1].reshape(-1),
                                reduction="none",
                            ).view(len(chunk), stop - start)
                            per_pos[start:stop] = nll.double().sum(0).cpu()
                        del logits
                    if bool(valid.any()):
                        sums.index_add_(0, bucket[valid], per_pos[valid])
                        counts.index_add_(
                            0, bucket[valid], torch.full((int(valid.sum()),), len(chunk), dtype=torch.long)
                        )
                    bar.update(len(chunk))
    finally:
        bar.close()
    out = []
    for i in range(n_b):
        n = int(counts[i])
        mean = float(sums[i] / n) if n else None
        ppl = None if mean is None else (math.exp(mean) if mean < 700 else math.inf)
        out.append(PositionBucket(start=edges[i], end=edges[i + 1], n_tokens=n, mean_loss=mean, perplexity=ppl))
    return out


# ---------------------------------------------------------------------------------------------
# The suite
# ---------------------------------------------------------------------------------------------


@dataclass
class SuiteResults:
    """Task scores, loss by position, and how they were obtained."""

    tasks: Optional[EvalResults] = None
    perplexity: Optional[List[PositionBucket]] = None
    meta: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self, include_examples: bool = False) -> Dict[str, Any]:
        out: Dict[str, Any] = {"meta": dict(self.meta)}
        if self.tasks is not None:
            out.update(self.tasks.to_dict(include_examples=include_examples))
        if self.perplexity is not None:
            out["perplexity_by_position"] = [dataclasses.asdict(b) for b in self.perplexity]
        return out


def run_suite(
    model: ModelLike,
    suite: LongContextSuiteConfig,
    *,
    tokenizer: Optional[TokenizerLike] = None,
    device: Optional[Union[str, torch.device]] = None,
    progress: bool = False,
    ppl_docs: Optional[List[List[int]]] = None,
) -> SuiteResults:
    """Build the suite's examples (with ``tokenizer``, default bytes), score them, and measure loss
    by position; ``ppl_docs`` overrides the documents the perplexity config would load."""
    suite.validate()
    t0 = time.monotonic()
    examples = suite.build_examples(tokenizer)
    seg = _effective_segment_len(model, suite.segment_len)
    meta: Dict[str, Any] = {
        "suite": suite.name,
        "segment_len": seg,
        "streamed": seg is not None,
        "batch_size": suite.batch_size,
        "n_examples": len(examples),
    }
    res = SuiteResults(meta=meta)
    if examples:
        res.tasks = evaluate_examples(
            model,
            examples,
            batch_size=suite.batch_size,
            segment_len=seg,
            device=device,
            autocast=suite.autocast,
            progress=progress,
            desc="tasks",
        )
    if suite.perplexity is not None:
        docs = ppl_docs if ppl_docs is not None else load_perplexity_documents(suite.perplexity, tokenizer)
        meta["perplexity_docs"] = len(docs)
        meta["perplexity_source"] = suite.perplexity.source
        res.perplexity = position_loss(
            model,
            docs,
            suite.perplexity.resolved_edges(),
            batch_size=max(1, min(suite.batch_size, len(docs))),
            segment_len=seg,
            device=device,
            autocast=suite.autocast,
            progress=progress,
        )
    meta["seconds"] = round(time.monotonic() - t0, 3)
    return res


# ---------------------------------------------------------------------------------------------
# Loading checkpoints for evaluation
# ---------------------------------------------------------------------------------------------


class CheckpointFormatError(ValueError):
    """The path is not a checkpoint layout the evaluator knows."""


@dataclass
class LoadedModel:
    """A model ready for :func:`run_suite`, with where it came from."""

    model: nn.Module
    kind: str
    """``olmo_core`` (trainer checkpoint), ``saved`` (config.json + model.pt) or ``hf``."""
    path: str
    tokenizer_spec: Optional[str] = None
    """What the checkpoint says its tokenizer is (``bytes`` or a Hugging Face id/path)."""
    config: Optional[Dict[str, Any]] = None
    step: Optional[int] = None


def _latest_step_dir(path: Path) -> Optional[Path]:
    steps = []
    for p in path.iterdir():
        if p.is_dir() and p.name.startswith("step") and p.name[4:].isdigit() and (p / "model_and_optim").is_dir():
            steps.append((int(p.name[4:]), p))
    return max(steps)[1] if steps else None


def _tokenizer_from_config(cfg: Dict[str, Any]) -> Optional[str]:
    tok = (cfg.get("dataset") or {}).get("tokenizer") or {}
    ident = tok.get("identifier")
    if ident == "olmo-miras/bytes" or (ident is None and tok.get("vocab_size") == 259):
        return "bytes"
    return ident


def _build_from_config(model_cfg: Dict[str, Any], device: torch.device, max_seq_len: int) -> nn.Module:
    """Build the OLMo-core model named by a config dict (``_CLASS_``), initialised on ``device``
    (OLMo-core's ``init_weights``: also sets up RoPE buffers) so a state dict can be loaded in."""
    try:
        mc = Config.from_dict(upgrade_saved_config(dict(model_cfg)))
    except Exception as e:  # noqa: BLE001
        raise CheckpointFormatError(f"can't rebuild the model from config.json: {type(e).__name__}: {e}") from e
    if not hasattr(mc, "build"):
        raise CheckpointFormatError(f"config.json 'model' is a {type(mc).__name__}, not a model config")
    model = mc.build(init_device="meta")
    model.init_weights(max_seq_len=max_seq_len, device=device)
    return model


def load_model_for_eval(
    path: Union[str, Path], device: Optional[Union[str, torch.device]] = None, *, max_seq_len: int = 4096
) -> LoadedModel:
    """Load a model to evaluate from

    * an OLMo-core trainer checkpoint: a ``stepN`` directory (``config.json`` +
      ``model_and_optim/``), its ``model_and_optim`` directory, or a save folder (latest step);
    * a saved model: a directory with ``config.json`` (``{"model": <OLMo-core model config>}``) and
      ``model.pt`` (a state dict), as :func:`~.recall_experiment.save_model` writes;
    * a Hugging Face checkpoint directory (``config.json`` with ``model_type``), through
      ``transformers``; if its model type is unknown, ``olmo_miras_plugin.hf`` is imported (when
      present) so it can register its classes, then loading is retried.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    dev = resolve_device(device)
    if p.is_dir() and p.name == "model_and_optim":
        p = p.parent
    if p.is_dir() and not (p / "config.json").is_file():
        latest = _latest_step_dir(p)
        if latest is not None:
            p = latest
    cfg_path = p / "config.json" if p.is_dir() else None
    if cfg_path is None or not cfg_path.is_file():
        raise CheckpointFormatError(
            f"'{path}' is not a checkpoint: expected a trainer step dir (config.json + model_and_optim/), "
            "a save folder with stepN/ dirs, a saved model (config.json + model.pt) or a Hugging Face dir"
        )
    cfg = json.loads(cfg_path.read_text())
    if "model" in cfg and (p / "model_and_optim").is_dir():
        from olmo_core.distributed.checkpoint import load_model_and_optim_state

        model = _build_from_config(cfg["model"], dev, max_seq_len)
        import warnings

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            load_model_and_optim_state(str(p / "model_and_optim"), model)
        step = int(p.name[4:]) if p.name.startswith("step") and p.name[4:].isdigit() else None
        return LoadedModel(model, "olmo_core", str(p), _tokenizer_from_config(cfg), cfg, step)
    if "model" in cfg and (p / "model.pt").is_file():
        model = _build_from_config(cfg["model"], dev, max_seq_len)
        state = torch.load(p / "model.pt", map_location=dev, weights_only=True)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointFormatError(
                f"model.pt doesn't match config.json: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
            )
        return LoadedModel(model, "saved", str(p), _tokenizer_from_config(cfg) or cfg.get("tokenizer"), cfg)
    if "model_type" in cfg or "architectures" in cfg:
        return _load_hf(p, dev)
    raise CheckpointFormatError(
        f"'{cfg_path}' has no 'model' entry with weights next to it (model_and_optim/ or model.pt) and is not "
        "a Hugging Face config"
    )


def _load_hf(p: Path, dev: torch.device) -> LoadedModel:
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as e:  # pragma: no cover
        raise CheckpointFormatError("Hugging Face checkpoints need 'transformers' (pip install 'olmo-miras[hf]')") from e
    # Registers the olmo_miras classes first, so transformers doesn't ask to trust remote code.
    from .. import hf as _register_hf  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32)
    # The tokenizer it was trained with (recorded at export), else the directory's own files.
    ident = getattr(model.config, "miras_tokenizer", None)
    if ident == ByteTokenizer.identifier:
        tokenizer: Optional[str] = "bytes"
    elif (p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file():
        tokenizer = str(p)
    else:
        tokenizer = ident
    return LoadedModel(model.to(dev), "hf", str(p), tokenizer)


# ---------------------------------------------------------------------------------------------
# The evaluate CLI (scripts/evaluate.py)
# ---------------------------------------------------------------------------------------------

TASK_NAMES = ("passkey", "mqar", "mqar_tokens", "babilong_qa1", "babilong_qa2", "ppl")
TEXT_TASKS = ("passkey", "mqar", "babilong_qa1", "babilong_qa2", "ppl")


def _select_tasks(suite: LongContextSuiteConfig, tasks: Sequence[str]) -> LongContextSuiteConfig:
    unknown = [t for t in tasks if t not in TASK_NAMES]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; valid: {', '.join(TASK_NAMES)}")
    new = suite.copy()
    for name in TASK_NAMES:
        if name == "ppl":
            if "ppl" not in tasks:
                new.perplexity = None
            elif new.perplexity is None:
                new.perplexity = PerplexityConfig(doc_length=new.max_length())
            continue
        if name not in tasks:
            setattr(new, name, None)
        elif getattr(new, name) is None:
            ref = next((c for _, c in suite.task_configs()), None)
            lengths = getattr(ref, "lengths", (1024, 2048, 4096))
            n = getattr(ref, "n_per_cell", 5)
            if name == "mqar":
                # text pairs take ~10 tokens each with a byte tokenizer: 8 pairs
                setattr(new, name, MQARTaskConfig(lengths=tuple(lengths), n_per_cell=n, n_pairs=(8,),
                                                  distances=_pow2_distances(lengths)))
            elif name == "babilong_qa2":
                setattr(new, name, BabilongTaskConfig(task="qa2", lengths=tuple(lengths), n_per_cell=n))
            elif name == "babilong_qa1":
                setattr(new, name, BabilongTaskConfig(task="qa1", lengths=tuple(lengths), n_per_cell=n))
            elif name == "passkey":
                setattr(new, name, PasskeyTaskConfig(lengths=tuple(lengths), n_per_cell=n))
            else:
                setattr(new, name, MQARTaskConfig(lengths=tuple(lengths), n_per_cell=n, token_form=True,
                                                  distances=_pow2_distances(lengths)))
    return new


def build_eval_parser() -> "argparse.ArgumentParser":
    import argparse

    p = argparse.ArgumentParser(
        prog="evaluate.py",
        description="Run the long-context suite (passkey, MQAR, BABILong, loss by position) on one or more "
        "checkpoints: OLMo-core trainer checkpoints, saved models (config.json + model.pt) or HF dirs.",
    )
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT")
    p.add_argument("--suite", default="default", choices=sorted(SUITE_PRESETS), help="task grid preset")
    p.add_argument("--lengths", type=int, nargs="+", help="context lengths (replace the preset's)")
    p.add_argument("--tasks", default=None,
                   help=f"comma list from {','.join(TASK_NAMES)} (default: the preset's; 'ppl' = loss by position)")
    p.add_argument("--n-per-cell", type=int, help="examples per grid cell")
    p.add_argument("--segment-len", type=int, help="stream inputs in segments of this many tokens (memory carried)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--tokenizer", help="'bytes' or a Hugging Face tokenizer id/path (default: from the checkpoint)")
    p.add_argument("--ppl-source", default="stdlib", help="'stdlib' or a UTF-8 text file for loss by position")
    p.add_argument("--ppl-docs", type=int, default=8)
    p.add_argument("--output-dir", help="default: runs/eval/<name of the (first) checkpoint>")
    p.add_argument("--name", action="append", help="label per checkpoint in tables/plots (repeat)")
    p.add_argument("--no-autocast", action="store_true", help="fp32 on CUDA")
    p.add_argument("--memory-impl", default="auto", choices=INFERENCE_IMPL_CHOICES,
                   help="memory layers' impl (auto: triton on CUDA where a kernel applies, else the checkpoint's)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _label(path: str) -> str:
    parts = [x for x in Path(path).resolve().parts if x]
    return "/".join(parts[-2:]) if parts and parts[-1].startswith("step") else (parts[-1] if parts else path)


def evaluate_main(argv: Optional[List[str]] = None) -> int:
    """``scripts/evaluate.py``: evaluate checkpoints, print tables, write JSON + PNGs."""
    from .callback import load_tokenizer
    from .scoring import format_position_table, format_table

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_eval_parser().parse_args(argv)
    if args.name and len(args.name) != len(args.checkpoints):
        print(f"error: --name given {len(args.name)} times for {len(args.checkpoints)} checkpoints", file=sys.stderr)
        return 2
    try:
        suite = suite_preset(args.suite, args.lengths, n_per_cell=args.n_per_cell)
        if args.tasks:
            suite = _select_tasks(suite, [t.strip() for t in args.tasks.split(",") if t.strip()])
        if suite.perplexity is not None:
            suite.perplexity = dataclasses.replace(suite.perplexity, source=args.ppl_source, n_docs=args.ppl_docs)
        suite.batch_size = args.batch_size
        suite.segment_len = args.segment_len
        suite.autocast = not args.no_autocast
        suite.validate()
        device = resolve_device(args.device)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.output_dir or Path("runs/eval") / _label(args.checkpoints[0]).replace("/", "_"))
    if out.exists() and not out.is_dir():  # found now, not after the evaluation
        print(f"error: --output-dir {str(out)!r} is a file; give a directory", file=sys.stderr)
        return 2
    all_results: Dict[str, Any] = {"suite": suite.as_config_dict(), "device": str(device), "models": {}}
    for k, ckpt in enumerate(args.checkpoints):
        print(f"== loading {ckpt}", file=sys.stderr, flush=True)
        try:
            loaded = load_model_for_eval(ckpt, device, max_seq_len=suite.max_length())
            spec = args.tokenizer or loaded.tokenizer_spec
            tok = load_tokenizer(spec) if spec else None
        except (FileNotFoundError, CheckpointFormatError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except Exception as e:  # noqa: BLE001 - e.g. OLMoConfigurationError from the tokenizer
            print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
            return 2
        impl = set_memory_impl(loaded.model, args.memory_impl, device)
        if impl is not None:
            print(f"== memory impl: {impl}", file=sys.stderr, flush=True)
        name = args.name[k] if args.name else _label(loaded.path)
        run = suite
        if tok is None:
            dropped = [t for t in TEXT_TASKS if (t == "ppl" and run.perplexity is not None) or
                       (t != "ppl" and getattr(run, t, None) is not None)]
            if dropped:
                print(f"warning: no tokenizer known for {ckpt} (pass --tokenizer); skipping {', '.join(dropped)}",
                      file=sys.stderr)
                run = _select_tasks(run, [t for t in TASK_NAMES if t not in TEXT_TASKS and
                                          getattr(run, t, None) is not None])
        if not run.task_configs() and run.perplexity is None:
            print(f"error: nothing left to evaluate for {ckpt} (text tasks need a tokenizer: --tokenizer)",
                  file=sys.stderr)
            return 2
        streamed = run.segment_len is not None and supports_streaming(loaded.model)
        print(f"== {name}: {loaded.kind} model, {sum(p.numel() for p in loaded.model.parameters()):,d} params, "
              f"{'streamed in segments of ' + str(run.segment_len) if streamed else 'whole sequences'}",
              file=sys.stderr, flush=True)
        try:
            res = run_suite(loaded.model, run, tokenizer=tok, device=device, progress=not args.no_progress)
        except (ValueError, OSError) as e:
            print(f"error while evaluating {ckpt}: {e}", file=sys.stderr)
            return 2
        entry = res.to_dict(include_examples=False)
        entry["checkpoint"] = {"path": loaded.path, "kind": loaded.kind, "step": loaded.step, "tokenizer": spec}
        all_results["models"][name] = entry
        print(f"\n## {name}")
        if res.tasks is not None:
            print(format_table(res.tasks))
        if res.perplexity is not None:
            print(f"\nloss by position ({res.meta.get('perplexity_docs')} docs from {res.meta.get('perplexity_source')}):")
            print(format_position_table(res.perplexity))
        del loaded
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out.mkdir(parents=True, exist_ok=True)  # only now: a failed load leaves nothing behind
    write_text_atomic(out / "results.json", json.dumps(all_results, indent=1, default=str))
    written = [out / "results.json"]
    try:
        from .plot import plot_accuracy, plot_position_loss

        models = {n: m for n, m in all_results["models"].items() if m.get("cells")}
        if models:
            written.append(plot_accuracy(models, out / "accuracy_vs_length.png", x="length",
                                         metric="query_accuracy",
                                         title="accuracy vs context length (per query; MQAR: per pair)"))
        ppl = {n: m["perplexity_by_position"] for n, m in all_results["models"].items() if m.get("perplexity_by_position")}
        if ppl:
            written.append(plot_position_loss(ppl, out / "loss_by_position.png"))
    except ImportError as e:
        print(f"warning: {e}; no plots written", file=sys.stderr)
    print("\nwrote " + ", ".join(str(w) for w in written))
    return 0
