"""maskpro-gpu-check: the path without CUDA (plan, imports, the CPU half of the sampling check, the
report's schema), usage errors, and, on a CUDA machine, the whole check."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from maskpro_ds.cli import gpu_check
from maskpro_ds.masks.nm import nm_violations
from maskpro_ds.masks.sampling import masks_to_codes, sample_masks
from maskpro_ds.train import device_check

REPO = Path(__file__).resolve().parents[2]
CHECK_NAMES = ["imports", "kernel_probe", "cross_device_sampling", "zero3_run", "sparse_linear"]
TOP_LEVEL = {"format", "version", "started", "cuda", "device", "capability", "gpus", "plan", "checks", "seconds", "ok"}


def _run_without_cuda(out: Path) -> subprocess.CompletedProcess:
    # A child with no visible GPU: the same path a CPU-only machine takes, even on a CUDA machine.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "maskpro_ds.cli.gpu_check", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def cpu_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check") / "results" / "gpu_check.json"
    proc = _run_without_cuda(out)
    return proc, out


def test_without_cuda_it_says_so_and_exits_0(cpu_report):
    proc, out = cpu_report
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no CUDA device here" in proc.stdout
    assert f"wrote {out}" in proc.stdout
    # written atomically: only the report in its directory, no temp file left behind
    assert [p.name for p in out.parent.iterdir()] == ["gpu_check.json"]


def test_report_schema_without_cuda(cpu_report):
    report = json.loads(cpu_report[1].read_text())
    assert set(report) == TOP_LEVEL
    assert (report["format"], report["version"]) == ("maskpro_ds.gpu_check", 1)
    assert (report["cuda"], report["device"], report["capability"], report["gpus"]) == (False, None, None, 0)
    assert report["ok"] is True and report["seconds"] >= 0
    assert [entry["check"] for entry in report["plan"]] == CHECK_NAMES == list(report["checks"])
    runs = {entry["check"]: entry["runs"] for entry in report["plan"]}
    assert runs == {"imports": True, "kernel_probe": False, "cross_device_sampling": True, "zero3_run": False,
                    "sparse_linear": False}
    for entry in report["plan"]:
        assert entry["what"]
        assert ("why_not" in entry) == (not entry["runs"])
        assert "ranks" not in entry  # the ZeRO-3 run's rank count is planned only with a GPU
    checks = report["checks"]
    for name in ("kernel_probe", "zero3_run", "sparse_linear"):
        assert checks[name]["status"] == "skipped"
        assert checks[name]["reason"] == "needs a CUDA device"
    assert checks["sparse_linear"]["shape"] == [11008, 4096]
    # no ZeRO-3 run started: no figures from one
    assert set(checks["zero3_run"]) == {"status", "reason"}


def test_imports_check_without_cuda(cpu_report):
    imports = json.loads(cpu_report[1].read_text())["checks"]["imports"]
    assert imports["status"] == "pass"
    assert imports["torch"] == torch.__version__
    assert imports["modules"] == {name: "ok" for name in gpu_check.NEEDED_MODULES}
    assert isinstance(imports["to_sparse_semi_structured"], bool)


def test_cpu_half_of_the_sampling_check_is_computed(cpu_report):
    sampling = json.loads(cpu_report[1].read_text())["checks"]["cross_device_sampling"]
    assert sampling["status"] == "pass"
    assert "CPU half" in sampling["reason"]
    assert sampling["cpu_strict_2_of_4"] is True and sampling["cpu_chunking_free"] is True
    assert "device_sha256" not in sampling
    assert sampling["groups"] == device_check.SAMPLING_GROUPS
    assert [int(k, 16) for k in sampling["keys"]] == list(device_check.SAMPLING_KEYS)
    # Recompute the masks one key at a time through the public sampler, check them strict 2:4 and
    # hash their codes the way the report describes: the child process's digest must match.
    logits = device_check.sampling_inputs()
    rows = []
    for key in device_check.SAMPLING_KEYS:
        masks = sample_masks(logits, 2, key, group_offset=sampling["group_offset"])
        assert masks.shape == (device_check.SAMPLING_GROUPS, 4)
        assert nm_violations(masks, 2, 4).numel() == 0
        rows.append(masks_to_codes(masks))
    codes = torch.stack(rows)
    assert codes.dtype == torch.uint8
    assert sampling["cpu_sha256"] == hashlib.sha256(codes.numpy().tobytes()).hexdigest()


def test_plan_with_gpus():
    for gpus, ranks in ((1, 1), (2, 2), (8, 2)):
        entries = gpu_check.plan(True, gpus)
        assert all(entry["runs"] for entry in entries)
        assert next(e for e in entries if e["check"] == "zero3_run")["ranks"] == ranks


def test_memory_model_terms_add_up():
    facts = {"params": 1000, "masked": 800, "layer_weights": 100, "largest_linear": 40, "hidden": 8,
             "intermediate": 16, "vocab": 50, "max_live": 10**9}
    one = device_check.memory_model(ranks=2, tokens=4, **facts)
    assert one["total"] == sum(one["terms"].values())
    assert one["terms"]["base_partition"] == 2 * 1000 // 2 and one["terms"]["logits"] == 4 * 800 // 2
    assert one["terms"]["mask_cache"] == 800 // 8  # d/8 whatever R
    assert device_check.memory_model(ranks=4, tokens=4, **facts)["terms"]["mask_cache"] == 800 // 8
    assert device_check.memory_model(ranks=2, tokens=4, draws=3, **facts)["terms"]["mask_cache"] == 3 * 800 // 8


def test_out_that_is_a_directory_exits_2_naming_the_option(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and str(tmp_path) in err
    assert list(tmp_path.iterdir()) == []  # refused before any check ran or anything was written


def test_cache_dir_that_is_a_file_exits_2_naming_the_option(tmp_path, capsys):
    blocker = tmp_path / "cache"
    blocker.write_text("")
    assert gpu_check.main(["--out", str(tmp_path / "r.json"), "--cache-dir", str(blocker)]) == 2
    assert "--cache-dir" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_unknown_option_exits_2_naming_it(capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_check.main(["--bogus"])
    assert exc.value.code == 2
    assert "--bogus" in capsys.readouterr().err


@pytest.mark.gpu
def test_full_check_on_cuda(tmp_path):
    out = tmp_path / "gpu_check.json"
    code = gpu_check.main(["--out", str(out), "--cache-dir", str(REPO / ".cache" / "demo")])
    report = json.loads(out.read_text())
    checks = report["checks"]
    assert code == 0, json.dumps(checks, indent=1)
    assert report["cuda"] is True and report["gpus"] >= 1 and report["ok"] is True
    assert checks["kernel_probe"]["status"] == "pass"
    assert checks["kernel_probe"]["masked_weight_bits_equal"] and checks["kernel_probe"]["kernels"] == "compiled"
    sampling = checks["cross_device_sampling"]
    assert sampling["status"] == "pass" and sampling["device_sha256"] == sampling["cpu_sha256"]
    run = checks["zero3_run"]
    if run["status"] == "pass":
        assert run["ranks"] == min(2, report["gpus"]) and run["backend"] == "nccl"
        assert run["step_over_forward"] > 0 and run["peak_gpu_memory_bytes"] > 0
        assert run["predicted_gpu_memory"]["total"] > 0
    else:  # only when the SmolLM2 assets cannot be prepared on this machine
        assert run["status"] == "skipped" and "demo assets" in run["reason"]
    linear = checks["sparse_linear"]
    if report["capability"] >= [8, 0]:
        assert linear["status"] == "pass" and linear["semi_structured_ms"] > 0
    else:
        assert linear["status"] == "skipped"
