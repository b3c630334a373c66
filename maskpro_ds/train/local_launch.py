"""Starting local multi-rank runs from Python (benches, tests): a free loopback port and a clean env.

A child launcher must not inherit a parent's rank variables (it would think it is already one
rank of a job), and on CPU every rank runs one intra-op thread on DeepSpeed's CPU accelerator.
"""

from __future__ import annotations

import os
import socket

RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment minus rank variables, set up for CPU ranks, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    env.update(extra)
    return env
