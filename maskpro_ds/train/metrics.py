"""The metrics sink of a run: TensorBoard scalars, a JSONL log, and a progress bar, on rank 0.

One small interface (:class:`MetricsLogger`) so the trainer never touches a writer directly. Every
other rank builds it with ``enabled=False`` and every call is a no-op, so call sites need no
``if rank == 0``.

Files under the run directory:

* ``tb/``: TensorBoard event files (``tensorboard --logdir <run>/tb``), tags as given (``train/loss``).
* ``metrics.jsonl``: one JSON object per :meth:`MetricsLogger.log` call,
  ``{"step": int, "time": unix seconds, "<tag>": float | null, ...}``. A non-finite value is written
  as ``null`` (so every line is valid JSON) and skipped in TensorBoard. This file is what
  :mod:`maskpro_ds.plots` reads.

Resume: a run resumed from the checkpoint of step ``k`` appends, after dropping the records with
``step > k`` (logged after that checkpoint by the run that died) from the JSONL and purging them from
TensorBoard; so the log of a resumed run has each step once.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import time
from pathlib import Path

from tqdm import tqdm

from maskpro_ds.formats.atomic import atomic_write_text

log = logging.getLogger(__name__)

JSONL_NAME = "metrics.jsonl"
TB_DIR = "tb"


def _as_float(value) -> float:
    """A Python float from a float, int, numpy scalar or one-element tensor."""
    if hasattr(value, "item"):
        value = value.item()
    if not isinstance(value, numbers.Real):
        raise TypeError(f"metric values must be real numbers, got {type(value).__name__}: {value!r}")
    return float(value)


class MetricsLogger:
    """TensorBoard + JSONL sink; every method is a no-op when ``enabled`` is False (ranks > 0)."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        enabled: bool,
        tensorboard: bool = True,
        jsonl: bool = True,
        flush_every: int = 1,
        resume_from: int | None = None,
    ):
        if flush_every <= 0:
            raise ValueError(f"metrics.flush_every must be positive, got {flush_every}")
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.jsonl_path = self.run_dir / JSONL_NAME
        self.tb_dir = self.run_dir / TB_DIR
        self._use_tb = tensorboard
        self._use_jsonl = jsonl
        self._flush_every = flush_every
        self._since_flush = 0
        self._purge_step: int | None = None
        self._writer = None  # SummaryWriter, created on first use so truncate_after can set purge_step
        self._file = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_from is not None:
            self.truncate_after(resume_from)

    # ------------------------------------------------------------------------------------- writers
    def _tb(self):
        if self._writer is None:
            # Deferred import: torch.utils.tensorboard pulls in tensorboard (~1 s), only rank 0 needs it.
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.tb_dir), purge_step=self._purge_step)
        return self._writer

    def _jsonl(self):
        if self._file is None:
            self._file = open(self.jsonl_path, "a", encoding="utf-8")
        return self._file

    # ------------------------------------------------------------------------------------------ api
    def truncate_after(self, step: int) -> int:
        """Keep the records up to and including ``step``; drop later ones from the JSONL and purge
        them from TensorBoard.

        ``step`` is the step of the checkpoint being resumed (the next record logged is for a later
        step). Lines that do not parse (a write cut by the crash) are dropped too. Returns how many
        records were dropped. Call before the first :meth:`log`.
        """
        if not self.enabled:
            return 0
        if self._writer is not None or self._file is not None:
            raise RuntimeError("MetricsLogger.truncate_after must be called before the first log call")
        self._purge_step = step + 1  # SummaryWriter hides events with step >= purge_step
        if not self._use_jsonl or not self.jsonl_path.exists():
            return 0
        kept, dropped = [], 0
        for line in self.jsonl_path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                keep = int(record["step"]) <= step
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                keep = False
            if keep:
                kept.append(line)
            else:
                dropped += 1
        if dropped:
            atomic_write_text(self.jsonl_path, "".join(line + "\n" for line in kept))
            log.info("metrics: dropped %d records after step %d from %s", dropped, step, self.jsonl_path)
        return dropped

    def log(self, step: int, values: dict[str, float]) -> None:
        """Record scalars for ``step``: TensorBoard scalars and one JSONL line."""
        if not self.enabled:
            return
        floats = {tag: _as_float(v) for tag, v in values.items()}
        if self._use_tb:
            writer = self._tb()
            for tag, v in floats.items():
                if math.isfinite(v):
                    writer.add_scalar(tag, v, global_step=step)
        if self._use_jsonl:
            record = {"step": int(step), "time": time.time()}
            record.update({tag: (v if math.isfinite(v) else None) for tag, v in floats.items()})
            self._jsonl().write(json.dumps(record, allow_nan=False) + "\n")
        self._since_flush += 1
        if self._since_flush >= self._flush_every:
            self.flush()

    def log_text(self, tag: str, text: str, step: int = 0) -> None:
        """A text entry in TensorBoard (e.g. the resolved config); not written to the JSONL."""
        if not self.enabled or not self._use_tb:
            return
        self._tb().add_text(tag, text, global_step=step)

    def flush(self) -> None:
        if not self.enabled:
            return
        if self._file is not None:
            self._file.flush()
        if self._writer is not None:
            self._writer.flush()
        self._since_flush = 0

    def close(self) -> None:
        """Flush and close; safe to call twice."""
        if not self.enabled:
            return
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _format_postfix(postfix: dict) -> dict[str, str]:
    out = {}
    for k, v in postfix.items():
        if v is None:  # a value not computed this step
            continue
        if hasattr(v, "item"):
            v = v.item()
        out[k] = f"{v:.4g}" if isinstance(v, float) else str(v)
    return out


class ProgressBar:
    """A tqdm bar positioned by absolute step (so a resumed run starts at ``initial``); rank 0 only."""

    def __init__(self, total: int, initial: int, enabled: bool, desc: str):
        self._bar = tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True)
        self._enabled = enabled

    def update(self, step: int, postfix: dict | None = None) -> None:
        """Move the bar to ``step`` (steps done) and show ``postfix`` (floats to 4 significant digits)."""
        if not self._enabled:
            return
        if postfix:
            self._bar.set_postfix(_format_postfix(postfix), refresh=False)
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        self._bar.close()
