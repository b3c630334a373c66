"""Helpers for the launch tests: what a run directory says (logged steps, checkpoints, final logits) and
waiting for a background run to reach a step."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import torch

from maskpro_ds.formats.checkpoint_format import load_layer_logits, read_manifest


def logged_steps(run_dir: Path) -> list[int]:
    """Steps in metrics.jsonl (rank 0 logs each step once it is complete); a partial last line is skipped."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(int(json.loads(line)["step"]))
        except (json.JSONDecodeError, KeyError):
            pass
    return steps


def latest_step(run_dir: Path) -> int:
    name = (run_dir / "checkpoints" / "latest").read_text().strip()
    return int(name.removeprefix("step-"))


def final_logits(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    manifest = read_manifest(run_dir / "checkpoints" / f"step-{step:06d}")
    return {layer.name: load_layer_logits(manifest, layer.name) for layer in manifest.layers}


def assert_same_logits(run_dir: Path, reference: Path, step: int) -> None:
    got, want = final_logits(run_dir, step), final_logits(reference, step)
    assert list(got) == list(want)
    for name in want:
        assert torch.equal(got[name], want[name]), f"{name}: max diff {(got[name] - want[name]).abs().max()}"


def wait_for_step(run_dir: Path, step: int, timeout: float, proc: subprocess.Popen | None = None) -> int:
    """Poll until rank 0 has logged ``step``; returns the last logged step. Fails if ``proc`` ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = logged_steps(run_dir)
        if steps and steps[-1] >= step:
            return steps[-1]
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"the run ended (exit {proc.returncode}) before step {step}:\n{out[-5000:]}")
        time.sleep(0.02)
    raise AssertionError(f"{run_dir}: step {step} not reached in {timeout:.0f} s")
