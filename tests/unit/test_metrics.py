"""Metrics sink (TensorBoard + JSONL, resume truncation, rank gating), progress bar, and run plots.

TensorBoard files are read back with TensorBoard's own EventAccumulator, the reader the UI uses.
"""

import json
import math
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from maskpro_ds.demo.plots import plot_run, ppl_bars, read_metrics, series
from maskpro_ds.train.metrics import MetricsLogger, ProgressBar

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


def read_tb(run_dir) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return acc


def scalars(acc: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def jsonl(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_scalars_reach_tensorboard_and_jsonl(tmp_path):
    with MetricsLogger(tmp_path, enabled=True) as m:
        for step in range(4):
            m.log(step, {"train/loss": 2.0 + 0.25 * step, "train/delta": torch.tensor(-1e-3 * step, dtype=torch.float64)})
        m.log_text("config", "model: tiny")
    acc = read_tb(tmp_path)
    assert set(acc.Tags()["scalars"]) == {"train/loss", "train/delta"}
    assert scalars(acc, "train/loss") == [(0, 2.0), (1, 2.25), (2, 2.5), (3, 2.75)]
    assert [s for s, _ in scalars(acc, "train/delta")] == [0, 1, 2, 3]
    assert scalars(acc, "train/delta")[3][1] == pytest.approx(-3e-3, rel=1e-6)  # stored as float32
    records = jsonl(tmp_path)
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert records[2]["train/loss"] == 2.5 and records[3]["train/delta"] == pytest.approx(-3e-3, rel=1e-12)
    assert all(isinstance(r["time"], float) for r in records)


def test_non_finite_values_are_null_in_jsonl_and_skipped_in_tensorboard(tmp_path):
    with MetricsLogger(tmp_path, enabled=True) as m:
        m.log(0, {"a": 1.0, "b": float("nan")})
        m.log(1, {"a": float("inf"), "b": 2.0})
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    records = [json.loads(line) for line in text.splitlines()]  # strict JSON: each line parses
    assert records[0]["b"] is None and records[1]["a"] is None
    acc = read_tb(tmp_path)
    assert scalars(acc, "a") == [(0, 1.0)]
    assert scalars(acc, "b") == [(1, 2.0)]


def test_resume_drops_records_after_the_checkpoint_step(tmp_path):
    with MetricsLogger(tmp_path, enabled=True) as m:
        for step in range(10):
            m.log(step, {"x": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 10, "x": 1')  # the line the crash cut short
    with MetricsLogger(tmp_path, enabled=True, resume_from=5) as m:  # the checkpoint of step 5
        assert [r["step"] for r in jsonl(tmp_path)] == [0, 1, 2, 3, 4, 5]
        for step in range(6, 9):
            m.log(step, {"x": 100.0 + step})
    records = jsonl(tmp_path)
    assert [r["step"] for r in records] == list(range(9))
    assert [r["x"] for r in records] == [0, 1, 2, 3, 4, 5, 106, 107, 108]
    # TensorBoard purges the orphaned steps 6..9 of the first run.
    assert scalars(read_tb(tmp_path), "x") == [(s, float(s)) for s in range(6)] + [(s, 100.0 + s) for s in range(6, 9)]


def test_truncate_after_returns_the_count_and_must_come_first(tmp_path):
    with MetricsLogger(tmp_path, enabled=True, tensorboard=False) as m:
        for step in range(5):
            m.log(step, {"x": 1.0})
    m = MetricsLogger(tmp_path, enabled=True, tensorboard=False)
    assert m.truncate_after(2) == 2
    m.log(3, {"x": 2.0})
    with pytest.raises(RuntimeError, match="before the first log"):
        m.truncate_after(1)
    m.close()
    assert [r["step"] for r in jsonl(tmp_path)] == [0, 1, 2, 3]
    assert not (tmp_path / "tb").exists()


def test_disabled_logger_writes_nothing(tmp_path):
    run = tmp_path / "run"
    m = MetricsLogger(run, enabled=False, resume_from=3)
    m.log(0, {"x": 1.0})
    m.log_text("t", "hello")
    assert m.truncate_after(0) == 0
    m.close()
    assert not run.exists()


def test_flush_every_batches_writes(tmp_path):
    m = MetricsLogger(tmp_path, enabled=True, tensorboard=False, flush_every=3)
    m.log(0, {"x": 1.0})
    m.log(1, {"x": 1.0})
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    m.log(2, {"x": 1.0})
    assert len(jsonl(tmp_path)) == 3
    m.close()


def test_progress_bar_follows_absolute_steps():
    bar = ProgressBar(total=10, initial=3, enabled=True, desc="train")
    bar.update(5, {"loss": 2.123456, "delta": torch.tensor(1e-4), "dev": None})
    assert bar._bar.n == 5
    assert bar._bar.postfix == "loss=2.123, delta=0.0001"
    bar.close()
    quiet = ProgressBar(total=10, initial=0, enabled=False, desc="train")
    quiet.update(4, {"loss": 1.0})
    quiet.close()


# ----------------------------------------------------------------------------------------- plots
def write_run(run_dir, *, with_eval=True, with_deviation=True):
    with MetricsLogger(run_dir, enabled=True, tensorboard=False) as m:
        for step in range(30):
            values = {
                "train/loss": 2.0 + 0.01 * math.sin(step),
                "train/baseline_loss": 2.0,
                "train/residual_mean": 1e-3 * math.cos(step),
                "train/residual_std": 5e-4,
                "train/delta": 1e-4 * step,
            }
            if with_deviation:
                values["train/deviating_groups_frac"] = step / 300
                values["train/mask_entropy"] = 0.01 + step / 1000
            if with_eval and step % 10 == 9:
                values["eval/ppl"] = 30.0 - step / 10
            m.log(step, values)


def is_png(path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


def test_plot_run_writes_the_four_plots(tmp_path):
    write_run(tmp_path)
    written = plot_run(tmp_path)
    names = sorted(p.name for p in written)
    assert names == ["deviation.png", "eval.png", "loss.png", "residuals.png"]
    assert all(is_png(p) for p in written)
    assert not list(tmp_path.glob(".tmp-*"))


def test_missing_keys_skip_their_plot(tmp_path):
    write_run(tmp_path, with_eval=False, with_deviation=False)
    assert sorted(p.name for p in plot_run(tmp_path)) == ["loss.png", "residuals.png"]
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_run(tmp_path / "elsewhere")


def test_series_skips_nulls_and_torn_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "a": 1.5}\n{"step": 1, "a": null}\n{"step": 2, "b": 3}\n{"step": 3, "a": 2')
    records = read_metrics(path)
    assert len(records) == 3
    assert series(records, "a") == ([0], [1.5])


def test_ppl_bars(tmp_path):
    out = ppl_bars(
        {"dense": 19.56, "magnitude": 3000.0, "wanda": 80.2, "sparsegpt": 60.1, "maskpro": float("nan")},
        tmp_path / "sub" / "ppl.png",
    )
    assert is_png(out)
    with pytest.raises(ValueError, match="no results"):
        ppl_bars({}, tmp_path / "empty.png")


def test_plot_run_tool(tmp_path):
    write_run(tmp_path, with_eval=False)
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "plot_run.py"), str(tmp_path)],
        capture_output=True, text=True, check=True, cwd=REPO,
    )
    assert sorted(line.rsplit("/", 1)[-1] for line in proc.stdout.split()) == [
        "deviation.png", "loss.png", "residuals.png"
    ]
