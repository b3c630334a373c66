"""Terminal progress for a training run the demo started: one line per few steps, read from metrics.jsonl.

The trainer runs in a child process whose output goes to a log file (it is long and multi-rank);
the demo prints, every ``every_s`` seconds, the latest step with its residual, the fraction of groups
that deviated from the prior, seconds per step and the time left, so the terminal never goes silent.
It only reads the run's own ``metrics.jsonl`` (appended by rank 0), so it needs nothing from the ranks.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path


def last_metrics(path: Path) -> dict | None:
    """The last complete JSON line of ``path`` (None when there is none yet)."""
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        f.seek(0, 2)
        f.seek(max(0, f.tell() - 16384))
        lines = f.read().decode("utf-8", "replace").splitlines()
    for line in reversed(lines):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written
    return None


def format_progress(record: dict, total_steps: int, started_step: int, elapsed_s: float) -> str:
    """``step 40/200  residual +0.0031  deviating 0.013%  2.6 s/step  ETA 6.9 min``."""
    step = int(record.get("step", 0))
    parts = [f"step {step}/{total_steps}"]
    if "train/residual_mean" in record:
        parts.append(f"residual {record['train/residual_mean']:+.4f}")
    if "train/deviating_groups_frac" in record:
        parts.append(f"deviating {100 * record['train/deviating_groups_frac']:.3f}%")
    if "eval/ppl" in record:
        parts.append(f"val ppl {record['eval/ppl']:.2f}")
    done = step - started_step
    if done > 0:
        per_step = elapsed_s / done
        parts.append(f"{per_step:.1f} s/step")
        parts.append(f"ETA {(total_steps - step) * per_step / 60:.1f} min")
    return "  ".join(parts)


def wait_with_progress(proc: subprocess.Popen, metrics: Path, total_steps: int, every_s: float = 15.0,
                       prefix: str = "  ") -> int:
    """Wait for ``proc``, printing a progress line whenever the run has logged a new step."""
    start = last_metrics(metrics)
    started_step = int(start.get("step", 0)) if start else 0
    t_first, shown = None, None
    while True:
        try:
            return proc.wait(timeout=every_s)
        except subprocess.TimeoutExpired:
            pass
        record = last_metrics(metrics)
        if record is None or record.get("step") == shown:
            continue
        if t_first is None:  # time from the first logged step on: model loading and f(m0) are not steps
            t_first, started_step = time.time(), int(record.get("step", 0))
        shown = record.get("step")
        print(prefix + format_progress(record, total_steps, started_step, time.time() - t_first), flush=True)
