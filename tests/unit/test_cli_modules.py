"""Every ``python -m maskpro_ds.cli.X`` the docs and the demo use runs that command (a module without a
``__main__`` block would exit 0 having done nothing)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module,prog", [
    ("maskpro_ds.cli.export", "maskpro-export"),
    ("maskpro_ds.cli.prior", "maskpro-prior"),
    ("maskpro_ds.cli.train", "maskpro-train"),
    ("maskpro_ds.cli.demo", "maskpro-demo"),
])
def test_module_runs_its_command(module, prog):
    proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout and prog in proc.stdout


def test_export_module_reports_a_bad_checkpoint(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "maskpro_ds.cli.export", str(tmp_path / "missing"), "--base",
                           str(tmp_path), "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "missing" in proc.stderr
