"""Export throughput and memory with 1 and 2 worker processes, side by side with a raw read of the same files.

Builds a synthetic bf16 base with Llama-shaped layers and a matching 2-rank fp32 checkpoint, reads
every input once so the page cache is warm for all measurements (dropping the cache needs root
and would not be comparable anyway), then in the same run:
  0. the checksum pre-check of the checkpoint (sha256 of its shards), timed apart -> checksum GB/s
  1. raw sequential read of the base weight files (16 MB reads)          -> read GB/s
  2. the export in a fresh subprocess with --workers 1 and 2, alternating, ``--repeats`` times each
     (time around the call, CPU time of the process and its workers, peak RSS) -> GB/s of base weights,
     writing into RAM (``--ram-dir``, tmpfs: the pass itself, storage excluded) and, in the same
     rotation, to the disk under ``--workdir`` (fsync'd), next to a plain fsync'd write of as many
     bytes (the disk's own bound: a 2-core VM's disk caps the 2-worker figure there);
     in the same rotation 1 worker forced onto the numpy kernel (MASKPRO_EXPORT_KERNEL=numpy) -> what
     the compiled block pass (export/native.py) buys, and ``kernel`` says which one the export used
  3. the same subprocess importing everything and exporting nothing      -> interpreter baseline RSS
  4. model_fingerprint over the base                                     -> hashing GB/s (the default pre-check)
The export figure is the pass after the two pre-checks (checksums, fingerprint), which are reported
as rates of their own; the pass includes writing and fsync-ing the outputs. ``end_to_end_*`` adds
the checksum pass, which every export runs; the 70B estimate "with checks" adds both.
Figures are medians over the repeats; the load average before and after is recorded, since other
jobs on the machine slow every figure. Writes bench/results/export.json and prints a table row. The
70B estimates scale the measured rates to 140 GB of bf16 weights (+ 280 GB of fp32 logits, in the
same proportion as here); the 16-core one assumes the 2-worker efficiency holds and storage keeps up.

    python -m bench.export [--hidden 8192 --intermediate 28672 --kv 1024 --layers 1] [--formats hf-dense,mask]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import json, os, resource, sys, time
import torch

def peak_rss():  # VmHWM: this process image only (ru_maxrss would carry the parent's peak across exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

from maskpro_ds.export.native import status
from maskpro_ds.export.pipeline import run_export
from maskpro_ds.export.sources import CheckpointMasks
step, base, out, formats, workers, max_shard = sys.argv[1:7]
torch.set_num_threads(1)
t_check = time.perf_counter()
source = CheckpointMasks(step)  # reads the manifest and checks every shard's sha256 (the pre-check)
t0, c0 = time.perf_counter(), os.times()
check_seconds = t0 - t_check
if formats != "none":
    run_export(source, base, out, formats, fingerprint_check=False, progress=False, workers=int(workers),
               max_shard_size=max_shard)
elapsed, c1 = time.perf_counter() - t0, os.times()
source.close()
cpu = sum(getattr(c1, k) - getattr(c0, k) for k in ("user", "system", "children_user", "children_system"))
workers_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # largest worker process
print(json.dumps({"kernel": status(), "seconds": elapsed, "check_seconds": check_seconds, "cpu_seconds": cpu, "peak_rss": peak_rss(), "workers_peak_rss": workers_rss}))
"""


def llama_layers(hidden: int, intermediate: int, kv: int, layers: int):
    import torch

    tensors, shapes = [], {}
    for i in range(layers):
        p = f"model.layers.{i}"
        for name, shape in ((f"{p}.self_attn.q_proj", (hidden, hidden)), (f"{p}.self_attn.k_proj", (kv, hidden)),
                            (f"{p}.self_attn.v_proj", (kv, hidden)), (f"{p}.self_attn.o_proj", (hidden, hidden)),
                            (f"{p}.mlp.gate_proj", (intermediate, hidden)), (f"{p}.mlp.up_proj", (intermediate, hidden)),
                            (f"{p}.mlp.down_proj", (hidden, intermediate))):
            tensors.append((f"{name}.weight", shape, torch.bfloat16))
            shapes[name] = shape
        tensors += [(f"{p}.input_layernorm.weight", (hidden,), torch.bfloat16),
                    (f"{p}.post_attention_layernorm.weight", (hidden,), torch.bfloat16)]
    tensors.append(("model.norm.weight", (hidden,), torch.bfloat16))
    return tensors, shapes


def read_all(paths: list[Path]) -> tuple[int, float]:
    total, t0 = 0, time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while block := f.read(16 << 20):
                total += len(block)
    return total, time.perf_counter() - t0


def write_fsynced(path: Path, nbytes: int) -> float:
    """Seconds to write ``nbytes`` to ``path`` in 16 MB writes and fsync it: the disk's own bound."""
    chunk = os.urandom(16 << 20)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for start in range(0, nbytes, len(chunk)):
            os.write(fd, chunk[:min(len(chunk), nbytes - start)])
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - t0
    path.unlink()
    return seconds


def run_child(step: Path, base: Path, out: Path, formats: str, workers: int, max_shard: str, kernel: str = "auto") -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MASKPRO_EXPORT_KERNEL=kernel)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(step), str(base), str(out), formats, str(workers), max_shard],
                          capture_output=True, text=True, check=True, env=env)
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=8192)
    parser.add_argument("--intermediate", type=int, default=28672)
    parser.add_argument("--kv", type=int, default=1024, help="rows of k_proj/v_proj (GQA)")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--formats", default="hf-dense,mask")
    # 500MB: the layer's 1.7 GB goes into 4 shards ([q k v o], gate, up, down), as a 70B export's 140 GB
    # goes into 28 shards of 5 GB: workers write different shards, as they do in a real export.
    parser.add_argument("--max-shard-size", default="500MB", help="hf-dense shard size (default 500MB: 4 shards)")
    parser.add_argument("--repeats", type=int, default=3, help="exports per worker count, alternating")
    parser.add_argument("--workdir", default=None, help="scratch directory on disk for inputs and the disk runs "
                        "(default: a temp dir, removed after)")
    parser.add_argument("--ram-dir", default="/dev/shm", help="a RAM-backed directory for the outputs of the main "
                        "runs (the pass without storage); the disk runs write under --workdir")
    parser.add_argument("--out", default="bench/results/export.json")
    args = parser.parse_args()

    from bench.provenance import cpu_name, git_commit
    from maskpro_ds.formats.hashing import model_fingerprint
    from tests.synthetic import write_random_base, write_synthetic_checkpoint

    load_before = os.getloadavg()
    runs: dict[int, list[dict]] = {1: [], 2: []}  # outputs in RAM (tmpfs): the pass without storage
    disk_runs: dict[int, list[dict]] = {1: [], 2: []}  # outputs on --workdir's disk, fsync'd
    numpy_runs: list[dict] = []  # 1 worker on the numpy kernel: what the compiled pass buys
    ram = args.ram_dir if args.ram_dir and Path(args.ram_dir).is_dir() else None
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp, tempfile.TemporaryDirectory(dir=ram) as ram_tmp:
        tmp, ram_tmp = Path(tmp), Path(ram_tmp)
        tensors, shapes = llama_layers(args.hidden, args.intermediate, args.kv, args.layers)
        base = write_random_base(tmp / "base", tensors, {"model_type": "llama"}, max_shard_bytes=2 * 10**9)
        step = write_synthetic_checkpoint(tmp / "run", shapes, 2, 4, 2, {"path": str(base), "fingerprint": None})
        weight_files = sorted(base.glob("*.safetensors"))
        step_files = sorted(step.glob("*.safetensors"))
        logit_gb = sum(f.stat().st_size for f in step_files) / 1e9  # before the temp dir goes
        largest = max(s[0] * s[1] * 2 for s in shapes.values())
        read_all(weight_files + sorted(step.glob("*.safetensors")))  # warm the page cache for all
        base_bytes, read_s = read_all(weight_files)
        for _ in range(args.repeats):
            for workers in runs:
                runs[workers].append(run_child(step, base, ram_tmp / "out", args.formats, workers, args.max_shard_size))
                disk_runs[workers].append(run_child(step, base, tmp / "out", args.formats, workers, args.max_shard_size))
            numpy_runs.append(run_child(step, base, ram_tmp / "out", args.formats, 1, args.max_shard_size, kernel="numpy"))
        disk_write_s = write_fsynced(tmp / "write-probe", base_bytes)
        idle = run_child(step, base, tmp / "none", "none", 1, args.max_shard_size)
        t0 = time.perf_counter()
        model_fingerprint(base)
        fp_s = time.perf_counter() - t0
    load_after = os.getloadavg()

    gb = base_bytes / 1e9
    seconds = {w: statistics.median(r["seconds"] for r in rs) for w, rs in runs.items()}
    rate = {w: gb / s for w, s in seconds.items()}
    one = runs[1][0]
    read_gbps, fp_gbps = gb / read_s, gb / fp_s
    speedup = rate[2] / rate[1]
    check_s = statistics.median(r["check_seconds"] for rs in runs.values() for r in rs)
    check_gbps = logit_gb / check_s  # sha256 of the checkpoint shards, one thread per shard file
    end_to_end = {w: gb / (s + check_s) for w, s in seconds.items()}
    rate_16 = 16 * rate[1] * speedup / 2  # 16 workers at the 2-worker efficiency
    numpy_rate = gb / statistics.median(r["seconds"] for r in numpy_runs)
    disk_rate = {w: gb / statistics.median(r["seconds"] for r in rs) for w, rs in disk_runs.items()}
    result = {
        "gb_per_s_per_core_1_worker": rate[1],
        "kernel": one["kernel"],
        "gb_per_s_1_worker_numpy_kernel": numpy_rate,
        "kernel_speedup_1_worker": rate[1] / numpy_rate,
        "gb_per_s_2_workers": rate[2],
        "speedup_2_workers": speedup,
        "outputs": f"RAM-backed {ram or 'temp dir (no --ram-dir found: the figures include storage)'}",
        "disk_gb_per_s_1_worker": disk_rate[1],
        "disk_gb_per_s_2_workers": disk_rate[2],
        "disk_speedup_2_workers": disk_rate[2] / disk_rate[1],
        "disk_write_gb_per_s": gb / disk_write_s,
        "disk_2_workers_over_disk_write": disk_rate[2] / (gb / disk_write_s),
        "checksum_gb_per_s": check_gbps,
        "checkpoint_gb": logit_gb,
        "end_to_end_gb_per_s_1_worker": end_to_end[1],
        "end_to_end_gb_per_s_2_workers": end_to_end[2],
        "cpu_seconds_per_gb_1_worker": statistics.median(r["cpu_seconds"] for r in runs[1]) / gb,
        "cpu_seconds_per_gb_2_workers": statistics.median(r["cpu_seconds"] for r in runs[2]) / gb,
        "worker_peak_rss_over_largest_tensor": max(r["workers_peak_rss"] for r in runs[2]) / largest,
        "throughput_over_read": rate[2] / read_gbps,
        "peak_rss_over_largest_tensor": one["peak_rss"] / largest,
        "peak_rss_above_baseline_over_largest_tensor": (one["peak_rss"] - idle["peak_rss"]) / largest,
        "gb_per_s": rate[2],
        "read_gb_per_s": read_gbps,
        "fingerprint_gb_per_s": fp_gbps,
        "base_gb": gb,
        "largest_tensor_gb": largest / 1e9,
        "peak_rss_gb": one["peak_rss"] / 1e9,
        "baseline_rss_gb": idle["peak_rss"] / 1e9,
        "formats": args.formats,
        "max_shard_size": args.max_shard_size,
        "threads": 1,
        "shapes": f"hidden {args.hidden}, intermediate {args.intermediate}, kv {args.kv}, {args.layers} layers, bf16",
        "est_70b_minutes": 140 / rate[2] / 60,
        "est_70b_minutes_with_fingerprint": (140 / rate[2] + 140 / fp_gbps) / 60,
        # the checksum pass hashes 280 GB of fp32 logits, shard files in parallel on 2 cores here
        "est_70b_minutes_with_checks": (140 / rate[2] + 140 / fp_gbps + 280 / check_gbps) / 60,
        "est_70b_minutes_16_workers": 140 / rate_16 / 60,
        "seconds_1_worker": [round(r["seconds"], 3) for r in runs[1]],
        "seconds_2_workers": [round(r["seconds"], 3) for r in runs[2]],
        "cores": len(os.sched_getaffinity(0)),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "page_cache": "warm (every input read once before the measurements)",
        "commit": git_commit(),
        "cpu": cpu_name(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("| base GB | read GB/s | 1 worker GB/s | 2 workers GB/s | speedup | peak RSS / largest tensor (worker) | 70B est. (min, 2 / 16 workers) |")
    print(f"| {gb:.2f} | {read_gbps:.2f} | {rate[1]:.3f} | {rate[2]:.3f} | {speedup:.2f} | "
          f"{result['peak_rss_over_largest_tensor']:.2f} ({result['worker_peak_rss_over_largest_tensor']:.2f}) | "
          f"{result['est_70b_minutes']:.1f} / {result['est_70b_minutes_16_workers']:.1f} |")
    print(f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f} on {result['cores']} cores")


if __name__ == "__main__":
    main()
