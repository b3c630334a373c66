"""Test harness: the environment every test runs under, set before torch is imported.

One intra-op thread (two make small ops ~100x slower on 2-core machines), DeepSpeed on the CPU
accelerator, no hub access, and a per-checkout cache for DeepSpeed's JIT-built ops so a stale lock
from another checkout can never hang a run.
"""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".cache" / "torch_extensions"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
