"""A 70B-shaped MaskPro run on CPU: real 70B layer shapes, 2 ranks, ZeRO-3, then a streaming export.

    python -m bench.seventy_b_shaped [--layers 1] [--steps 3] [--work DIR] [--keep]

Base: a Llama with LLaMA-2-70B's decoder layer (hidden 8192, intermediate 28672, 64 heads, 8 KV
heads: 856M weights a layer, q/k/v/o/gate/up/down), ``--layers`` of them, vocab 256 with a byte
tokenizer, random bf16 weights written to safetensors (so the run loads real weight files through
``HfDeepSpeedConfig`` + ``from_pretrained``, the path a real 70B takes). Training uses
configs/llama_70b_multinode.yaml with only the size-dependent keys overridden (2 ranks, no hpZ,
batch 1 x 32 tokens, 4 samples). Then ``tools/export_masks.py --format hf-dense,mask --verify``.

Checked (non-zero exit otherwise):
- each rank's ZeRO-3 partition equals the formula sum(ceil(numel/R)) over parameters;
- each rank's logit store is 4 bytes x masked weights / R (within 5%);
- during the training steps no rank holds more than one layer beyond its own state: its VmRSS
  (polled every 0.25 s) stays below framework + bf16 partition + fp32 logit slice + one gathered
  layer + 5 x the largest tensor's bf16 bytes (its masked copy, the CPU kernel's reordered copy,
  the unpacked bool mask and its temporaries: ~3.7x measured). The excess is
  printed in layers; a rank holding the whole model would show at least ``--layers``. (With 1-2
  layers this discriminates weakly; the partition formula and the logit share are the exact
  checks.) The whole-run peak (ru_maxrss) is reported too: model loading and the prior init add
  transients on top of the steady state (docs/benchmarks.md (memory section)).
- the export's peak RSS stays below its idle baseline + 3 x the largest tensor;
- the exported hf-dense weights are the base with exactly 2 of every 4 kept on sampled rows.
While it runs, the machine's MemAvailable is polled; below --min-available-gb the run is stopped.
Figures: bench/results/seventy_b_shaped.json and docs/benchmarks.md (memory section).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from maskpro_ds.train.local_launch import child_env, free_port
from tests.byte_tokenizer import byte_tokenizer

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "seventy_b_shaped.json"
HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 8192, 28672, 64, 8, 256
KV = HIDDEN // HEADS * KV_HEADS
WORLD = 2
# Transients of one masked Linear in the forward, in units of its bf16 weight bytes (see the docstring).
FORWARD_TRANSIENT = 5
LAYER_NUMEL = 2 * HIDDEN * HIDDEN + 2 * KV * HIDDEN + 3 * HIDDEN * INTERMEDIATE + 2 * HIDDEN

EXPORT_CHILD = """
import runpy, sys
def peak():  # VmHWM: this process image only
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
code = 0
if sys.argv[1] != "--idle":
    sys.argv = sys.argv[1:]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:
        code = e.code or 0
else:
    import maskpro_ds.cli.export  # noqa: F401  (what the tool imports)
print(f"PEAK {peak()}", file=sys.stderr)
sys.exit(code)
"""


def model_tensors(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    out = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        p = f"model.layers.{i}"
        out += [(f"{p}.self_attn.q_proj.weight", (HIDDEN, HIDDEN)), (f"{p}.self_attn.k_proj.weight", (KV, HIDDEN)),
                (f"{p}.self_attn.v_proj.weight", (KV, HIDDEN)), (f"{p}.self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
                (f"{p}.mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN)), (f"{p}.mlp.up_proj.weight", (INTERMEDIATE, HIDDEN)),
                (f"{p}.mlp.down_proj.weight", (HIDDEN, INTERMEDIATE)),
                (f"{p}.input_layernorm.weight", (HIDDEN,)), (f"{p}.post_attention_layernorm.weight", (HIDDEN,))]
    return out + [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]


def write_base(path: Path, layers: int) -> Path:
    import torch
    from transformers import LlamaConfig

    from tests.synthetic import write_random_base

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                         num_hidden_layers=layers, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                         max_position_embeddings=256, tie_word_embeddings=False)
    config.architectures = ["LlamaForCausalLM"]
    as_dict = config.to_dict()
    as_dict["torch_dtype"] = "bfloat16"
    tensors = [(name, shape, torch.bfloat16) for name, shape in model_tensors(layers)]
    write_random_base(path, tensors, as_dict, max_shard_bytes=2 * 10**9)
    byte_tokenizer().save_pretrained(path)
    return path


class MemoryWatch:
    """Polls MemAvailable; stops the watched process group when the machine runs short."""

    def __init__(self, min_available: int):
        self.min_available, self.lowest, self.tripped = min_available, math.inf, False
        self.proc: subprocess.Popen | None = None
        # Steady state: the largest VmRSS of each child of the watched process (torchrun's workers)
        # seen while ``phase_file`` exists (the trainer's metrics.jsonl: training steps are running).
        self.phase_file: Path | None = None
        self.steady_rss: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def available() -> int:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no MemAvailable in /proc/meminfo")

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            avail = self.available()
            self.lowest = min(self.lowest, avail)
            if self.phase_file is not None and self.phase_file.exists() and self.proc is not None:
                for pid in self._children(self.proc.pid):
                    rss = self._rss(pid)
                    if rss is not None:
                        self.steady_rss[pid] = max(self.steady_rss.get(pid, 0), rss)
            if avail < self.min_available and self.proc is not None and self.proc.poll() is None:
                self.tripped = True
                os.killpg(self.proc.pid, signal.SIGKILL)  # only the group this script started

    @staticmethod
    def _children(pid: int) -> list[int]:
        try:
            return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        except OSError:
            return []

    @staticmethod
    def _rss(pid: int) -> int | None:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def run(self, cmd: list[str], timeout: int) -> subprocess.CompletedProcess:
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True)
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            out, err = self.proc.communicate()
            sys.exit(f"{' '.join(cmd)} timed out after {timeout} s:\n{err[-3000:]}")
        if self.tripped:
            sys.exit(f"stopped: MemAvailable fell below {self.min_available / 1e9:.1f} GB; use fewer --layers")
        if self.proc.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed ({self.proc.returncode}):\n{err[-5000:]}")
        return subprocess.CompletedProcess(cmd, self.proc.returncode, out, err)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def export_peak(watch: MemoryWatch, args: list[str]) -> tuple[int, float]:
    t0 = time.perf_counter()
    err = watch.run([sys.executable, "-c", EXPORT_CHILD, *args], timeout=3600).stderr
    return int(next(line for line in err.splitlines() if line.startswith("PEAK "))[5:]), time.perf_counter() - t0


def check_export(export: Path, base: Path, layers: int) -> int:
    """Sampled rows of every masked layer: output = where(mask, base, 0), exactly 2 of 4 kept."""
    import torch

    from maskpro_ds.export.base_model import BaseModel
    from maskpro_ds.formats.safetensors_io import Reader, read_header
    from maskpro_ds.masks.nm import unpack_bits

    out, src = BaseModel(export / "hf-dense"), BaseModel(base)
    packed, _ = read_header(export / "mask" / "masks.safetensors")
    reader, checked = Reader(), 0
    try:
        for name, shape in model_tensors(layers):
            module = name.removesuffix(".weight")
            if module not in packed:
                assert len(shape) == 1 or "layers" not in name, f"{module} was not masked"
                continue
            rows, cols = shape
            for r0 in (0, rows // 2, rows - 2):
                mask = unpack_bits(reader.read_rows(packed[module], r0, r0 + 2), cols)
                assert torch.equal(mask.reshape(-1, 4).sum(1), torch.full((2 * cols // 4,), 2)), f"{module}: not 2:4"
                w = reader.read_rows(src.tensors[name], r0, r0 + 2)
                got = reader.read_rows(out.tensors[name], r0, r0 + 2)
                assert torch.equal(got.view(torch.int16), torch.where(mask, w, 0).view(torch.int16)), module
                checked += 2
    finally:
        reader.close()
    return checked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=1, help="decoder layers of 856M weights (2 needs ~20 GB free)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--work", help="work directory (default: a temporary one under /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (base, run, export)")
    parser.add_argument("--min-available-gb", type=float, default=1.5)
    parser.add_argument("--results", default=str(RESULTS), help="where to write the JSON figures")
    args = parser.parse_args(argv)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="maskpro-70b-"))
    work.mkdir(parents=True, exist_ok=True)
    watch = MemoryWatch(int(args.min_available_gb * 1e9))
    try:
        return run(args, work, watch)
    finally:
        watch.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def run(args, work: Path, watch: MemoryWatch) -> int:
    t0 = time.perf_counter()
    base = write_base(work / "base", args.layers)
    write_s = time.perf_counter() - t0
    text = work / "text.txt"
    text.write_text("\n\n".join(f"Document {i}: sparse masks keep two of every four weights. " * 4 for i in range(8)))
    run_dir = work / "run"
    watch.phase_file = run_dir / "metrics.jsonl"
    t0 = time.perf_counter()
    watch.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), "launchers/train.py",
               "--config", "configs/llama_70b_multinode.yaml", f"--model.path={base}", f"--data.source={text}",
               f"--data.cache_dir={work / 'cache'}", "--data.max_documents=0", "--data.seqlen=32",
               "--data.num_samples=4", "--data.batch_size=1", f"--train.run_dir={run_dir}",
               f"--train.steps={args.steps}", f"--checkpoint.every={args.steps}", "--zero.hpz_partition_size=1",
               # at most one decoder layer gathered at a time (the recipe allows two: one prefetched)
               f"--zero.max_live_parameters={LAYER_NUMEL}", f"--zero.prefetch_bucket_size={LAYER_NUMEL // 2}",
               "--metrics.progress=false", "--metrics.log_every=1"], timeout=3600)
    train_s = time.perf_counter() - t0
    watch.phase_file = None
    steady = sorted(watch.steady_rss.values(), reverse=True)[:WORLD]
    reports = sorted((json.loads(p.read_text()) for p in (run_dir / "ranks").glob("rank-*.json")),
                     key=lambda r: r["rank"])
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]

    idle_peak, _ = export_peak(watch, ["--idle"])
    export_dir = work / "export"
    export_rss, export_s = export_peak(watch, ["tools/export_masks.py", str(run_dir), "--base", str(base), "--out",
                                               str(export_dir), "--format", "hf-dense,mask", "--verify",
                                               "--no-progress"])
    rows_checked = check_export(export_dir, base, args.layers)

    shapes = model_tensors(args.layers)
    full_numel = sum(math.prod(s) for _, s in shapes)
    formula = sum(math.ceil(math.prod(s) / WORLD) for _, s in shapes)
    masked = sum(math.prod(s) for n, s in shapes if len(s) == 2 and ".layers." in n)
    largest = max(math.prod(s) for _, s in shapes) * 2
    model_bytes = full_numel * 2
    baseline = int(json.loads((REPO / "bench" / "results" / "memory.json").read_text())["framework_peak_rss_per_rank"]
                   [str(WORLD)]) if (REPO / "bench" / "results" / "memory.json").is_file() else 0
    failures = []
    rank_rows = []
    layer_bytes = sum(math.prod(s) for n, s in shapes if ".layers.0." in n) * 2
    for r in reports:
        logit_share = r["logit_local_bytes"] / (4 * masked / WORLD)
        own = baseline + 2 * r["param_local_numel"] + r["logit_local_bytes"]
        rank_rows.append({"rank": r["rank"], "param_local_numel": r["param_local_numel"],
                          "param_formula": formula, "logit_local_bytes": r["logit_local_bytes"],
                          "logit_share_of_1_over_R": logit_share, "peak_rss_bytes": r["peak_rss_bytes"],
                          "framework_partition_logits_bytes": own,
                          "peak_excess_in_layers": (r["peak_rss_bytes"] - own) / layer_bytes})
        if r["param_local_numel"] != formula:
            failures.append(f"rank {r['rank']}: ZeRO-3 partition {r['param_local_numel']} != formula {formula}")
        if abs(logit_share - 1) > 0.05:
            failures.append(f"rank {r['rank']}: logit store {r['logit_local_bytes']} B is {logit_share:.3f} x 4d/R")
        if r["param_full_numel"] != full_numel:
            failures.append(f"rank {r['rank']}: model has {r['param_full_numel']} weights, expected {full_numel}")

        if r["weight_digest_start"] != r["weight_digest_end"]:
            failures.append(f"rank {r['rank']}: the frozen base changed during training")
    # Steady state (training steps): every rank holds its own state plus at most one gathered layer.
    own_max = max(row["framework_partition_logits_bytes"] for row in rank_rows)
    steady_bound = own_max + layer_bytes + FORWARD_TRANSIENT * largest
    if len(steady) < WORLD:
        failures.append(f"steady-state RSS seen for {len(steady)} of {WORLD} ranks (steps too short to sample?)")
    elif steady[0] >= steady_bound:
        failures.append(f"steady-state RSS {steady[0] / 1e9:.2f} GB >= framework + partition + logits + one layer "
                        f"+ {FORWARD_TRANSIENT} x largest tensor = {steady_bound / 1e9:.2f} GB")
    if export_rss >= idle_peak + 3 * largest:
        failures.append(f"export peak RSS {export_rss / 1e9:.2f} GB >= idle {idle_peak / 1e9:.2f} + 3 x largest tensor")

    step_times = [m["train/step_time_s"] for m in metrics if "train/step_time_s" in m]
    result = {
        "shape": {"hidden": HIDDEN, "intermediate": INTERMEDIATE, "heads": HEADS, "kv_heads": KV_HEADS, "vocab": VOCAB,
                  "layers": args.layers, "dtype": "bf16"},
        "world_size": WORLD, "steps": args.steps, "full_numel": full_numel, "masked_weights": masked,
        "model_bytes_bf16": model_bytes, "layer_bytes_bf16": layer_bytes, "logit_bytes_total": 4 * masked,
        "framework_rss_reference": baseline,
        "ranks": rank_rows,
        "steady_rss_bytes": steady, "steady_bound_bytes": steady_bound,
        "steady_excess_in_layers": [(x - own_max) / layer_bytes for x in steady],
        "steady_transient_over_largest": [(x - own_max - layer_bytes) / largest for x in steady],
        "step_time_s": step_times, "train_wall_s": train_s, "write_base_s": write_s,
        "loss": [m.get("train/loss") for m in metrics],
        "export": {"formats": "hf-dense,mask", "verify": True, "seconds": export_s, "peak_rss_bytes": export_rss,
                   "idle_peak_rss_bytes": idle_peak, "largest_tensor_bytes": largest,
                   "above_idle_over_largest": (export_rss - idle_peak) / largest,
                   "rows_checked": rows_checked},
        "lowest_mem_available_bytes": watch.lowest,
        "ok": not failures,
    }
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(result, indent=1) + "\n")

    gb = 1e9
    print(f"\n70B-shaped: {args.layers} layer(s), {full_numel / 1e6:.0f}M weights ({model_bytes / gb:.2f} GB bf16), "
          f"{masked / 1e6:.0f}M masked ({4 * masked / gb:.2f} GB fp32 logits), {WORLD} ranks")
    print(f"write base {write_s:.0f} s, train {train_s:.0f} s (steps: {', '.join(f'{t:.1f}' for t in step_times)} s), "
          f"export {export_s:.0f} s")
    for row in rank_rows:
        print(f"rank {row['rank']}: partition {row['param_local_numel']:,} (formula {formula:,}), logits "
              f"{row['logit_local_bytes'] / gb:.3f} GB ({row['logit_share_of_1_over_R']:.3f} x 4d/R), peak RSS "
              f"{row['peak_rss_bytes'] / gb:.2f} GB over the run = framework + partition + logits "
              f"{row['framework_partition_logits_bytes'] / gb:.2f} GB + {row['peak_excess_in_layers']:.2f} layers "
              f"(model loading and prior init)")
    print(f"steady state (training steps): RSS {', '.join(f'{x / gb:.2f}' for x in steady)} GB = own state "
          f"{own_max / gb:.2f} GB + one gathered layer {layer_bytes / gb:.2f} GB + "
          f"{', '.join(f'{(x - own_max - layer_bytes) / largest:.2f}' for x in steady)} x the largest Linear "
          f"(bound {steady_bound / gb:.2f} GB)")
    print(f"export: peak RSS {export_rss / gb:.2f} GB, {(export_rss - idle_peak) / largest:.2f} x the largest tensor "
          f"above its {idle_peak / gb:.2f} GB idle baseline; {rows_checked} rows checked against the base")
    print(f"lowest MemAvailable during the run: {watch.lowest / gb:.1f} GB; wrote {results}")
    for f in failures:
        print(f"FAIL: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
