"""The demo's terminal progress (read from a live run's metrics.jsonl) and its bar chart's labels."""

from __future__ import annotations

import json
import subprocess
import sys

import matplotlib.pyplot as plt

from maskpro_ds.demo.plots import ppl_figure
from maskpro_ds.demo.progress import format_progress, last_metrics, wait_with_progress


def test_last_metrics_skips_a_line_being_written(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert last_metrics(path) is None
    path.write_text(json.dumps({"step": 1}) + "\n" + json.dumps({"step": 2}) + "\n" + '{"step": 3, "tr')
    assert last_metrics(path) == {"step": 2}


def test_progress_line_has_step_residual_deviation_and_eta():
    record = {"step": 40, "train/residual_mean": 0.00312, "train/deviating_groups_frac": 0.00013}
    line = format_progress(record, total_steps=200, started_step=0, elapsed_s=100.0)
    assert line.startswith("step 40/200")
    assert "residual +0.0031" in line and "deviating 0.013%" in line
    assert "2.5 s/step" in line and "ETA 6.7 min" in line  # 160 steps left at 2.5 s


def test_wait_with_progress_prints_while_a_child_logs_steps(tmp_path, capsys):
    metrics = tmp_path / "metrics.jsonl"
    child = (
        "import json, sys, time\n"
        f"path = {str(metrics)!r}\n"
        "for step in range(1, 5):\n"
        "    with open(path, 'a') as f:\n"
        "        f.write(json.dumps({'step': step, 'train/residual_mean': 0.01 * step}) + '\\n')\n"
        "    time.sleep(0.3)\n"
        "sys.exit(3)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", child])
    assert wait_with_progress(proc, metrics, total_steps=4, every_s=0.2) == 3  # the child's exit code
    lines = [line for line in capsys.readouterr().out.splitlines() if "step" in line]
    assert len(lines) >= 2  # more than one update while the child ran
    steps = [int(line.split()[1].split("/")[0]) for line in lines]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)  # each new step printed once


def test_bar_chart_labels_do_not_overlap():
    rows = {"dense": 16.0, "magnitude 2:4": 2500.0, "Wanda 2:4": 122.9, "SparseGPT 2:4 (mask only)": 79.8,
            "SparseGPT 2:4 (weights changed)": 45.0, "MaskPro warm start (swap search)": 65.4,
            "MaskPro 2:4 (from SparseGPT)": 60.0, "MaskPro 2:4 + weight update": 50.0}
    fig = ppl_figure(rows)
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        boxes = [t.get_window_extent(renderer) for t in fig.axes[0].get_yticklabels() if t.get_text()]
        assert len(boxes) == len(rows)
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                assert not a.overlaps(b)
        assert all(box.x0 >= 0 for box in boxes)  # inside the figure: nothing cut off on the left
    finally:
        plt.close(fig)
