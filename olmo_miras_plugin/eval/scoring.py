"""Model-agnostic scoring for the synthetic long-context tasks and position-bucketed perplexity.

A model is any ``logits_fn(input_ids: LongTensor[batch, seq]) -> FloatTensor[batch, seq, vocab]``
(wrap an ``nn.Module`` with :func:`logits_fn_from_module`).

Why teacher forcing: one forward pass scores every answer (all MQAR queries of a context at
once), and for a fixed-length answer it is *equivalent* to greedy decoding's exact match — greedy
reproduces the answer iff the argmax is right at every answer position given the correct prefix.
The only thing it does not check is whether the model would stop after the answer.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .tasks import EvalExample

__all__ = [
    "LogitsFn",
    "ExampleScore",
    "CellScore",
    "EvalResults",
    "PositionBucket",
    "logits_fn_from_module",
    "score_examples",
    "format_table",
    "perplexity_by_position",
    "format_position_table",
]

LogitsFn = Callable[[torch.Tensor], torch.Tensor]

_CE_CHUNK = 2048


@dataclass
class ExampleScore:
    task: str
    length: int
    depth: Optional[float]
    distance: Optional[int]
    n_pairs: Optional[int]
    seed: int
    index: int
    correct: bool
    """All tokens of all answer spans were the strict argmax."""
    query_correct: List[bool]
    """Per answer span (per MQAR query; a single entry for passkey/BABILong)."""
    answer_logprob: float
    """Sum of log-probabilities of all answer tokens (nats)."""
    answer_logprob_mean: float
    """Mean log-probability per answer token (nats)."""
    n_answer_tokens: int
    predicted_ids: List[List[int]] = field(default_factory=list)
    """Argmax token at each answer position, per span (for error inspection)."""


@dataclass
class CellScore:
    task: str
    length: int
    depth: Optional[float]
    distance: Optional[int]
    n_pairs: Optional[int]
    n_examples: int
    accuracy: float
    """Fraction of examples with every answer exactly right."""
    query_accuracy: float
    """Fraction of individual queries right (equals ``accuracy`` for single-answer tasks)."""
    mean_logprob: float
    """Mean over examples of the per-token answer log-probability."""


@dataclass
class EvalResults:
    examples: List[ExampleScore]
    cells: List[CellScore]

    def accuracy(self, task: Optional[str] = None) -> float:
        """Example-level accuracy over all examples (of ``task`` if given)."""
        sel = [e for e in self.examples if task is None or e.task == task]
        if not sel:
            raise ValueError(f"no scored examples for task={task!r}")
        return sum(e.correct for e in sel) / len(sel)

    def to_dict(self, include_examples: bool = True) -> Dict[str, Any]:
        """JSON-serialisable dict: per-task summary, per-cell rows and (optionally) examples."""
        tasks = sorted({e.task for e in self.examples})
        out: Dict[str, Any] = {
            "summary": {
                t: {
                    "n_examples": sum(e.task == t for e in self.examples),
                    "accuracy": self.accuracy(t),
                }
                for t in tasks
            },
            "cells": [asdict(c) for c in self.cells],
        }
        if include_examples:
            out["examples"] = [asdict(e) for e in self.examples]
        return out


def logits_fn_from_module(model: torch.nn.Module) -> LogitsFn:
    """Adapt an OLMo-core ``Transformer`` (returns logits) or an HF model (``.logits``).

    The caller is responsible for ``model.eval()`` and device placement.
    """

    def fn(input_ids: torch.Tensor) -> torch.Tensor:
        out = model(input_ids)
        if isinstance(out, torch.Tensor):
            return out
        logits = getattr(out, "logits", None)
        if logits is None:
            raise TypeError(f"model returned {type(out).__name__} without a tensor or .logits")
        return logits

    return fn


def _check_logits(logits: Any, batch: int, seq: int) -> torch.Tensor:
    if (
        not isinstance(logits, torch.Tensor)
        or logits.dim() != 3
        or tuple(logits.shape[:2]) != (batch, seq)
    ):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(
            f"logits_fn must return [batch={batch}, seq={seq}, vocab] logits, got {shape}"
        )
    if logits.shape[2] < 2:
        raise ValueError(f"logits must have a vocab dimension >= 2, got {logits.shape[2]}")
    return logits


def _cell_sort_key(
    cell: Tuple[str, int, Optional[float], Optional[int], Optional[int]],
) -> Tuple[Any, ...]:
    task, length, depth, distance, n_pairs = cell
    none_last = lambda v: (v is None, v if v is not None else 0)  # noqa: E731
    return (task, length, none_last(n_pairs), none_last(distance), none_last(depth))


@torch.no_grad()
def score_examples(
    logits_fn: LogitsFn,
    examples: Sequence[EvalExample],
    *,
    batch_size: int = 8,
    device: Optional[Union[str, torch.device]] = None,
) -> EvalResults:
    """Teacher-forced exact match and answer log-probability for every example.

    Feeds ``input_ids + target_ids`` once; an answer token counts as correct only if its logit is
    the *strict* maximum at the preceding position (ties are wrong, so a constant model cannot
    score by tie-breaking). Examples are batched only with others of equal total length.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive int")
    for ex in examples:
        if not ex.input_ids:
            raise ValueError(
                f"example {ex.task}/{ex.index} has an empty prompt; the first answer needs context"
            )
    groups: "OrderedDict[int, List[int]]" = OrderedDict()
    for i, ex in enumerate(examples):
        groups.setdefault(len(ex.input_ids) + len(ex.target_ids), []).append(i)

    scores: List[Optional[ExampleScore]] = [None] * len(examples)
    for seq_len, idxs in groups.items():
        for b0 in range(0, len(idxs), batch_size):
            chunk = idxs[b0 : b0 + batch_size]
            ids = torch.tensor(
                [examples[i].full_ids for i in chunk], dtype=torch.long, device=device
            )
            logits = _check_logits(logits_fn(ids), len(chunk), seq_len)
            for row, i in enumerate(chunk):
                scores[i] = _score_one(examples[i], logits[row], ids[row])
            del logits

    done = [s for s in scores if s is not None]
    return EvalResults(examples=done, cells=_aggregate(examples, done))


def _score_one(ex: EvalExample, logits: torch.Tensor, ids: torch.Tensor) -> ExampleScore:
    query_correct: List[bool] = []
    predicted: List[List[int]] = []
    total_lp = 0.0
    n_tok = 0
    for positions in ex.answer_positions():
        pos = torch.tensor(positions, dtype=torch.long, device=logits.device)
        lg = logits.index_select(0, pos - 1).float()  # predictions for the answer tokens
        tgt = ids.index_select(0, pos)
        lp = F.log_softmax(lg, dim=-1).gather(1, tgt[:, None]).squeeze(1)
        top = lg.topk(2, dim=-1)
        ok = (top.indices[:, 0] == tgt) & (top.values[:, 0] > top.values[:, 1])
        query_correct.append(bool(ok.all()))
        predicted.append([int(t) for t in top.indices[:, 0].tolist()])
        total_lp += float(lp.double().sum())
        n_tok += len(positions)
    return ExampleScore(
        task=ex.task,
        length=ex.length,
        depth=ex.depth,
        distance=ex.distance,
        n_pairs=ex.n_pairs,
        seed=ex.seed,
        index=ex.index,
        correct=all(query_correct),
        query_correct=query_correct,
        answer_logprob=total_lp,
        answer_logprob_mean=total_lp / max(n_tok, 1),
        n_answer_tokens=n_tok,
        predicted_ids=predicted,
    )


def _aggregate(examples: Sequence[EvalExample], scores: Sequence[ExampleScore]) -> List[CellScore]:
    by_cell: Dict[Tuple[Any, ...], List[ExampleScore]] = {}
    for ex, sc in zip(examples, scores):
        by_cell.setdefault(ex.cell(), []).append(sc)
    cells = []
    for key in sorted(by_cell, key=_cell_sort_key):
        group = by_cell[key]
        queries = [q for s in group for q in s.query_correct]
        cells.append(
            CellScore(
                task=key[0],
                length=key[1],
                depth=key[2],
                distance=key[3],
                n_pairs=key[4],
                n_examples=len(group),
                accuracy=sum(s.correct for s in group) / len(group),
                query_accuracy=sum(queries) / len(queries) if queries else float("nan"),
                mean_logprob=sum(s.answer_logprob_mean for s in group) / len(group),
            )
        )
    return cells


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if math.isfinite(v) else str(v)
    return str(v)


def _render_table(headers: List[str], rows: List[List[Any]]) -> str:
    cols = [[h] + [_fmt(r[j]) for r in rows] for j, h in enumerate(headers)]
    widths = [max(len(c) for c in col) for col in cols]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(_fmt(v).rjust(w) for v, w in zip(r, widths)))
    return "\n".join(lines)


def format_table(results: EvalResults) -> str:
    """A fixed-width text table, one row per (task, length, depth, distance, n_pairs) cell."""
    headers = [
        "task",
        "length",
        "depth",
        "distance",
        "n_pairs",
        "n",
        "acc",
        "query_acc",
        "logprob/tok",
    ]
    rows = [
        [
            c.task,
            c.length,
            c.depth,
            c.distance,
            c.n_pairs,
            c.n_examples,
            c.accuracy,
            c.query_accuracy,
            c.mean_logprob,
        ]
        for c in results.cells
    ]
    return _render_table(headers, rows)


# ---------------------------------------------------------------------------------------------
# Loss by context position
# ---------------------------------------------------------------------------------------------


@dataclass
class PositionBucket:
    """Mean next-token loss over predicted-token positions ``start <= t < end``."""

    start: int
    end: int
    n_tokens: int
    mean_loss: Optional[float]
    """Nats per token; ``None`` when no document reaches this bucket."""
    perplexity: Optional[float]


def _check_edges(bucket_edges: Sequence[int]) -> List[int]:
    edges = list(bucket_edges)
    if len(edges) < 2:
        raise ValueError(f"bucket_edges={edges!r} needs at least two edges")
    for e in edges:
        if isinstance(e, bool) or not isinstance(e, int) or e < 0:
            raise ValueError(f"bucket_edges={edges!r}: edge {e!r} must be a non-negative int")
    for a, b in zip(edges, edges[1:]):
        if b <= a:
            raise ValueError(f"bucket_edges={edges!r} must be strictly increasing ({a} then {b})")
    return edges


@torch.no_grad()
def perplexity_by_position(
    logits_fn: LogitsFn,
    token_ids: Union[torch.Tensor, Sequence[Sequence[int]]],
    bucket_edges: Sequence[int],
    *,
    batch_size: int = 1,
    device: Optional[Union[str, torch.device]] = None,
) -> List[PositionBucket]:
    """Token-weighted mean loss per position bucket over long documents.

    Position ``t`` is the index of the *predicted* token (it is predicted from ``t`` tokens of
    context), so ``t`` ranges over ``1 .. len(doc) - 1``; bucket ``i`` covers
    ``bucket_edges[i] <= t < bucket_edges[i + 1]`` and positions outside the edges are ignored.
    If loss keeps falling in later buckets, the model is using the longer context.
    ``token_ids`` is a ``[n_docs, seq]`` / ``[seq]`` tensor or a list of documents of any lengths.
    """
    edges = _check_edges(bucket_edges)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive int")
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dim() == 1:
            token_ids = token_ids[None]
        if token_ids.dim() != 2:
            raise ValueError(
                f"token_ids must be [n_docs, seq] or [seq], got shape {tuple(token_ids.shape)}"
            )
        docs = [row.tolist() for row in token_ids]
    else:
        docs = [list(map(int, d)) for d in token_ids]
    if not docs:
        raise ValueError("token_ids contains no documents")
    for j, d in enumerate(docs):
        if len(d) < 2:
            raise ValueError(
                f"document {j} has {len(d)} tokens; at least 2 are needed to predict one"
            )

    n_buckets = len(edges) - 1
    sums = torch.zeros(n_buckets, dtype=torch.float64)
    counts = torch.zeros(n_buckets, dtype=torch.long)
    edge_t = torch.tensor(edges, dtype=torch.long)
    groups: Dict[int, List[List[int]]] = {}
    for d in docs:
        groups.setdefault(len(d), []).append(d)
    for seq_len, group in groups.items():
        positions = torch.arange(1, seq_len)
        bucket = torch.bucketize(positions, edge_t, right=True) - 1  # edges[b] <= t < edges[b+1]
        valid = (bucket >= 0) & (bucket < n_buckets)
        if not bool(valid.any()):
            continue
        for b0 in range(0, len(group), batch_size):
            chunk = group[b0 : b0 + batch_size]
            ids = torch.tensor(chunk, dtype=torch.long, device=device)
            logits = _check_logits(logits_fn(ids), len(chunk), seq_len)
            # Chunk along the sequence: the float32 logits copy stays small for big vocabularies.
            per_pos = torch.empty(seq_len - 1, dtype=torch.float64)
            for t0 in range(0, seq_len - 1, _CE_CHUNK):
                t1 = min(t0 + _CE_CHUNK, seq_len - 1)
                nll = F.cross_entropy(
                    logits[:, t0:t1].float().reshape(-1, logits.shape[-1]),
                    ids[:, t0 + 1 : t1 + 1].reshape(-1),
                    reduction="none",
                ).view(len(chunk), t1 - t0)
                per_pos[t0:t1] = nll.double().sum(0).cpu()
            sums.index_add_(0, bucket[valid], per_pos[valid])
            counts.index_add_(
                0, bucket[valid], torch.full((int(valid.sum()),), len(chunk), dtype=torch.long)
            )
            del logits

    out = []
    for i in range(n_buckets):
        n = int(counts[i])
        mean = float(sums[i] / n) if n else None
        out.append(
            PositionBucket(
                start=edges[i],
                end=edges[i + 1],
                n_tokens=n,
                mean_loss=mean,
                perplexity=(
                    math.exp(mean)
                    if mean is not None and mean < 700
                    else (None if mean is None else math.inf)
                ),
            )
        )
    return out


def format_position_table(buckets: Sequence[PositionBucket]) -> str:
    """Fixed-width table of :func:`perplexity_by_position` output."""
    rows = [[f"[{b.start}, {b.end})", b.n_tokens, b.mean_loss, b.perplexity] for b in buckets]
    return _render_table(["positions", "n_tokens", "loss", "ppl"], rows)
