"""Per-rank memory at 1, 2 and 4 ranks: the logit store and the ZeRO-3 partition shrink as 1/R.

    python -m bench.memory [--ranks 1,2,4] [--steps 2] [--keep DIR]

The same config-only Llama (hidden 1024, intermediate 2816, 4 layers, 16 heads, vocab 256, fp32:
51.9M weights, 51.4M of them masked) is trained for a couple of steps under torchrun at each world
size on CPU/gloo, with ZeRO-3 keeping at most one layer live. Each rank's report
(<run_dir>/ranks/rank-XXXXX.json, written by the trainer at close) gives its logit-store bytes,
ZeRO-3 partition size and peak RSS. Figures are printed as ratios to the 1-rank run. The logit bytes
of the largest rank must be within 5% of 1/R of the 1-rank figure, and sum over ranks to the 1-rank
figure (non-zero exit otherwise).

Peak RSS includes the interpreter + torch + transformers + deepspeed baseline. Two references are
measured: a process started the same way (torchrun, 1 rank) that imports everything and stops, and
the "framework": the same training run at the same world size on a 62K-weight model. The model
part (peak - framework) is what scales with the model. Results: bench/results/memory.json.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from maskpro_ds.train.local_launch import child_env as local_child_env
from maskpro_ds.train.local_launch import free_port
from tests.byte_tokenizer import byte_tokenizer

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "memory.json"
SHAPE = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
             num_key_value_heads=16, vocab_size=256)
# The same run on a minute model (62K weights): what the framework itself costs at each world size.
FRAMEWORK_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=256)
LAYER_WEIGHTS = 4 * SHAPE["hidden_size"] ** 2 + 3 * SHAPE["hidden_size"] * SHAPE["intermediate_size"]
TOLERANCE = 0.05

BASELINE_SCRIPT = """
import json, resource, sys
import deepspeed, transformers, torch  # noqa: F401  (what every rank imports)
import maskpro_ds.train.trainer  # noqa: F401
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
print("BASELINE " + json.dumps({"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def write_config_only_llama(path: Path, shape: dict) -> Path:
    """config.json + tokenizer and no weights: the trainer builds random weights under zero.Init."""
    from transformers import LlamaConfig

    path.mkdir(parents=True, exist_ok=True)
    LlamaConfig(max_position_embeddings=256, tie_word_embeddings=False, **shape).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def write_text(path: Path, documents: int = 60) -> Path:
    rng = random.Random(0)
    words = "sparse mask group weight layer token rank shard gather logit sample update frozen".split()
    path.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(80)) for _ in range(documents)))
    return path


def child_env() -> dict[str, str]:
    # glibc would keep freed blocks below its dynamic mmap threshold (up to 32 MiB) in the heap, so RSS
    # would remember every full tensor zero.Init built and freed; a fixed 128 KiB threshold returns
    # them, and RSS tracks live tensors (large-model tensors are far above 32 MiB anyway).
    return local_child_env(MALLOC_MMAP_THRESHOLD_="131072")


def torchrun(nproc: int, args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def measure_baseline(work: Path) -> int:
    script = work / "baseline.py"
    script.write_text(BASELINE_SCRIPT)
    out = torchrun(1, [str(script)]).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("BASELINE "))[9:])["peak_rss_bytes"]


def train(world: int, model: Path, text: Path, work: Path, steps: int) -> list[dict]:
    run_dir = work / f"run-{model.name}-{world}"
    t0 = time.perf_counter()
    torchrun(world, ["launchers/train.py", "--config", "configs/tiny_debug.yaml", f"--model.path={model}",
                     f"--data.source={text}", f"--data.cache_dir={work / 'cache'}", f"--train.run_dir={run_dir}",
                     f"--train.steps={steps}", "--data.seqlen=64", "--data.num_samples=16", "--data.batch_size=2",
                     "--model.dtype=fp32", "--metrics.tensorboard=false",
                     # ZeRO-3 keeps at most ~one decoder layer gathered (3.4M weights), as it would for a
                     # large model; the defaults (1e9 live elements) would keep this whole small model live.
                     f"--zero.max_live_parameters={LAYER_WEIGHTS}", f"--zero.prefetch_bucket_size={LAYER_WEIGHTS}"])
    print(f"  {model.name}, {world} rank(s): {time.perf_counter() - t0:.1f} s")
    reports = sorted((json.loads(p.read_text()) for p in (run_dir / "ranks").glob("rank-*.json")),
                     key=lambda r: r["rank"])
    assert [r["rank"] for r in reports] == list(range(world)), f"missing rank reports in {run_dir}"
    return reports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", default="1,2,4", help="world sizes to run (the first one is the reference)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--keep", help="work directory to keep (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    worlds = [int(x) for x in args.ranks.split(",")]
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="maskpro-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        model = write_config_only_llama(work / "model", SHAPE)
        minute = write_config_only_llama(work / "minute", FRAMEWORK_SHAPE)
        text = write_text(work / "text.txt")
        # Unmeasured warm-up: tokenising the text (rank 0, once, then cached) peaks higher than a
        # small model's training, so it fills the shared data cache before any measured run.
        train(1, minute, text, work, 0)
        baseline = measure_baseline(work)
        print(f"baseline (imports only, 1 process): peak RSS {baseline / 2**20:.0f} MiB")
        reports = {w: train(w, model, text, work, args.steps) for w in worlds}
        framework = {w: max(r["peak_rss_bytes"] for r in train(w, minute, text, work, args.steps)) for w in worlds}
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    ref = worlds[0]
    logit = {w: max(r["logit_local_bytes"] for r in reports[w]) for w in worlds}
    params = {w: max(r["param_local_numel"] for r in reports[w]) for w in worlds}
    rss = {w: max(r["peak_rss_bytes"] for r in reports[w]) for w in worlds}
    full = reports[ref][0]["param_full_numel"]
    total_logit = {w: sum(r["logit_local_bytes"] for r in reports[w]) for w in worlds}
    failures = []
    model_part = {w: rss[w] - framework[w] for w in worlds}
    print(f"\n{'ranks':>5} {'logit MiB/rank':>15} {'x ref':>7} {'x R':>6} {'params/rank':>12} {'x ref':>7} "
          f"{'peak RSS MiB':>13} {'x ref':>7} {'framework':>10} {'model part':>11} {'x ref':>7}")
    for w in worlds:
        print(f"{w:>5} {logit[w] / 2**20:>15.2f} {logit[w] / logit[ref]:>7.3f} {logit[w] / logit[ref] * w / ref:>6.3f} "
              f"{params[w]:>12,} {params[w] / params[ref]:>7.3f} {rss[w] / 2**20:>13.0f} {rss[w] / rss[ref]:>7.3f} "
              f"{framework[w] / 2**20:>10.0f} {model_part[w] / 2**20:>11.0f} {model_part[w] / model_part[ref]:>7.3f}")
        if abs(logit[w] / logit[ref] * w / ref - 1) > TOLERANCE:
            failures.append(f"logit bytes per rank at R={w} are {logit[w] / logit[ref]:.4f} of R={ref}, "
                            f"not within {TOLERANCE:.0%} of {ref}/{w}")
        if total_logit[w] != total_logit[ref]:
            failures.append(f"logit bytes summed over ranks differ: {total_logit[w]} at R={w} vs {total_logit[ref]}")
        if any(r["params_released"] != r["params_total"] for r in reports[w]) and w > 1:
            failures.append(f"R={w}: some ZeRO-3 parameters were still gathered at close")

    result = {
        "model": {**SHAPE, "dtype": "fp32", "param_full_numel": full,
                  "masked_weights": total_logit[ref] // 4},  # one fp32 logit per masked weight
        "steps": args.steps,
        "logit_bytes_per_rank": {str(w): logit[w] for w in worlds},
        "param_local_numel_per_rank": {str(w): params[w] for w in worlds},
        "peak_rss_per_rank": {str(w): rss[w] for w in worlds},
        "baseline_rss": baseline,
        "framework_peak_rss_per_rank": {str(w): framework[w] for w in worlds},
        "model_part_peak_rss_per_rank": {str(w): model_part[w] for w in worlds},
        "ratios": {
            "logit_bytes": {str(w): logit[w] / logit[ref] for w in worlds},
            "param_local_numel": {str(w): params[w] / params[ref] for w in worlds},
            "peak_rss": {str(w): rss[w] / rss[ref] for w in worlds},
            "model_part_peak_rss": {str(w): model_part[w] / model_part[ref] for w in worlds},
        },
        "reference_world_size": ref,
        "note": "max over ranks; peak RSS = ru_maxrss (includes the interpreter/torch/transformers/deepspeed "
                "baseline); framework = the same run at the same world size on a 62K-weight model; "
                "model part = peak - framework",
        "ok": not failures,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {RESULTS.relative_to(REPO)}")
    for f in failures:
        print(f"FAIL: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
