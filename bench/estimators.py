"""The estimator tournament: validation perplexity against forward passes, at an equal budget.

    python -m bench.estimators --screen                  # every option, 300 forwards per rank, seeds 0 and 1
    python -m bench.estimators --final                   # the best 3 of the screen + the paper's row, 1,500
    python -m bench.estimators --final --options paper,loo2_rms,adaptive2_rms
    python -m bench.estimators --forwards 20 --options tracker_rms --seeds 0 --samples 16   # smoke test
    python -m bench.estimators --list                    # the options and what they set

SmolLM2-135M-Instruct from the SparseGPT prior (``--prior``), all 210 decoder Linears at 2:4, 2
DeepSpeed ZeRO-3 CPU ranks, the demo's calibration text (``--samples`` windows of 128 tokens, batch
4 per rank). Every option gets the same budget of forward passes per rank (the trainer's
``train/forwards``: K per step for K masks per step, the cached f(m0) pass counted once), so an
option drawing more masks per step takes fewer steps. Validation perplexity (bench/quality.py's
validation split: the held-out Wikipedia articles after the first 16, which stay the test text) is
measured on the prior before the first step and about every ``--eval-forwards`` forwards after.

Runs are uninterrupted: a run directory left without its result by an interrupted command is
started again from scratch (``--allow-resume`` continues it instead and marks it so). Results
accumulate in bench/results/estimators.json (one entry per mode, option and seed, each with its
commit, dtype and CPU; ``--results`` elsewhere; custom budgets write into ``--out``) with a PNG of
every curve beside it, rewritten after every finished run. A finished run is never run again:
rerunning a command, in this checkout or in a fresh clone that has the results file, only does
what is missing. Training is fp32 unless ``--dtype`` says otherwise, so runs made on CPUs with and
without native bf16 belong in one table. docs/estimators.md explains the
options and how to read the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from bench.provenance import cpu_name, git_commit
from bench.quality import split_heldout
from maskpro_ds.demo.assets import prepare_demo
from maskpro_ds.demo.run import DemoSizes, train
from maskpro_ds.formats.compute_dtype import resolve_dtype
from maskpro_ds.train.forward import num_rounds

REPO = Path(__file__).resolve().parents[1]
RANKS, BATCH, SEQLEN = 2, 4, 128
MODES = {"screen": 300, "final": 1500}
PAPER = "paper"

# name -> (what it is, lr, overrides). The lr values: the paper's 50 for its plain update; 1.5 for
# rms-normalised advantages with one mask per rank (docs/training.md, measured on this model), and
# 1.5·K with K masks, which keeps the logit change per deviation event (lr·|a|/(R·K) ≈ 0.75 logits)
# and the drift per forward of that recipe; adaptive: chosen so a group's first deviation moves its
# logits by about 1 (|d| ≈ |a|/(R·K) ≈ 0.25, 0.04 · 0.25 / 0.01). None of the new rows is tuned:
# that is what the screen is for. Every other setting is the trainer's default.
OPTIONS: dict[str, tuple[str, float, list[str]]] = {
    PAPER: ("MaskPro as published: residual with the tracker, plain update", 50.0, []),
    "tracker_rms": ("residual with the tracker, rms-normalised advantages (the current recipe)", 1.5,
                    ["--train.advantage_norm=rms"]),
    "tracker_rms_cosine": ("tracker_rms at twice the lr, cosine decay to 0.1", 3.0,
                           ["--train.advantage_norm=rms", "--train.lr_schedule=cosine"]),
    "loo2_rms": ("2 masks per rank on the same batch, leave-one-out baseline, rms", 3.0,
                 ["--train.estimator=loo", "--train.masks_per_step=2", "--train.advantage_norm=rms"]),
    "loo4_rms": ("4 masks per rank, leave-one-out, rms", 6.0,
                 ["--train.estimator=loo", "--train.masks_per_step=4", "--train.advantage_norm=rms"]),
    "loo2_mix_rms": ("loo2_rms with half the tracker in the baseline", 3.0,
                     ["--train.estimator=loo", "--train.masks_per_step=2", "--train.loo_tracker_weight=0.5",
                      "--train.advantage_norm=rms"]),
    "adaptive2_rms": ("loo2_rms plus per-logit second-moment steps (eps 0.01)", 0.04,
                      ["--train.estimator=adaptive", "--train.masks_per_step=2", "--train.advantage_norm=rms",
                       "--train.adaptive_eps=0.01"]),
    "adaptive1_rms": ("the tracker plus per-logit second-moment steps, one mask per rank", 0.04,
                      ["--train.estimator=adaptive", "--train.advantage_norm=rms", "--train.adaptive_eps=0.01"]),
    "credit4_rms": ("tracker_rms plus layer-local credit (lambda 1e4) every 4th step, charged its measured cost",
                    1.5, ["--train.advantage_norm=rms", "--train.layer_credit=1e4", "--train.layer_credit_every=4"]),
    "credit4_weak_rms": ("credit4_rms at a fifth of lambda (2e3): at 1e4 it helped for 6 credit steps, then hurt",
                         1.5, ["--train.advantage_norm=rms", "--train.layer_credit=2e3", "--train.layer_credit_every=4"]),
    "swap_rms": ("layer-wise warm start (the trainer's mask.warm_start = swap from the prior, 128 windows, its "
                 "wall time charged in forwards), then tracker_rms", 1.5,
                 ["--train.advantage_norm=rms", "--mask.warm_start=swap", "--mask.warm_start_samples=128"]),
    "loo2_rms_c8": ("loo2_rms from C = 8 (more exploration: ~7x the deviations of C = 10)", 3.0,
                    ["--train.estimator=loo", "--train.masks_per_step=2", "--train.advantage_norm=rms",
                     "--mask.init_scale=8"]),
}


# What a layer-credit step costs in forwards of this bench's shape (4 x 128 tokens per rank), measured
# on SmolLM2 (docs/estimators.md: 0.41 s per block against 0.076 s of forward per block). The trainer
# charges each credit step one forward; the bench charges this instead, in the plan and in every
# figure it reports, and records what the run itself measured beside it.
CREDIT_COST = 5.4


# Options with ``--mask.warm_start``: the trainer runs the swap search (priors/warm_start.py) before
# its first step and counts the search's calibration forwards; the bench charges the warm start's
# whole wall time instead (calibration forwards and search, logged as warm_start/seconds), divided by
# the run's median step time (a step is a forward plus 4% of sampling and update). The plan keeps
# WARM_RESERVE forwards of the budget for it; a longer warm start shows as forwards over the budget.
WARM_RESERVE = 50


def warm_started(overrides: list[str]) -> bool:
    return override(overrides, "mask.warm_start", "none") != "none"


def override(overrides: list[str], key: str, default: str) -> str:
    """The value of ``--key=value`` in ``overrides`` (the last one wins), else ``default``."""
    value = default
    for item in overrides:
        if item.startswith(f"--{key}="):
            value = item.split("=", 1)[1]
    return value


def credit_every(overrides: list[str]) -> int:
    """k of train.layer_credit_every when the option turns the layer credit on, else 0."""
    return int(override(overrides, "train.layer_credit_every", "1")) if float(
        override(overrides, "train.layer_credit", "0")) > 0 else 0


def forwards_per_step(overrides: list[str]) -> float:
    """K (``--train.masks_per_step``, default 1), plus 1 with the online baseline, plus the layer
    credit's charged cost spread over its steps."""
    k = int(override(overrides, "train.masks_per_step", "1"))
    every = credit_every(overrides)
    return k + any(item == "--train.baseline=online" for item in overrides) + (CREDIT_COST / every if every else 0.0)


def charged(forwards: float, step: int, overrides: list[str]) -> float:
    """The trainer's count of forwards after ``step`` steps, with each credit step charged CREDIT_COST."""
    every = credit_every(overrides)
    return forwards + ((CREDIT_COST - 1.0) * -(-step // every) if every else 0.0)


def plan(budget: int, samples: int, fps: float, eval_forwards: int) -> tuple[int, int]:
    """(steps, eval_every): the most steps whose forwards fit the budget, a whole number of evaluation
    intervals of about ``eval_forwards`` forwards each."""
    left = budget - num_rounds(samples, RANKS, BATCH)
    if left < fps:
        raise SystemExit(f"--forwards {budget}: the f(m0) pass of {samples} samples takes "
                         f"{num_rounds(samples, RANKS, BATCH)} forwards per rank; nothing is left for a step "
                         "(raise --forwards or lower --samples)")
    every = max(1, round(eval_forwards / fps))
    steps = int(left // fps)
    return (steps // every) * every or steps, min(every, steps)


def make_prior(assets, method: str, out: Path, calib_samples: int) -> Path:
    from maskpro_ds.priors.base import PriorSpec
    from maskpro_ds.priors.make import make_prior as make

    target = out / method
    if not (target / "mask_manifest.json").is_file():
        print(f"prior {method} ({calib_samples} x 128 calibration tokens) -> {target}", flush=True)
        make(PriorSpec(model=str(assets.model_dir), method=method, out=str(target), calib=str(assets.calib_text),
                       nsamples=calib_samples, seqlen=128, force=True))
    return target


def warm_start_record(run_dir: Path) -> tuple[dict, float | None]:
    """(the run's warm_start/* metrics, its median ``train/step_time_s``)."""
    warm, times = {}, []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        warm.update({k: v for k, v in record.items() if k.startswith("warm_start/")})
        if "train/step_time_s" in record:
            times.append(record["train/step_time_s"])
    return warm, (statistics.median(times) if times else None)


def read_curve(run_dir: Path, overrides: list[str]) -> tuple[list[list[float]], int, float, float | None]:
    """([[forwards, val ppl], ...], last step, forwards at the last step, measured credit cost) from a run's
    metrics.jsonl, forwards as charged (:func:`charged`). The measured cost: the mean time of credit
    steps over that of the other steps, minus one, plus the one forward the step runs anyway."""
    curve, step, forwards = [], 0, 0.0
    times: dict[bool, list[float]] = {True: [], False: []}
    every = credit_every(overrides)
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "eval/ppl" in record:
            curve.append([charged(float(record["train/forwards"]), record["step"], overrides), record["eval/ppl"]])
        if "train/forwards" in record:
            step, forwards = record["step"], charged(float(record["train/forwards"]), record["step"], overrides)
        if every and "train/step_time_s" in record:
            times[(record["step"] - 1) % every == 0].append(record["train/step_time_s"])
    measured = None
    if times[True] and times[False]:
        measured = statistics.median(times[True]) / statistics.median(times[False])
    return curve, step, forwards, measured


def run_option(name: str, seed: int, args, assets, prior: Path, val: Path, out: Path, mode: str) -> dict:
    """Train one (option, seed) to the budget, or read its finished result."""
    what, lr, overrides = OPTIONS[name]
    run_dir = out / mode / name / f"seed{seed}"
    done = run_dir / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    interrupted = run_dir.exists()
    if interrupted and not args.allow_resume:
        print(f"{name} seed {seed}: an interrupted run is started again from scratch", flush=True)
        shutil.rmtree(run_dir)
        interrupted = False
    fps = forwards_per_step(overrides)
    reserve = WARM_RESERVE if warm_started(overrides) else 0
    steps, eval_every = plan(args.forwards - reserve, args.samples, fps, args.eval_forwards)
    extra = [*overrides, f"--train.seed={seed}", f"--train.eval_every={eval_every}", f"--train.eval_source={val}",
             f"--train.eval_tokens={args.eval_tokens}", "--train.eval_at_start=true",
             f"--checkpoint.every={eval_every}", "--checkpoint.keep_last=1", "--train.max_deviation=0.02"]
    print(f"{name} seed {seed}: {steps} steps x {fps} forwards (+{num_rounds(args.samples, RANKS, BATCH)} for f(m0)), "
          f"lr {lr}, eval every {eval_every} steps -> {run_dir}", flush=True)
    t0 = time.time()
    run_dir.mkdir(parents=True, exist_ok=True)
    train(assets.model_dir, assets.calib_text, prior, run_dir,
          DemoSizes(steps=steps, lr=lr, advantage_norm="none", dtype=args.dtype, num_samples=args.samples,
                    batch_size=BATCH, seqlen=SEQLEN),
          extra=extra)
    curve, last_step, forwards, credit_measured = read_curve(run_dir, overrides)
    warm = None
    if warm_started(overrides):
        record, step_s = warm_start_record(run_dir)
        charge = record["warm_start/seconds"] / step_s
        warm = {"wall_s": record["warm_start/seconds"], "step_time_s": step_s, "charged_forwards": round(charge, 1),
                "counted_forwards": record["warm_start/forwards"],
                "groups_changed": record.get("warm_start/groups_changed"), "val_ppl": curve[0][1] if curve else None}
        shift = charge - record["warm_start/forwards"]  # the trainer counted the calibration forwards only
        curve = [[round(f + shift, 1), ppl] for f, ppl in curve]
        forwards = round(forwards + shift, 1)
        prior_val = prior_val_ppl(args)
        if prior_val is not None:
            curve.insert(0, [0.0, prior_val])
    result = {"name": name, "seed": seed, "forwards": forwards, "val_ppl": curve, "steps": last_step,
              "forwards_per_step": fps, "lr": lr, "overrides": overrides, "what": what, "mode": mode,
              "budget": args.forwards, "uninterrupted": not interrupted, "wall_s": round(time.time() - t0, 1),
              "final_val_ppl": curve[-1][1] if curve else None, "prior_val_ppl": curve[0][1] if curve else None,
              "train_dtype": args.dtype, "git_commit": git_commit() or "unknown", "cpu": cpu_name()}
    if warm is not None:
        result["warm_start"] = warm
    if credit_every(overrides):
        result.update(credit_cost_charged=CREDIT_COST, credit_step_time_ratio=credit_measured)
    done.write_text(json.dumps(result, indent=1) + "\n")
    return result


def prior_val_ppl(args) -> float | None:
    """The prior's validation perplexity as the runs without a warm start measured it (the same for
    every option and seed: one mask, one text), from the results file; None before any such run."""
    results = Path(args.results)
    if not results.is_file():
        return None
    for e in json.loads(results.read_text())["options"]:
        if not warm_started(e.get("overrides", [])) and e.get("train_dtype") == args.dtype and e.get("prior_val_ppl"):
            return e["prior_val_ppl"]
    return None


def summarise(entries: list[dict]) -> dict:
    """Per (mode, option): median over seeds of the last validation perplexity, and the seeds' values."""
    groups: dict[str, list[dict]] = {}
    for e in entries:
        groups.setdefault(f"{e['mode']}/{e['name']}", []).append(e)
    out = {}
    for key, runs in sorted(groups.items()):
        finals = [r["final_val_ppl"] for r in runs if r.get("final_val_ppl") is not None]
        out[key] = {"seeds": [r["seed"] for r in runs], "final_val_ppl": finals,
                    "median_final_val_ppl": statistics.median(finals) if finals else None,
                    "prior_val_ppl": runs[0].get("prior_val_ppl"), "forwards": [r["forwards"] for r in runs]}
    return out


def plot(entries: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({e["name"] for e in entries})
    colors = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}
    modes = sorted({e["mode"] for e in entries})
    fig, axes = plt.subplots(1, len(modes), figsize=(7 * len(modes), 5), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        for e in sorted((e for e in entries if e["mode"] == mode), key=lambda e: (e["name"], e["seed"])):
            if e["val_ppl"]:
                xs, ys = zip(*e["val_ppl"], strict=True)
                ax.plot(xs, ys, color=colors[e["name"]], ls="-" if e["seed"] % 2 == 0 else "--", marker=".",
                        label=f"{e['name']} (seed {e['seed']})")
        ax.set(xlabel="forward passes per rank", ylabel="validation perplexity", title=f"{mode}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    tmp = path.with_name(f".tmp-{path.name}")
    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def best_of_screen(results: Path, count: int) -> list[str]:
    """The ``count`` options with the lowest median validation perplexity at the end of the screen."""
    if not results.is_file():
        raise SystemExit(f"--final without --options needs the screen's results in {results}; run --screen first")
    summary = summarise([e for e in json.loads(results.read_text())["options"] if e["mode"] == "screen"])
    ranked = sorted((v["median_final_val_ppl"], k.split("/", 1)[1]) for k, v in summary.items()
                    if v["median_final_val_ppl"] is not None)
    return [name for _, name in ranked[:count]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--screen", action="store_true", help=f"{MODES['screen']} forwards per rank, every option")
    mode.add_argument("--final", action="store_true", help=f"{MODES['final']} forwards per rank, the best of the screen")
    mode.add_argument("--forwards", type=int, help="a custom budget (forwards per rank); results go into --out")
    p.add_argument("--options", default="", help="comma list of options (default: all; --final: best 3 + paper)")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--prior", default="sparsegpt", choices=["magnitude", "wanda", "sparsegpt"])
    p.add_argument("--samples", type=int, default=512, help="calibration windows of 128 tokens")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration windows for the prior")
    p.add_argument("--eval-forwards", type=int, default=50, help="forwards per rank between evaluations")
    p.add_argument("--eval-tokens", type=int, default=8192)
    # fp32 by default, not auto: sessions land on CPUs with and without native bf16, and runs are only
    # comparable within one dtype; fp32 runs from any x86 machine can share one table.
    p.add_argument("--dtype", default="fp32", help="fp32 (default) | bf16 | auto (bf16 where the CPU runs it natively)")
    p.add_argument("--cache", default=str(REPO / ".cache" / "demo"), help="the demo asset cache")
    p.add_argument("--out", default=str(REPO / "runs" / "estimators"))
    p.add_argument("--results", default="", help="results JSON (default: bench/results/estimators.json for "
                   "--screen/--final, <out>/estimators.json for a custom budget)")
    p.add_argument("--allow-resume", action="store_true", help="continue interrupted runs (marked uninterrupted=false)")
    p.add_argument("--list", action="store_true", help="list the options and exit")
    args = p.parse_args(argv)
    args.dtype = resolve_dtype(args.dtype)
    if args.list:
        for name, (what, lr, overrides) in OPTIONS.items():
            print(f"{name:<20} lr {lr:<6g} {what}\n{'':<20} {' '.join(overrides) or '(defaults)'}")
        return 0
    mode = "screen" if args.screen else "final" if args.final else f"forwards{args.forwards}" if args.forwards else None
    if mode is None:
        p.error("choose --screen, --final or --forwards N (or --list)")
    args.forwards = MODES.get(mode, args.forwards)
    out = Path(args.out)
    results = Path(args.results) if args.results else (
        REPO / "bench" / "results" / "estimators.json" if mode in MODES else out / "estimators.json")
    args.results = str(results)
    names = [n for n in args.options.split(",") if n]
    if not names:
        names = list(OPTIONS) if mode != "final" else [PAPER, *[n for n in best_of_screen(results, 3) if n != PAPER]]
    unknown = sorted(set(names) - set(OPTIONS))
    if unknown:
        p.error(f"--options: unknown {unknown}; known: {', '.join(OPTIONS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]

    out.mkdir(parents=True, exist_ok=True)
    assets = prepare_demo(args.cache)
    _, val = split_heldout(assets.heldout_text, out)
    prior = make_prior(assets, args.prior, out / "priors", args.calib_samples)
    meta = {"prior": args.prior, "model": "SmolLM2-135M-Instruct", "pattern": "2:4", "ranks": RANKS,
            "batch_per_rank": BATCH, "seqlen": SEQLEN, "samples": args.samples, "train_dtype": args.dtype,
            "eval_tokens": args.eval_tokens, "eval_forwards": args.eval_forwards,
            "baseline_forwards": num_rounds(args.samples, RANKS, BATCH),
            "command": "python -m bench.estimators " + " ".join(sys.argv[1:] if argv is None else argv)}
    # Seeds outermost: an interrupted screen still has every option at its first seed. The results
    # file is rewritten after every run, so a session that ends mid-tournament keeps what finished,
    # and an entry already in it (same mode, option, seed, budget and dtype) is not run again.
    for seed in seeds:
        for name in names:
            kept = recorded(results, mode, name, seed, args)
            if kept is not None:
                print(f"{name} seed {seed}: kept from {results} (commit {kept.get('git_commit', '?')})", flush=True)
                continue
            entry = run_option(name, seed, args, assets, prior, val, out, mode)
            write_results(results, entry, meta)
    summary = json.loads(results.read_text())
    print(f"\n{'option':<28} {'seeds':<8} {'forwards':>9} {'prior val':>10} {'final val (median)':>19}")
    for key, v in summary["summary"].items():
        med = v["median_final_val_ppl"]
        print(f"{key:<28} {','.join(map(str, v['seeds'])):<8} {max(v['forwards']):>9} "
              f"{v['prior_val_ppl'] or float('nan'):>10.2f} {med if med is not None else float('nan'):>19.2f}")
    print(f"results: {results}\nplot: {results.with_suffix('.png')}")
    return 0


def recorded(results: Path, mode: str, name: str, seed: int, args) -> dict | None:
    """The finished entry for (mode, option, seed) in ``results``, if it was run with this budget and dtype."""
    if not results.is_file():
        return None
    for e in json.loads(results.read_text())["options"]:
        if (e["mode"], e["name"], e["seed"]) == (mode, name, seed) and e.get("budget") == args.forwards \
                and e.get("train_dtype") == args.dtype:
            return e
    return None


def write_results(results: Path, entry: dict, meta: dict) -> None:
    """Merge one finished entry into ``results`` (replacing its mode, option and seed), redraw the PNG."""
    old = json.loads(results.read_text())["options"] if results.is_file() else []
    key = (entry["mode"], entry["name"], entry["seed"])
    entries = [e for e in old if (e["mode"], e["name"], e["seed"]) != key] + [entry]
    png = plot(entries, results.with_suffix(".png"))
    summary = {"options": entries, "summary": summarise(entries), **meta,
               "git_commit": git_commit() or "unknown", "plot": png.name}
    results.parent.mkdir(parents=True, exist_ok=True)
    tmp = results.with_name(f".tmp-{results.name}")
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(tmp, results)

if __name__ == "__main__":
    sys.exit(main())
