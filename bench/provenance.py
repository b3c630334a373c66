"""Where a bench result was measured: the git commit and the CPU (every results JSON records them)."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def git_commit() -> str | None:
    """HEAD of this checkout, or None outside a git checkout (or without git)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def cpu_name() -> str:
    """The CPU model, and whether it has native bf16 (timings compare only within one kind of CPU)."""
    name, bf16 = "unknown", False
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name == "unknown":
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                bf16 = "avx512_bf16" in line.split()
    except OSError:
        pass
    return f"{name}, {'AVX-512 BF16' if bf16 else 'no native bf16'}"
