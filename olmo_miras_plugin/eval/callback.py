"""An OLMo-core callback that runs a small long-context suite during training.

Why in the loop: whether the memory is being *used* shows up in recall at lengths beyond the
attention window long before it shows up in the training loss, so watching ``acc@length`` per
task while training is the cheapest early signal that a run is learning to remember.

Metrics go through ``trainer.record_metric`` (like OLMo-core's ``EvaluatorCallback``), so they
reach the console logger (add ``"eval/longctx/*"`` to its ``metrics``), W&B, Comet and the metric
saver like any other metric:

* ``eval/longctx/<task>/acc`` — example accuracy over all lengths;
* ``eval/longctx/<task>/acc@<length>`` — per length;
* ``eval/longctx/<task>/query_acc@<length>`` — per-query recall (MQAR: one entry per pair);
* ``eval/longctx/ppl/loss@<start>-<end>`` — loss by token position (only with ``perplexity``).

Distributed runs: every rank evaluates the same (small) suite, so each forward is made on every
rank in lockstep (what FSDP needs) and the recorded values are identical across ranks.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from olmo_core.exceptions import OLMoConfigurationError
from olmo_core.train.callbacks import Callback
from olmo_core.train.common import ReduceType

from .harness import LongContextSuiteConfig, PerplexityConfig, run_suite
from .scoring import format_table
from .tasks import MQARTaskConfig, PasskeyTaskConfig, TokenizerLike

__all__ = ["LongContextEvalCallback", "default_callback_suite", "load_tokenizer"]

log = logging.getLogger(__name__)

BYTES = "bytes"


def load_tokenizer(spec: Optional[str]) -> Optional[TokenizerLike]:
    """``"bytes"`` -> :class:`~olmo_miras_plugin.tokenizer.ByteTokenizer`; any other string -> a
    Hugging Face tokenizer (hub id or local path); ``None`` -> ``None``."""
    if spec is None:
        return None
    if spec in (BYTES, "olmo-miras/bytes"):
        from ..tokenizer import ByteTokenizer

        return ByteTokenizer()
    try:
        from transformers import AutoTokenizer
    except ImportError as e:  # pragma: no cover - transformers is a dev/hf extra
        raise OLMoConfigurationError(
            f"tokenizer {spec!r} needs the 'transformers' package (pip install 'olmo-miras[hf]')"
        ) from e
    try:
        return AutoTokenizer.from_pretrained(spec)
    except Exception as e:  # noqa: BLE001 - wrap whatever HF raises with the actionable part
        raise OLMoConfigurationError(
            f"could not load tokenizer {spec!r} ({type(e).__name__}: {e}); pass a local tokenizer "
            "directory, or 'bytes' for byte-level models"
        ) from e


def default_callback_suite(lengths: List[int], n_per_cell: int = 8) -> LongContextSuiteConfig:
    """Raw-token MQAR (16 pairs; 8 below 512 tokens) with the queries half of each length after
    the pairs, and passkey at depth 0.25: seconds per eval on a GPU at a few thousand tokens."""
    n_pairs = 8 if min(lengths) < 512 else 16
    # half of each length back, at that length and every longer one (cells that don't fit are
    # left out), so the longest length shows recall at every scale
    distances = tuple(sorted({max(1, L // 2) for L in lengths}))
    return LongContextSuiteConfig(
        name="callback",
        mqar_tokens=MQARTaskConfig(
            lengths=tuple(lengths),
            n_pairs=(n_pairs,),
            distances=distances,
            n_per_cell=n_per_cell,
            token_form=True,
        ),
        passkey=PasskeyTaskConfig(lengths=tuple(lengths), depths=(0.25,), n_per_cell=n_per_cell),
        batch_size=8,
    )


@dataclass
class LongContextEvalCallback(Callback):
    """Every ``interval`` steps, run ``suite`` (default :func:`default_callback_suite` at
    ``lengths``) on the model being trained and record ``eval/longctx/...`` metrics."""

    enabled: bool = True
    interval: int = 500
    """Evaluate on steps that are multiples of this."""
    lengths: List[int] = field(default_factory=lambda: [512, 1024, 2048])
    """Lengths of the default suite (ignored when ``suite`` is given)."""
    n_per_cell: int = 8
    suite: Optional[LongContextSuiteConfig] = None
    segment_len: Optional[int] = None
    """Stream sequences in pieces of this many tokens (overrides the suite's); ``None`` keeps it."""
    tokenizer: Optional[str] = None
    """For text tasks (passkey, BABILong, text MQAR): ``"bytes"`` or a Hugging Face tokenizer id
    or path. ``None``: bytes when the dataset's vocabulary is the byte tokenizer's (259), else
    text tasks are skipped with a warning and only raw-token MQAR runs."""
    perplexity: Optional[PerplexityConfig] = None
    """Also record loss by position (costs one forward per document)."""
    eval_on_start: bool = False
    """Also evaluate before the first step (the untrained / pretrained baseline)."""
    prefix: str = "eval/longctx"
    log_table: bool = True

    def __post_init__(self) -> None:
        self._suite: Optional[LongContextSuiteConfig] = None
        self._tokenizer: Optional[TokenizerLike] = None

    # ------------------------------------------------------------------ setup
    def _resolve(self) -> None:
        if self.interval <= 0:
            raise OLMoConfigurationError(f"LongContextEvalCallback.interval must be positive, got {self.interval}")
        suite = (self.suite or default_callback_suite(list(self.lengths), self.n_per_cell)).copy()
        if self.segment_len is not None:
            suite.segment_len = self.segment_len
        if self.perplexity is not None:
            suite.perplexity = self.perplexity
        spec = self.tokenizer
        if spec is None and self._dataset_vocab() == 259:
            spec = BYTES
        self._tokenizer = load_tokenizer(spec)
        if self._tokenizer is None:
            dropped = [n for n in ("passkey", "mqar", "babilong_qa1", "babilong_qa2") if getattr(suite, n) is not None]
            for n in dropped:
                setattr(suite, n, None)
            if dropped or suite.perplexity is not None:
                log.warning(
                    "LongContextEvalCallback: no tokenizer (set 'tokenizer'), skipping %s",
                    ", ".join(dropped + (["perplexity"] if suite.perplexity is not None else [])),
                )
            suite.perplexity = None
        suite.validate()
        if not suite.task_configs() and suite.perplexity is None:
            raise OLMoConfigurationError("LongContextEvalCallback: the suite has no tasks left to run")
        self._suite = suite

    def _dataset_vocab(self) -> Optional[int]:
        try:
            return int(self.trainer.data_loader.dataset.vocab_size)  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - data loaders without a text dataset
            return None

    def _model(self) -> torch.nn.Module:
        return self.trainer.train_module.model  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ hooks
    def pre_train(self) -> None:
        if not self.enabled:
            return
        self._resolve()
        if self.eval_on_start:
            self.run_eval()

    def post_step(self) -> None:
        if not self.enabled or self.step % self.interval != 0:
            return
        if self._suite is None:
            self._resolve()
        self.run_eval()

    # ------------------------------------------------------------------ eval
    def run_eval(self) -> Dict[str, float]:
        """Run the suite now and record its metrics; returns them (name -> value)."""
        assert self._suite is not None
        t0 = time.monotonic()
        model = self._model()
        res = run_suite(model, self._suite, tokenizer=self._tokenizer, device=self.trainer.device)
        metrics = self._metrics(res)
        for name, value in metrics.items():
            self.trainer.record_metric(name, value, reduce_type=ReduceType.mean)
        seconds = time.monotonic() - t0
        self.trainer.record_metric(f"{self.prefix}/seconds", seconds, reduce_type=ReduceType.max)
        if self.log_table and res.tasks is not None:
            log.info("Long-context eval at step %d (%.1fs):\n%s", self.step, seconds, format_table(res.tasks))
        return metrics

    def _metrics(self, res: Any) -> Dict[str, float]:
        out: Dict[str, float] = {}
        p = self.prefix
        if res.tasks is not None:
            by_len: Dict[tuple, List[Any]] = {}
            for c in res.tasks.cells:
                by_len.setdefault((c.task, c.length), []).append(c)
            for task, summary in res.tasks.to_dict(include_examples=False)["summary"].items():
                out[f"{p}/{task}/acc"] = float(summary["accuracy"])
            for (task, length), cells in sorted(by_len.items()):
                n = sum(c.n_examples for c in cells)
                out[f"{p}/{task}/acc@{length}"] = sum(c.accuracy * c.n_examples for c in cells) / n
                out[f"{p}/{task}/query_acc@{length}"] = sum(c.query_accuracy * c.n_examples for c in cells) / n
        if res.perplexity is not None:
            for b in res.perplexity:
                if b.mean_loss is not None:
                    out[f"{p}/ppl/loss@{b.start}-{b.end}"] = float(b.mean_loss)
        return out
