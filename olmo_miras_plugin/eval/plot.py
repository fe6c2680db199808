"""Plots: accuracy vs context length (or query distance / number of pairs) per task, one line per
model, and loss by token position.

Inputs are the JSON-able cell dicts of :meth:`EvalResults.to_dict` (``"cells"``), so a plot can be
redrawn from a results file without the model. matplotlib is imported lazily with the ``Agg``
backend (no display needed); it is an optional dependency (``pip install 'olmo-miras[eval]'``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .scoring import EvalResults, PositionBucket

__all__ = ["cells_of", "plot_accuracy", "plot_position_loss"]

CellDicts = List[Dict[str, Any]]
Cells = Union[EvalResults, Mapping[str, Any], CellDicts]


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - dev/eval extra
        raise ImportError("plotting needs matplotlib: pip install 'olmo-miras[eval]'") from e
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: Union[str, Path]) -> Path:
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def cells_of(results: Cells) -> CellDicts:
    """Cell dicts from ``EvalResults``, a results dict (``{"cells": [...]}``) or a list of cells."""
    if isinstance(results, EvalResults):
        return [dict(c.__dict__) for c in results.cells]
    if isinstance(results, Mapping):
        return list(results.get("cells", []))
    return list(results)


def _series(
    cells: CellDicts, task: str, x: str, metric: str, where: Mapping[str, Any]
) -> Tuple[List[float], List[float]]:
    """Mean of ``metric`` per value of ``x`` (weighted by examples) over cells matching ``where``."""
    acc: Dict[float, List[float]] = {}
    for c in cells:
        if c.get("task") != task or c.get(x) is None:
            continue
        if any(c.get(k) != v for k, v in where.items()):
            continue
        v = c.get(metric)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        n = float(c.get("n_examples", 1))
        s = acc.setdefault(float(c[x]), [0.0, 0.0])
        s[0] += float(v) * n
        s[1] += n
    xs = sorted(acc)
    return xs, [acc[k][0] / acc[k][1] for k in xs]


def plot_accuracy(
    results_by_model: Mapping[str, Cells],
    path: Union[str, Path],
    *,
    x: str = "length",
    metric: str = "accuracy",
    tasks: Optional[Sequence[str]] = None,
    where: Optional[Mapping[str, Any]] = None,
    title: Optional[str] = None,
    chance: Optional[Mapping[str, float]] = None,
    vlines: Optional[Mapping[str, float]] = None,
) -> Path:
    """One subplot per task: ``metric`` vs ``x`` (``length``, ``distance``, ``n_pairs`` or
    ``depth``), one line per model. ``where`` keeps only cells with those field values (e.g.
    ``{"n_pairs": 16}``); ``chance`` draws a dashed line per task; ``vlines`` labelled vertical
    lines (e.g. the attention window). Log-2 x axis for lengths/distances. Returns the path."""
    plt = _pyplot()
    where = dict(where or {})
    per_model = {m: cells_of(r) for m, r in results_by_model.items()}
    if tasks is None:
        seen: List[str] = []
        for cells in per_model.values():
            for c in cells:
                if c.get("task") not in seen and c.get(x) is not None:
                    seen.append(c["task"])
        tasks = seen
    if not tasks:
        raise ValueError(f"no cells with a '{x}' value to plot")
    n = len(tasks)
    cols = min(n, 3)
    rows = int(math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.8 * cols, 3.6 * rows), squeeze=False)
    for k, task in enumerate(tasks):
        ax = axes[k // cols][k % cols]
        for model, cells in per_model.items():
            xs, ys = _series(cells, task, x, metric, where)
            if xs:
                ax.plot(xs, ys, marker="o", label=model)
        if chance and task in chance:
            ax.axhline(chance[task], color="grey", linestyle="--", linewidth=1, label="chance")
        for label, xv in (vlines or {}).items():
            ax.axvline(xv, color="tab:red", linestyle=":", linewidth=1)
            ax.text(xv, 0.5, f" {label}", color="tab:red", fontsize=8, rotation=90, va="center", ha="right")
        if x in ("length", "distance", "n_pairs"):
            ax.set_xscale("log", base=2)
            ticks = sorted({v for cells in per_model.values() for v in _series(cells, task, x, metric, where)[0]})
            if ticks:
                ax.set_xticks(ticks)
                ax.set_xticklabels([f"{int(t)}" if float(t).is_integer() else f"{t:g}" for t in ticks], fontsize=8)
                ax.minorticks_off()
        ax.set_ylim(-0.03, 1.05)
        ax.set_xlabel(x.replace("_", " "))
        ax.set_ylabel(metric.replace("_", " "))
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for k in range(n, rows * cols):
        axes[k // cols][k % cols].axis("off")
    if title:
        fig.suptitle(title)
    return _save(plt, fig, path)


def plot_position_loss(
    buckets_by_model: Mapping[str, Sequence[Union[PositionBucket, Mapping[str, Any]]]],
    path: Union[str, Path],
    *,
    title: Optional[str] = None,
) -> Path:
    """Mean loss per position bucket (x: bucket midpoint, log-2), one line per model."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for model, buckets in buckets_by_model.items():
        xs, ys = [], []
        for b in buckets:
            d = b if isinstance(b, Mapping) else b.__dict__
            if d.get("mean_loss") is not None:
                xs.append((d["start"] + d["end"]) / 2)
                ys.append(d["mean_loss"])
        if xs:
            ax.plot(xs, ys, marker="o", label=model)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("token position (bucket midpoint)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or "loss by position")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)
