"""Plots of a run, drawn from its ``metrics.jsonl`` (see :mod:`maskpro_ds.metrics`), and the
perplexity bar chart of a comparison.

:func:`plot_run` writes into the run directory:

* ``residuals.png``: the residual f(m_t) - f(m0) (mean over ranks, band = ± std over ranks) and the
  tracker δ, per step (``train/residual_mean``, ``train/residual_std``, ``train/delta``).
* ``deviation.png``: fraction of groups whose top-N differs from the prior, and the mean mask
  entropy (``train/deviating_groups_frac``, ``train/mask_entropy``).
* ``eval.png``: every ``eval/*`` key against step, one panel each.
* ``loss.png``: ``train/loss`` and ``train/baseline_loss``.

A plot whose keys are all absent is skipped. Matplotlib runs on the Agg backend (no display).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import uuid
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

from maskpro_ds.formats.atomic import TMP_PREFIX  # noqa: E402
from maskpro_ds.train.metrics import JSONL_NAME  # noqa: E402


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl``, in file order; a line that does not parse is skipped
    (the last line of a run killed mid-write)."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key`` over the records that have a finite value for it."""
    steps, values = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v) and "step" in r:
            steps.append(int(r["step"]))
            values.append(float(v))
    return steps, values


def _save(fig, path: Path) -> Path:
    """Save as PNG beside the final name, then rename (a reader never sees half a file)."""
    tmp = path.parent / f"{TMP_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}"
    try:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return path


def _plot_residuals(records: list[dict], path: Path) -> Path | None:
    s_mean, mean = series(records, "train/residual_mean")
    s_delta, delta = series(records, "train/delta")
    if not mean and not delta:
        return None
    fig, ax = plt.subplots(figsize=(8, 4))
    if mean:
        ax.plot(s_mean, mean, lw=0.8, label="residual mean over ranks")
        std_by_step = dict(zip(*series(records, "train/residual_std"), strict=True))
        if std_by_step:
            lo = [m - std_by_step.get(s, 0.0) for s, m in zip(s_mean, mean, strict=True)]
            hi = [m + std_by_step.get(s, 0.0) for s, m in zip(s_mean, mean, strict=True)]
            ax.fill_between(s_mean, lo, hi, alpha=0.25, label="± std over ranks")
    if delta:
        ax.plot(s_delta, delta, lw=1.5, label="tracker δ")
    ax.axhline(0.0, color="black", lw=0.5)
    ax.set_xlabel("step")
    ax.set_ylabel("f(m_t) − f(m0)")
    ax.set_title("loss residual against the prior mask")
    ax.legend()
    return _save(fig, path)


def _plot_panels(records: list[dict], keys: list[str], path: Path, title: str, marker: str = "") -> Path | None:
    present = [k for k in keys if series(records, k)[0]]
    if not present:
        return None
    fig, axes = plt.subplots(len(present), 1, figsize=(8, 2.8 * len(present)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], present, strict=True):
        steps, values = series(records, key)
        ax.plot(steps, values, marker=marker, lw=1.0)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].set_title(title)
    return _save(fig, path)


def _plot_loss(records: list[dict], path: Path) -> Path | None:
    lines = [(k, *series(records, k)) for k in ("train/loss", "train/baseline_loss")]
    lines = [(k, s, v) for k, s, v in lines if s]
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(8, 4))
    for key, steps, values in lines:
        ax.plot(steps, values, lw=0.8, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("training loss: sampled mask vs prior mask")
    ax.legend()
    return _save(fig, path)


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write the PNGs of ``run_dir`` from its metrics.jsonl; returns the files written."""
    run_dir = Path(run_dir)
    jsonl = run_dir / JSONL_NAME
    if not jsonl.is_file():
        raise FileNotFoundError(f"{run_dir}: no {JSONL_NAME}; is this a training run directory?")
    records = read_metrics(jsonl)
    eval_keys = sorted({k for r in records for k in r if k.startswith("eval/")})
    written = [
        _plot_residuals(records, run_dir / "residuals.png"),
        _plot_panels(
            records,
            ["train/deviating_groups_frac", "train/mask_entropy"],
            run_dir / "deviation.png",
            "mask drift from the prior",
        ),
        _plot_panels(records, eval_keys, run_dir / "eval.png", "evaluation", marker="o"),
        _plot_loss(records, run_dir / "loss.png"),
    ]
    return [p for p in written if p is not None]


def ppl_bars(results: dict[str, float], path: str | Path, *, title: str = "perplexity (lower is better)") -> Path:
    """Bar chart of perplexity per method (in the given order), values printed on the bars.

    A log scale is used when the values span more than 20x (magnitude pruning is often 10-100x
    worse than the rest). Non-finite values are drawn as an empty bar labelled "n/a".
    """
    if not results:
        raise ValueError("ppl_bars: no results to plot")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _save(ppl_figure(results, title), path)


def ppl_figure(results: dict[str, float], title: str = "perplexity (lower is better)"):
    """The figure of :func:`ppl_bars` (not saved)."""
    names = list(results)
    values = [float(results[n]) for n in names]
    finite = [v for v in values if math.isfinite(v) and v > 0]
    # Horizontal bars: long method names sit on the y axis, one per line, and never overlap.
    fig, ax = plt.subplots(figsize=(8, 0.55 * len(names) + 1.5))
    widths = [v if math.isfinite(v) and v > 0 else 0.0 for v in values]
    bars = ax.barh(names, widths, color=[f"C{i}" for i in range(len(names))])
    ax.invert_yaxis()  # the first row on top, as in the table
    if finite and max(finite) / min(finite) > 20:
        ax.set_xscale("log")
    floor = min(finite) if finite else 0.0  # where an "n/a" label sits (0 is off a log axis)
    for bar, v in zip(bars, values, strict=True):
        ok = math.isfinite(v) and v > 0
        ax.annotate(f" {v:.2f}" if ok else " n/a", (v if ok else floor, bar.get_y() + bar.get_height() / 2),
                    ha="left", va="center", fontsize=9)
    ax.margins(x=0.15)
    ax.set_xlabel("perplexity")
    ax.set_title(title)
    fig.tight_layout()
    return fig
