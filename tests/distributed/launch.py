"""One helper to start real multi-rank runs (torchrun, deepspeed, mpirun) on CPU/gloo for the tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from maskpro_ds.train.local_launch import child_env, free_port

REPO = Path(__file__).resolve().parents[2]
TRAIN = str(REPO / "launchers" / "train.py")
BIN = Path(sys.executable).parent


def base_env(**extra: str) -> dict[str, str]:
    return child_env(**extra)


def run(cmd: list[str], *, env: dict[str, str] | None = None, timeout: int = 240, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=env or base_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                             f"--- stderr\n{proc.stderr[-6000:]}")
    return proc


def torchrun(nproc: int, args: list[str], **kw) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), TRAIN, *args]
    return run(cmd, **kw)


def train_args(config: Path | str, **overrides: object) -> list[str]:
    out = ["--config", str(config)]
    for key, value in overrides.items():
        out.append(f"--{key.replace('__', '.')}={value}")
    return out
