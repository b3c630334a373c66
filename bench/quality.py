"""Quality on real text: MaskPro from the Wanda and SparseGPT priors vs every one-shot prior.

    python -m bench.quality                        # both runs, 1,500 steps each: ~2.2 h on 2 cores
    python -m bench.quality --only sparsegpt --steps-sparsegpt 1500 --eval-dtype bf16   # one run

SmolLM2-135M-Instruct, all 210 decoder Linears at 2:4, 2 DeepSpeed ZeRO-3 CPU ranks. The held-out
Wikipedia articles are split once more: the last 5 articles are the validation text that keep-best
uses during training, the first 16 the test text reported here, so checkpoint selection never sees
the reported tokens. Every stage resumes where it stopped (rerun the same command).
Writes bench/results/quality.json (+ PNG curves under each run directory; docs/results.md holds the table).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from maskpro_ds.demo.assets import prepare_demo, split_articles
from maskpro_ds.demo.run import DemoSizes, evaluate, export, make_priors, train
from maskpro_ds.formats.compute_dtype import resolve_dtype

REPO = Path(__file__).resolve().parents[1]


def split_heldout(heldout: Path, out: Path) -> tuple[Path, Path]:
    articles = split_articles(heldout.read_text())
    test, val = out / "test.txt", out / "val.txt"
    test.write_text("\n\n".join(articles[:16]))
    val.write_text("\n\n".join(articles[16:]))
    return test, val


def _mask_identity(mask: Path | None) -> str | None:
    """A mask artifact's content identity (its manifest and mask-file bytes), for the eval cache."""
    if mask is None:
        return None
    import hashlib

    h = hashlib.sha256((mask / "mask_manifest.json").read_bytes())
    h.update((mask / "masks.safetensors").read_bytes())
    return h.hexdigest()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "runs" / "quality"))
    p.add_argument("--steps-wanda", type=int, default=1500)
    p.add_argument("--steps-sparsegpt", type=int, default=1500)
    p.add_argument("--lr", type=float, default=1.5, help="step size with advantage_norm=rms (logit units per event)")
    p.add_argument("--lr-sparsegpt", type=float, default=None, help="step size for the SparseGPT run (default: --lr)")
    p.add_argument("--advantage-norm", default="rms")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-tokens", type=int, default=40960)
    p.add_argument("--eval-dtype", default="auto", help="fp32 | bf16 | auto (bf16 where the CPU runs it natively)")
    p.add_argument("--train-dtype", default="auto", help="fp32 | bf16 | auto")
    p.add_argument("--threads", type=int, default=2, help="threads for the evaluation")
    p.add_argument("--only", choices=["wanda", "sparsegpt"], help="train only from this prior")
    p.add_argument("--skip-eval", action="store_true")
    p.add_argument("--skip-train", action="store_true", help="evaluate what exists (e.g. while a run continues)")
    p.add_argument("--variants", default="", help="comma list of variants to evaluate now (default: all)")
    args = p.parse_args(argv)
    args.eval_dtype = resolve_dtype(args.eval_dtype, option="--eval-dtype")
    args.train_dtype = resolve_dtype(args.train_dtype, option="--train-dtype")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    assets = prepare_demo(REPO / ".cache" / "demo")
    test, val = split_heldout(assets.heldout_text, out)
    sizes = DemoSizes(lr=args.lr, dtype=args.train_dtype, eval_tokens=args.eval_tokens, num_samples=512)
    priors = make_priors(assets.model_dir, assets.calib_text, out / "priors", sizes)
    runs = {"wanda": args.steps_wanda, "sparsegpt": args.steps_sparsegpt}
    lrs = {"wanda": args.lr, "sparsegpt": args.lr if args.lr_sparsegpt is None else args.lr_sparsegpt}
    if args.only:
        runs = {args.only: runs[args.only]}
    wall = {}
    for k, (prior, steps) in enumerate(() if args.skip_train else runs.items()):
        run_dir = out / f"maskpro_from_{prior}"
        t0 = time.time()
        extra = [f"--train.advantage_norm={args.advantage_norm}", f"--train.eval_every={args.eval_every}",
                 f"--train.eval_source={val}", "--train.eval_tokens=8192", "--train.max_deviation=0.02",
                 f"--checkpoint.every={args.eval_every}"]
        train(assets.model_dir, assets.calib_text, priors[prior], run_dir,
              DemoSizes(steps=steps, lr=lrs[prior], dtype=args.train_dtype, num_samples=512), extra=extra, port=29590 + k)
        best = run_dir / "checkpoints" / "best"
        export(best if best.is_file() else run_dir / "checkpoints" / "latest", assets.model_dir,
               out / f"export_{prior}", formats="mask")
        wall[prior] = time.time() - t0
        from maskpro_ds.demo.plots import plot_run

        plot_run(run_dir)
    if args.skip_eval:
        return 0
    eval_sizes = DemoSizes(dtype=args.eval_dtype, eval_tokens=args.eval_tokens)
    variants = {"dense": None, "magnitude": priors["magnitude"], "wanda": priors["wanda"],
                "sparsegpt": priors["sparsegpt"]}
    for prior in runs:
        variants[f"maskpro_from_{prior}"] = out / f"export_{prior}" / "mask"
    wanted = set(args.variants.split(",")) if args.variants else set(variants)
    results = {}
    for name, mask in variants.items():  # each result cached per variant, so evaluation resumes too
        cached = out / "eval" / f"{name}.json"
        key = {"mask": _mask_identity(mask), "seqlen": eval_sizes.eval_seqlen, "tokens": args.eval_tokens,
               "dtype": args.eval_dtype}
        if cached.is_file() and json.loads(cached.read_text()).get("key") == key:
            results[name] = json.loads(cached.read_text())["result"]
        elif name in wanted:
            results[name] = evaluate(assets.model_dir, test, {name: mask}, eval_sizes, threads=args.threads)[name]
            cached.parent.mkdir(parents=True, exist_ok=True)
            cached.write_text(json.dumps({"key": key, "result": results[name]}) + "\n")
    if set(results) != set(variants):
        print(f"evaluated {sorted(results)}; still to evaluate: {sorted(set(variants) - set(results))}")
        return 0
    ppl = {k: v["ppl"] for k, v in results.items()}
    summary = {
        "seqlen": eval_sizes.eval_seqlen, "eval_tokens": results["dense"]["tokens_used"], "eval_dtype": args.eval_dtype,
        "ppl": ppl, "steps": {}, "lr": {}, "advantage_norm": args.advantage_norm,
        "train_dtype": args.train_dtype, "samples": sizes.num_samples, "train_seqlen": sizes.seqlen,
        "batch_per_rank": sizes.batch_size, "ranks": 2, "wall_s": wall, "train_minutes": {},
        "command": "python -m bench.quality " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    for prior in runs:  # what was actually trained (a run may be stopped early and exported from best)
        export_info = json.loads((out / f"export_{prior}" / "export.json").read_text())
        records = [json.loads(line) for line in (out / f"maskpro_from_{prior}" / "metrics.jsonl").read_text().splitlines()]
        last = records[-1]
        # time spent in training steps (a run resumed across sessions has gaps its timestamps would count)
        summary["train_minutes"][prior] = round(sum(r.get("train/step_time_s", 0.0) for r in records) / 60, 1)
        summary.setdefault("trained", {})[prior] = {"exported_step": export_info["source"].get("step"),
                                                   "last_step": last["step"], "lr_used": last.get("train/lr")}
        # the figures that describe the reported masks: the exported step and the lr the run ended on
        summary["steps"][prior] = export_info["source"].get("step")
        summary["lr"][prior] = last.get("train/lr")
    for prior in runs:
        key = f"maskpro_from_{prior}"
        summary[f"{key}_vs_prior"] = ppl[key] / ppl[prior] - 1
        summary[f"{key}_gap_closed"] = (ppl[prior] - ppl[key]) / (ppl[prior] - ppl["dense"])
    (REPO / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (REPO / "bench" / "results" / "quality.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
