"""Quality on real text: MaskPro from the Wanda and SparseGPT priors vs every one-shot prior.

    python -m bench.quality                        # both priors x seeds 0,1, the default recipe
    python -m bench.quality --warm-start none --steps-wanda 1500 --steps-sparsegpt 1500   # the earlier recipe
    python -m bench.quality --only sparsegpt --seeds 0 --eval-dtype bf16   # one run
    python -m bench.quality --override=--train.estimator=loo --override=--train.masks_per_step=2

SmolLM2-135M-Instruct, all 210 decoder Linears at 2:4, 2 DeepSpeed ZeRO-3 CPU ranks. The held-out
Wikipedia articles are split once more: the last 5 articles are the validation text that keep-best
uses during training, the first 16 the test text reported here, so checkpoint selection never sees
the reported tokens. Every stage resumes where it stopped (rerun the same command); a training run
that was continued by a later command is recorded as ``uninterrupted: false`` (its figure is a
sketch, not a result), and so is the summary if any run was. Each (prior, seed) is its own run;
the summary has every seed's figure and their median, the forwards per rank each run used, the
commit each run started at, and the one-shot rows users compare with: magnitude, Wanda, SparseGPT
mask only, and SparseGPT with its weight update ("weights changed").

The default recipe is the shipped configs': the layer-wise warm start (``mask.warm_start = swap``,
128 windows) from the prior, then rms-normalised advantages at lr 1.5, for 1,400 steps: with the
f(m0) pass (64) and the warm start's 32 calibration forwards that is 1,496 forwards per rank, inside
the 1,500 budget. The warm start's own mask is evaluated too (``warm_start_from_<prior>_seed<s>``),
so the table shows what the layer-wise stage gives and what the policy gradient adds.
Writes bench/results/quality.json (+ PNG curves under each run directory; docs/results.md holds the table).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from bench.provenance import cpu_name, git_commit
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
    p.add_argument("--steps-wanda", type=int, default=1400)
    p.add_argument("--steps-sparsegpt", type=int, default=1400)
    p.add_argument("--warm-start", default="swap", choices=["none", "swap"], help="mask.warm_start of every run")
    p.add_argument("--lr", type=float, default=1.5, help="step size with advantage_norm=rms (logit units per event)")
    p.add_argument("--lr-sparsegpt", type=float, default=None, help="step size for the SparseGPT run (default: --lr)")
    p.add_argument("--advantage-norm", default="rms")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-tokens", type=int, default=40960)
    p.add_argument("--eval-dtype", default="auto", help="fp32 | bf16 | auto (bf16 where the CPU runs it natively)")
    p.add_argument("--train-dtype", default="auto", help="fp32 | bf16 | auto")
    p.add_argument("--threads", type=int, default=2, help="threads for the evaluation")
    p.add_argument("--only", choices=["wanda", "sparsegpt"], help="train only from this prior")
    p.add_argument("--seeds", default="0,1", help="comma list of train.seed values, one run each per prior")
    p.add_argument("--override", action="append", default=[],
                   help="a trainer override for every run, e.g. --override=--train.masks_per_step=2 (repeatable)")
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
    priors = make_priors(assets.model_dir, assets.calib_text, out / "priors", sizes, sparsegpt_weights=True)
    runs = {"wanda": args.steps_wanda, "sparsegpt": args.steps_sparsegpt}
    lrs = {"wanda": args.lr, "sparsegpt": args.lr if args.lr_sparsegpt is None else args.lr_sparsegpt}
    if args.only:
        runs = {args.only: runs[args.only]}
    seeds = [int(x) for x in args.seeds.split(",") if x]
    wall = {}
    port = 29590
    for seed in seeds:  # seeds outermost: a session that ends early still has both priors at one seed
        for prior, steps in (() if args.skip_train else runs.items()):
            name = f"{prior}_seed{seed}"
            run_dir = out / f"maskpro_from_{prior}" / f"seed{seed}"
            record_start(run_dir, steps, args.override)
            t0 = time.time()
            extra = [f"--mask.warm_start={args.warm_start}", f"--train.advantage_norm={args.advantage_norm}",
                     f"--train.eval_every={args.eval_every}",
                     f"--train.eval_source={val}", "--train.eval_tokens=8192", "--train.max_deviation=0.02",
                     f"--checkpoint.every={args.eval_every}", f"--train.seed={seed}", *args.override]
            train(assets.model_dir, assets.calib_text, priors[prior], run_dir,
                  DemoSizes(steps=steps, lr=lrs[prior], dtype=args.train_dtype, num_samples=512), extra=extra, port=port)
            port += 1
            best = run_dir / "checkpoints" / "best"
            export(best if best.is_file() else run_dir / "checkpoints" / "latest", assets.model_dir,
                   out / f"export_{name}", formats="mask")
            wall[name] = time.time() - t0
            from maskpro_ds.demo.plots import plot_run

            plot_run(run_dir)
    if args.skip_eval:
        return 0
    eval_sizes = DemoSizes(dtype=args.eval_dtype, eval_tokens=args.eval_tokens)
    variants = {"dense": None, "magnitude": priors["magnitude"], "wanda": priors["wanda"],
                "sparsegpt": priors["sparsegpt"], "sparsegpt_weights": priors["sparsegpt_weights"]}
    for seed in seeds:
        for prior in runs:
            variants[f"maskpro_from_{prior}_seed{seed}"] = out / f"export_{prior}_seed{seed}" / "mask"
            warm = sorted((out / f"maskpro_from_{prior}" / f"seed{seed}").glob("warm_start-*"))
            if warm:  # the mask the run started from: what the layer-wise stage alone gives
                variants[f"warm_start_from_{prior}_seed{seed}"] = warm[-1]
    wanted = set(args.variants.split(",")) if args.variants else set(variants)
    results = {}
    for name, mask in variants.items():  # each result cached per variant, so evaluation resumes too
        cached = out / "eval" / f"{name}.json"
        key = {"mask": _mask_identity(mask), "seqlen": eval_sizes.eval_seqlen, "tokens": args.eval_tokens,
               "dtype": args.eval_dtype}
        if cached.is_file() and json.loads(cached.read_text()).get("key") == key:
            results[name] = json.loads(cached.read_text())["result"]
        elif name in wanted and (mask is None or mask.is_dir()):
            results[name] = evaluate(assets.model_dir, test, {name: mask}, eval_sizes, threads=args.threads)[name]
            cached.parent.mkdir(parents=True, exist_ok=True)
            cached.write_text(json.dumps({"key": key, "result": results[name]}) + "\n")
    if set(results) != set(variants):
        print(f"evaluated {sorted(results)}; still to evaluate: {sorted(set(variants) - set(results))}")
        return 0
    ppl = {k: v["ppl"] for k, v in results.items()}
    summary = {
        "seqlen": eval_sizes.eval_seqlen, "eval_tokens": results["dense"]["tokens_used"], "eval_dtype": args.eval_dtype,
        "ppl": ppl, "seeds": seeds, "runs": {}, "lr": lrs, "advantage_norm": args.advantage_norm,
        "overrides": args.override, "warm_start": args.warm_start, "train_dtype": args.train_dtype, "samples": sizes.num_samples,
        "train_seqlen": sizes.seqlen, "batch_per_rank": sizes.batch_size, "ranks": 2, "wall_s": wall,
        "weights_changed_row": "sparsegpt_weights", "git_commit": git_commit() or "unknown", "cpu": cpu_name(),
        "command": "python -m bench.quality " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    for seed in seeds:
        for prior in runs:
            summary["runs"][f"{prior}_seed{seed}"] = run_summary(out, prior, seed, ppl)
    every = list(summary["runs"].values())
    summary["uninterrupted"] = all(r["uninterrupted"] for r in every)
    summary["forwards_per_rank"] = max(r["forwards_per_rank"] for r in every)
    summary["median"] = {f"maskpro_from_{prior}_vs_prior": statistics.median(
        summary["runs"][f"{prior}_seed{seed}"]["vs_prior"] for seed in seeds) for prior in runs}
    summary["median_gap_closed"] = {f"maskpro_from_{prior}": statistics.median(
        summary["runs"][f"{prior}_seed{seed}"]["gap_closed"] for seed in seeds) for prior in runs}
    (REPO / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (REPO / "bench" / "results" / "quality.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


def record_start(run_dir: Path, steps: int, overrides: list[str]) -> None:
    """Mark a run fresh when this command starts it, or continued when an earlier command had started it
    and it is not finished: a continued run is not an uninterrupted result."""
    marker = run_dir / "bench_run.json"
    finished = (run_dir / "checkpoints" / f"step-{steps:06d}" / "manifest.json").is_file()
    if not run_dir.exists():
        run_dir.mkdir(parents=True)
        marker.write_text(json.dumps({"uninterrupted": True, "git_commit": git_commit() or "unknown",
                                      "started": time.time(), "overrides": overrides}) + "\n")
    elif not finished:
        info = json.loads(marker.read_text()) if marker.is_file() else {"git_commit": "unknown"}
        info.update(uninterrupted=False, continued=info.get("continued", 0) + 1)
        marker.write_text(json.dumps(info) + "\n")


def run_summary(out: Path, prior: str, seed: int, ppl: dict[str, float]) -> dict:
    """One run's figures: its ppl against its prior, the exported step, forwards per rank, provenance."""
    name, run_dir = f"maskpro_from_{prior}_seed{seed}", out / f"maskpro_from_{prior}" / f"seed{seed}"
    export_info = json.loads((out / f"export_{prior}_seed{seed}" / "export.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    marker = run_dir / "bench_run.json"
    info = json.loads(marker.read_text()) if marker.is_file() else {"uninterrupted": False, "git_commit": "unknown"}
    warm = {k: v for r in records for k, v in r.items() if k.startswith("warm_start/")}
    warm_ppl = ppl.get(f"warm_start_from_{prior}_seed{seed}")
    return {
        "warm_start_ppl": warm_ppl, "warm_start_vs_prior": warm_ppl / ppl[prior] - 1 if warm_ppl else None,
        "warm_start_seconds": warm.get("warm_start/seconds"), "warm_start_forwards": warm.get("warm_start/forwards"),
        "ppl": ppl[name], "prior_ppl": ppl[prior], "vs_prior": ppl[name] / ppl[prior] - 1,
        "gap_closed": (ppl[prior] - ppl[name]) / (ppl[prior] - ppl["dense"]),
        "exported_step": export_info["source"].get("step"), "last_step": records[-1]["step"],
        "lr_used": records[-1].get("train/lr"),
        "forwards_per_rank": int(max(r.get("train/forwards", 0) for r in records)),
        # time in training steps (a continued run has gaps its timestamps would count)
        "train_minutes": round(sum(r.get("train/step_time_s", 0.0) for r in records) / 60, 1),
        "uninterrupted": bool(info.get("uninterrupted")), "git_commit": info.get("git_commit"),
    }

if __name__ == "__main__":
    sys.exit(main())
