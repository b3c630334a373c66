"""The end-to-end demo (``make demo``): real model, real text, every stage of the product, one table.

Stages, each skipped when its output already exists (rerunning resumes; ``--fresh`` redoes all):
 1. prepare   SmolLM2-135M-Instruct and English Wikipedia, offline from PyPI wheels (demo_assets)
 2. priors    magnitude, Wanda and SparseGPT 2:4 masks from calibration text (priors/)
 3. train     MaskPro from the Wanda prior: DeepSpeed ZeRO-3, 2 CPU ranks (torchrun -m maskpro_ds.cli.train)
 4. export    the final 2:4 masks as an hf-dense model and a mask artifact (python -m maskpro_ds.cli.export)
 5. evaluate  held-out perplexity of dense, magnitude, Wanda, SparseGPT and MaskPro, one table + plots

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
from dataclasses import dataclass
from pathlib import Path

from maskpro_ds.formats.checkpoint_format import resolve_checkpoint
from maskpro_ds.train.local_launch import child_env, free_port

# What configs/demo_smollm2.yaml sets beyond the defaults and the sizes below (the demo passes
# everything as overrides, so it needs no file from the repository).
DEMO_SETTINGS = ["--zero.param_persistence_threshold=0", "--checkpoint.every=50", "--checkpoint.keep_last=2"]


@dataclass
class DemoSizes:
    """What the demo trains and evaluates (defaults fit ~20 min on 2 cores)."""

    steps: int = 120
    lr: float = 200.0
    batch_size: int = 4          # per rank; 2 ranks
    seqlen: int = 128
    num_samples: int = 256      # 2 ranks x 4 x 120 steps = 3.75 epochs; the f(m0) pass stays short
    calib_samples: int = 32      # priors: 32 x 128 calibration tokens
    eval_seqlen: int = 512
    eval_tokens: int = 16384
    dtype: str = "bf16"          # CPU bf16 matmuls are ~4x faster than fp32 here


def _run(cmd: list[str], log: Path) -> None:
    env = child_env(DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    print("$", " ".join(cmd), flush=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"command failed (exit {proc.returncode}); full log: {log}\n{tail}")


def make_priors(model_dir: Path, calib: Path, out: Path, sizes: DemoSizes,
                times: dict[str, float] | None = None) -> dict[str, Path]:
    """The three one-shot priors as mask artifacts; ``times`` receives each one's wall time."""
    from maskpro_ds.priors.base import PriorSpec
    from maskpro_ds.priors.make import make_prior

    paths = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        target = out / method
        if not (target / "mask_manifest.json").is_file():
            t0 = time.time()
            make_prior(PriorSpec(model=str(model_dir), method=method, out=str(target), calib=str(calib),
                                 nsamples=sizes.calib_samples, seqlen=128, force=True))
            if times is not None:
                times[method] = time.time() - t0
            print(f"  prior {method}: {time.time() - t0:.0f} s", flush=True)
        paths[method] = target
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
          f"--train.lr={sizes.lr}", "--metrics.progress=false", *(extra or []), *resume],
         run_dir.parent / f"{run_dir.name}.log")


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
    """Perplexity of the dense model and of each mask artifact applied to it (same dtype, same windows)."""
    import torch

    from maskpro_ds.eval.masked_model import apply_mask_artifact
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
        if mask is not None:
            apply_mask_artifact(model, mask, model_dir)
        res = perplexity(model, tokenizer, text, seqlen=sizes.eval_seqlen, max_tokens=sizes.eval_tokens, batch_size=4)
        results[name] = res.to_dict()
        print(f"  {name:<22} ppl {res.ppl:10.2f}   ({res.tokens_used} tokens, {res.time_s:.0f} s)", flush=True)
    return results


def format_table(results: dict[str, dict], times: dict[str, float], sizes: DemoSizes) -> str:
    dense = results["dense"]["ppl"]
    lines = [f"Held-out English Wikipedia perplexity, SmolLM2-135M-Instruct, 2:4 on all 210 decoder Linears "
             f"(seqlen {sizes.eval_seqlen}, {sizes.dtype}, first {results['dense']['tokens_used']} held-out tokens)",
             f"| {'method':<24} | {'ppl':>9} | {'vs dense':>8} | {'tokens':>7} | {'make (s)':>8} |",
             f"|{'-' * 26}|{'-' * 11}|{'-' * 10}|{'-' * 9}|{'-' * 10}|"]
    for name, res in results.items():
        lines.append(f"| {name:<24} | {res['ppl']:9.2f} | {res['ppl'] / dense:7.2f}x | {res['tokens_used']:7d} | "
                     f"{times.get(name, 0.0):8.0f} |")
    lines.append("make (s): wall time to make that mask (prior computation; MaskPro: training + export), "
                 "0 when reused from an earlier run")
    return "\n".join(lines)


def run_demo(out: Path, cache_dir: Path, sizes: DemoSizes, fresh: bool = False) -> int:
    """Every stage into ``out`` (assets cached in ``cache_dir``); prints the table; returns 0."""
    if fresh:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    times: dict[str, float] = {}

    from maskpro_ds.demo.assets import prepare_demo

    print(f"demo sizes (chosen to fit ~20 min on 2 cores): {sizes.steps} steps, batch {sizes.batch_size} x "
          f"{sizes.seqlen} tokens per rank on 2 ranks, {sizes.num_samples} calibration samples, {sizes.dtype}; "
          f"eval {sizes.eval_tokens} held-out tokens at seqlen {sizes.eval_seqlen}. More: bench/quality.py", flush=True)
    print("[1/5] prepare: SmolLM2-135M-Instruct + English Wikipedia (offline, from PyPI wheels)", flush=True)
    assets = prepare_demo(cache_dir)
    print(f"[2/5] priors: magnitude, Wanda, SparseGPT ({sizes.calib_samples} x 128 calibration tokens)", flush=True)
    prior_times: dict[str, float] = {}
    priors = make_priors(assets.model_dir, assets.calib_text, out / "priors", sizes, prior_times)
    times.update({f"{label} 2:4": prior_times.get(method, 0.0)
                  for method, label in (("magnitude", "magnitude"), ("wanda", "Wanda"), ("sparsegpt", "SparseGPT"))})
    print(f"[3/5] train: MaskPro from the Wanda prior, ZeRO-3 on 2 CPU ranks, {sizes.steps} steps x 2 ranks x "
          f"{sizes.batch_size} x {sizes.seqlen} tokens, lr {sizes.lr}", flush=True)
    t0 = time.time()
    run_dir = out / "train"
    train(assets.model_dir, assets.calib_text, priors["wanda"], run_dir, sizes)
    print("[4/5] export: hf-dense model + 1-bit mask artifact", flush=True)
    export(run_dir / "checkpoints" / "latest", assets.model_dir, out / "export")
    times["MaskPro 2:4 (from Wanda)"] = time.time() - t0
    print(f"[5/5] evaluate: held-out perplexity, seqlen {sizes.eval_seqlen}, {sizes.eval_tokens} tokens", flush=True)
    variants = {"dense": None, "magnitude 2:4": priors["magnitude"], "Wanda 2:4": priors["wanda"],
                "SparseGPT 2:4": priors["sparsegpt"], "MaskPro 2:4 (from Wanda)": out / "export" / "mask"}
    results = evaluate(assets.model_dir, assets.heldout_text, variants, sizes)

    from maskpro_ds.demo.plots import plot_run, ppl_bars

    plots = plot_run(run_dir)
    ppl_bars({k: v["ppl"] for k, v in results.items()}, out / "perplexity.png")
    table = format_table(results, times, sizes)
    (out / "results.json").write_text(json.dumps({"sizes": sizes.__dict__, "results": results}, indent=1) + "\n")
    (out / "results.md").write_text(table + "\n")
    print("\n" + table)
    print(f"\nplots: {', '.join(str(p) for p in [*plots, out / 'perplexity.png'])}")
    print(f"demo finished in {(time.time() - t_start) / 60:.1f} min; everything is under {out}")
    return 0
