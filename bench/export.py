"""Export throughput and memory, measured side by side with a raw read of the same base files.

Builds a synthetic bf16 base with Llama-shaped layers and a matching 2-rank fp32 checkpoint, reads
every input once so the page cache is warm for both measurements (dropping the cache needs root
and would not be comparable anyway), then in the same run:
  1. raw sequential read of the base weight files (16 MB reads)         -> read GB/s
  2. the export in a fresh subprocess (time around the call, peak RSS)  -> export GB/s of base weights
  3. the same subprocess importing everything and exporting nothing     -> interpreter baseline RSS
  4. model_fingerprint over the base                                    -> hashing GB/s (the default pre-check)
Writes bench/results/export.json and prints a table row. The 70B estimate scales the measured
rates to 140 GB of bf16 weights (+ 280 GB of fp32 logits, in the same proportion as here).

    python -m bench.export [--hidden 8192 --intermediate 28672 --kv 1024 --layers 1] [--formats hf-dense,mask]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import json, sys, time
import torch

def peak_rss():  # VmHWM: this process image only (ru_maxrss would carry the parent's peak across exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

from maskpro_ds.export import export_checkpoint
step, base, out, formats, threads = sys.argv[1:6]
torch.set_num_threads(int(threads))
t0 = time.perf_counter()
if formats != "none":
    export_checkpoint(step, base, out, formats, fingerprint_check=False, progress=False)
elapsed = time.perf_counter() - t0
print(json.dumps({"seconds": elapsed, "peak_rss": peak_rss()}))
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


def run_child(step: Path, base: Path, out: Path, formats: str, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(step), str(base), str(out), formats, str(threads)],
                          capture_output=True, text=True, check=True, env=env)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=8192)
    parser.add_argument("--intermediate", type=int, default=28672)
    parser.add_argument("--kv", type=int, default=1024, help="rows of k_proj/v_proj (GQA)")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--formats", default="hf-dense,mask")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the export (1: on 2-core VMs a second thread slows small ops down)")
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir, removed after)")
    parser.add_argument("--out", default="bench/results/export.json")
    args = parser.parse_args()

    from maskpro_ds.formats.hashing import model_fingerprint
    from tests.synthetic import write_random_base, write_synthetic_checkpoint

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        tensors, shapes = llama_layers(args.hidden, args.intermediate, args.kv, args.layers)
        base = write_random_base(tmp / "base", tensors, {"model_type": "llama"}, max_shard_bytes=2 * 10**9)
        step = write_synthetic_checkpoint(tmp / "run", shapes, 2, 4, 2, {"path": str(base), "fingerprint": None})
        weight_files = sorted(base.glob("*.safetensors"))
        largest = max(s[0] * s[1] * 2 for s in shapes.values())
        read_all(weight_files + sorted(step.glob("*.safetensors")))  # warm the page cache for both
        base_bytes, read_s = read_all(weight_files)
        export = run_child(step, base, tmp / "out", args.formats, args.threads)
        idle = run_child(step, base, tmp / "none", "none", args.threads)
        t0 = time.perf_counter()
        model_fingerprint(base)
        fp_s = time.perf_counter() - t0

    gb = base_bytes / 1e9
    read_gbps, gbps, fp_gbps = gb / read_s, gb / export["seconds"], gb / fp_s
    result = {
        "throughput_over_read": gbps / read_gbps,
        "peak_rss_over_largest_tensor": export["peak_rss"] / largest,
        "peak_rss_above_baseline_over_largest_tensor": (export["peak_rss"] - idle["peak_rss"]) / largest,
        "gb_per_s": gbps,
        "read_gb_per_s": read_gbps,
        "fingerprint_gb_per_s": fp_gbps,
        "base_gb": gb,
        "largest_tensor_gb": largest / 1e9,
        "peak_rss_gb": export["peak_rss"] / 1e9,
        "baseline_rss_gb": idle["peak_rss"] / 1e9,
        "formats": args.formats,
        "threads": args.threads,
        "shapes": f"hidden {args.hidden}, intermediate {args.intermediate}, kv {args.kv}, {args.layers} layers, bf16",
        "est_70b_minutes": 140 / gbps / 60,
        "est_70b_minutes_with_fingerprint": (140 / gbps + 140 / fp_gbps) / 60,
        "page_cache": "warm (every input read once before both measurements)",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("| base GB | read GB/s | export GB/s | export/read | peak RSS / largest tensor | 70B est. (min) |")
    print(f"| {gb:.2f} | {read_gbps:.2f} | {gbps:.3f} | {result['throughput_over_read']:.3f} | "
          f"{result['peak_rss_over_largest_tensor']:.2f} ({result['peak_rss_above_baseline_over_largest_tensor']:.2f} above baseline) | "
          f"{result['est_70b_minutes']:.0f} (+{140 / fp_gbps / 60:.0f} fingerprint) |")


if __name__ == "__main__":
    main()
