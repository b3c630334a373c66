"""The 70B-shaped training run (bench/seventy_b_shaped.py) as a slow test: 2 ranks, one LLaMA-2-70B
decoder layer, ZeRO-3 partition = formula, logits = 4d/R, steady-state memory bounded by one layer,
streaming export checked against the base. Needs ~17 GB of free RAM and ~5 minutes on 2 cores."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.distributed.launch import REPO


@pytest.mark.slow
def test_70b_shaped_run(tmp_path):
    results = tmp_path / "seventy_b_shaped.json"
    proc = subprocess.run([sys.executable, "-m", "bench.seventy_b_shaped", "--work", str(tmp_path / "w"),
                           "--results", str(results)], cwd=REPO, capture_output=True, text=True, timeout=3600)
    print(proc.stdout[-3000:])
    assert proc.returncode == 0, proc.stderr[-5000:]
    got = json.loads(results.read_text())
    assert got["ok"] and got["world_size"] == 2
    assert all(r["param_local_numel"] == r["param_formula"] for r in got["ranks"])
    assert got["export"]["rows_checked"] > 0
