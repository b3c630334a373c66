"""The demo's stage bookkeeping: when an export on disk still matches the run's checkpoint."""

from __future__ import annotations

import json

from maskpro_ds.demo.run import export_is_current


def _checkpoints(run, steps, pointer_to):
    ckpts = run / "checkpoints"
    for step in steps:
        (ckpts / f"step-{step:06d}").mkdir(parents=True)
        (ckpts / f"step-{step:06d}" / "manifest.json").write_text("{}")
    (ckpts / "best").write_text(f"step-{pointer_to:06d}\n")
    return ckpts


def _export_of(out, step_dir):
    out.mkdir(parents=True, exist_ok=True)
    (out / "export.json").write_text(json.dumps({"source": {"kind": "checkpoint", "path": str(step_dir)}}))


def test_export_of_the_pointed_step_is_current(tmp_path):
    ckpts = _checkpoints(tmp_path / "run", [800], pointer_to=800)
    _export_of(tmp_path / "export", ckpts / "step-000800")
    assert export_is_current(ckpts / "best", tmp_path / "export")


def test_export_is_stale_once_a_resumed_run_moves_the_pointer(tmp_path):
    ckpts = _checkpoints(tmp_path / "run", [800, 1500], pointer_to=1500)
    _export_of(tmp_path / "export", ckpts / "step-000800")
    assert not export_is_current(ckpts / "best", tmp_path / "export")
    assert export_is_current(ckpts / "step-000800", tmp_path / "export")


def test_no_export_or_no_source_is_not_current(tmp_path):
    ckpts = _checkpoints(tmp_path / "run", [100], pointer_to=100)
    assert not export_is_current(ckpts / "best", tmp_path / "export")
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "export.json").write_text("{}")
    assert not export_is_current(ckpts / "best", tmp_path / "export")
