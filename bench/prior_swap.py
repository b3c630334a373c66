"""The swap prior on the demo assets: perplexity against Wanda and SparseGPT, time, ranks, 70B speed.

    python -m bench.prior_swap                                  # ~30 min on 2 cores
    python -m bench.prior_swap --maskpro-run runs/maskpro_from_swap   # + a finished MaskPro run's figure
    python -m bench.prior_swap --maskpro-steps 1500             # + train MaskPro from swap here (hours)

Protocol of maskpro_ds/demo/run.py: SmolLM2-135M-Instruct, 2:4 on all 210 decoder Linears, held-out
perplexity on the first 16,384 tokens of heldout.txt at seqlen 512 in bf16; every prior from the
same calibration windows (default 128 x 128 tokens of calib.txt). Priors are made by
tools/make_prior.py in child processes with OMP_NUM_THREADS=--threads, timed from the outside
(wall and CPU seconds, load average before and after: the machine may be shared).

Measured: Wanda, SparseGPT (mask only; also at the demo's 32 x 128 calibration tokens), swap from
Wanda in the three calibration variants (dense; sequential; sequential with the dense model's
output as target), swap from SparseGPT, the default swap on 2 ranks (torchrun, one thread each)
compared byte for byte with the one-process run, and seconds per sweep of the search kernel on a
slice of a 70B-shaped down_proj (8192 x 28672, H 28672²), extrapolated to the whole layer. Every
stage is cached under --work. Writes bench/results/prior_swap.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.provenance import git_commit

REPO = Path(__file__).resolve().parents[1]
TOOL = str(REPO / "tools" / "make_prior.py")
# Calibration variants of the swap prior: (--swap-calib, --swap-target).
VARIANTS = {"dense": ("dense", "own"), "sequential": ("sequential", "own"),
            "sequential_dense_target": ("sequential", "dense")}


def _timed(cmd: list[str], log: Path, threads: int) -> dict:
    """Run a child to completion; wall and CPU seconds (children's user + system) and the load around it."""
    from maskpro_ds.train.local_launch import child_env

    env = child_env(OMP_NUM_THREADS=str(threads))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load0, t0 = os.getloadavg()[0], time.time()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    wall = time.time() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}; log: {log}\n{log.read_text()[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "threads": threads,
            "load_before": round(load0, 2), "load_after": round(os.getloadavg()[0], 2)}


def make(name: str, args: list[str], work: Path, common: list[str], threads: int, ranks: int = 1) -> dict:
    """One prior artifact under work/name (skipped when already there); returns its timing record."""
    out, record = work / name, work / f"{name}.time.json"
    if (out / "mask_manifest.json").is_file() and record.is_file():
        return json.loads(record.read_text())
    if ranks == 1:
        cmd = [sys.executable, TOOL]
    else:
        from maskpro_ds.train.local_launch import free_port

        cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(ranks), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), TOOL]
    print(f"  making {name} ({ranks} rank(s) x {threads} thread(s))", flush=True)
    timing = _timed([*cmd, *common, *args, "--out", str(out), "--force"], work / f"{name}.log", threads)
    timing["ranks"] = ranks
    record.write_text(json.dumps(timing) + "\n")
    print(f"    {timing}", flush=True)
    return timing


def seventy_b_sweep(rows: int, sweeps: int) -> dict:
    """Seconds per sweep of the search on ``rows`` rows of a 70B down_proj (8192 x 28672), one thread."""
    import torch

    from maskpro_ds.masks.local_search import SearchConfig, local_search
    from maskpro_ds.masks.nm import magnitude_prior

    torch.set_num_threads(1)
    out_f, in_f = 8192, 28672
    g = torch.Generator().manual_seed(0)
    # A positive definite H with correlated inputs: XᵀX of 512 random tokens plus a diagonal.
    x = torch.randn(512, in_f, generator=g)
    h = x.T @ x / 512
    h.diagonal().add_(1.0)
    del x
    w = torch.randn(rows, in_f, generator=g) * 0.02
    start = magnitude_prior(w, 2, 4)
    t0 = time.perf_counter()
    _, stats = local_search(w, h, start, 2, 4, SearchConfig(max_sweeps=sweeps, tol=0.0, row_chunk=rows))
    per_sweep = (time.perf_counter() - t0) / stats.sweeps
    return {"layer": "down_proj", "shape": [out_f, in_f], "rows_measured": rows, "sweeps_measured": stats.sweeps,
            "seconds_per_sweep_rows": round(per_sweep, 2),
            "seconds_per_sweep_layer": round(per_sweep * out_f / rows, 1),
            "hessian_gb": round(in_f * in_f * 4 / 1e9, 2), "threads": 1,
            "macs_per_sweep_layer": 1.5 * out_f * in_f * in_f}


def maskpro_figures(args, assets, swap_prior: Path, work: Path) -> dict[str, Path]:
    """Masks of MaskPro trained from the swap prior, one per seed: from --maskpro-run, or trained here.

    With --maskpro-steps every seed in --maskpro-seeds is an uninterrupted run of its own (a finished
    one is reused, an interrupted one resumes: delete its directory for a clean figure)."""
    from maskpro_ds.demo.run import DemoSizes, export, train

    runs = {}
    if args.maskpro_run:
        runs["maskpro_from_swap_run"] = Path(args.maskpro_run)
    elif args.maskpro_steps:
        for seed in [int(s) for s in args.maskpro_seeds.split(",")]:
            run_dir = work / f"maskpro_from_swap_seed{seed}"
            train(assets.model_dir, assets.calib_text, swap_prior, run_dir,
                  DemoSizes(steps=args.maskpro_steps, lr=args.maskpro_lr, num_samples=512),
                  extra=[f"--train.seed={seed}"], port=29640 + seed)
            runs[f"maskpro_from_swap_seed{seed}"] = run_dir
    masks = {}
    for name, run_dir in runs.items():
        best = run_dir / "checkpoints" / "best"
        if not (best.is_file() or (run_dir / "checkpoints" / "latest").is_file()):
            raise SystemExit(f"{run_dir}: no checkpoints/best or checkpoints/latest; is the run finished?")
        export(best if best.is_file() else run_dir / "checkpoints" / "latest", assets.model_dir,
               work / f"export_{name}", formats="mask")
        masks[name] = work / f"export_{name}" / "mask"
    return masks


def _run_metrics(work: Path, name: str) -> list[dict]:
    path = work / name / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _forwards(work: Path, runs: dict) -> dict:
    """Forward passes per rank of each trained run (train/forwards of its last logged step)."""
    out = {}
    for name in runs:
        counts = [m["train/forwards"] for m in _run_metrics(work, name) if "train/forwards" in m]
        out[name] = counts[-1] if counts else None
    return out


def _uninterrupted(work: Path, runs: dict) -> bool | None:
    """True when no trained run was resumed: the launch log (rewritten by every launch) never resumed."""
    if not runs:
        return None
    logs = [work / f"{name}.log" for name in runs]
    if not all(log.is_file() for log in logs):
        return None  # a run trained elsewhere (--maskpro-run): not known here
    return all("resumed from" not in log.read_text() for log in logs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(REPO / "runs" / "bench_swap"), help="artifacts and logs (cached)")
    p.add_argument("--cache-dir", default=str(REPO / ".cache" / "demo"), help="demo assets")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--sweeps", type=int, default=5)
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--variant", default="dense", choices=tuple(VARIANTS),
                   help="the default calibration variant (key 'swap'); the others are measured beside it")
    p.add_argument("--swap-dtype", default="auto",
                   help="--dtype of the swap runs (their forward; the search is fp32); auto: bf16 where native")
    p.add_argument("--threads", type=int, default=1, help="threads of each one-process prior run")
    p.add_argument("--eval-threads", type=int, default=1, help="threads of the perplexity evaluation")
    p.add_argument("--rows-70b", type=int, default=512, help="rows of the 70B-shaped down_proj timed")
    p.add_argument("--skip-70b", action="store_true")
    p.add_argument("--skip-ranks", action="store_true")
    p.add_argument("--maskpro-run", help="a finished MaskPro run directory trained from the swap prior")
    p.add_argument("--maskpro-steps", type=int, default=0, help="train MaskPro from swap here for this many steps")
    p.add_argument("--maskpro-lr", type=float, default=1.5)
    p.add_argument("--maskpro-seeds", default="0,1", help="comma-separated seeds of the --maskpro-steps runs")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "prior_swap.json"))
    args = p.parse_args(argv)
    from maskpro_ds.formats.compute_dtype import resolve_dtype

    args.swap_dtype = resolve_dtype(args.swap_dtype, option="--swap-dtype")
    from maskpro_ds.demo.assets import prepare_demo
    from maskpro_ds.demo.run import DemoSizes, evaluate

    assets = prepare_demo(Path(args.cache_dir))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    common = ["--model", str(assets.model_dir), "--calib", str(assets.calib_text), "--nsamples", str(args.nsamples),
              "--seqlen", str(args.seqlen)]

    def swap(variant: str, start: str) -> list[str]:
        calib, target = VARIANTS[variant]
        return ["--method", "swap", "--swap-start", start, "--swap-calib", calib, "--swap-target", target,
                "--swap-sweeps", str(args.sweeps), "--swap-tol", str(args.tol), "--dtype", args.swap_dtype]

    plan = {"wanda": ["--method", "wanda"], "sparsegpt": ["--method", "sparsegpt"],
            "sparsegpt_32x128": ["--method", "sparsegpt", "--nsamples", "32", "--seqlen", "128"],
            "swap": swap(args.variant, "wanda")}
    plan.update({f"swap_{v}": swap(v, "wanda") for v in VARIANTS if v != args.variant})
    plan["swap_from_sparsegpt"] = swap(args.variant, "sparsegpt")
    print(f"[1/4] priors ({args.nsamples} x {args.seqlen} calibration tokens)", flush=True)
    timing = {name: make(name, a, work, common, args.threads) for name, a in plan.items()}
    ranks_identical = None
    if not args.skip_ranks:
        print("[2/4] the default swap on 2 ranks", flush=True)
        timing["swap_2_ranks"] = make("swap_2_ranks", plan["swap"], work, common, threads=1, ranks=2)
        same_threads = timing["swap"]["threads"] == 1
        ranks_identical = ((work / "swap" / "masks.safetensors").read_bytes()
                           == (work / "swap_2_ranks" / "masks.safetensors").read_bytes()) if same_threads else None
    print("[3/4] held-out perplexity", flush=True)
    variants = {"dense": None, **{name: work / name for name in plan}}
    variants.update(maskpro_figures(args, assets, work / "swap", work))
    sizes = DemoSizes()
    results = {}
    for name, mask in variants.items():  # cached per variant: a rerun only evaluates what changed
        cached = work / "eval" / f"{name}.json"
        key = {"mask": None if mask is None else json.loads((mask / "mask_manifest.json").read_text()),
               "tokens": sizes.eval_tokens, "seqlen": sizes.eval_seqlen, "dtype": sizes.dtype}
        if cached.is_file() and json.loads(cached.read_text())["key"] == key:
            results[name] = json.loads(cached.read_text())["result"]
            continue
        results[name] = evaluate(assets.model_dir, assets.heldout_text, {name: mask}, sizes,
                                 threads=args.eval_threads)[name]
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps({"key": key, "result": results[name]}) + "\n")
    seventy = None
    if not args.skip_70b:
        print(f"[4/4] search speed on {args.rows_70b} rows of a 70B-shaped down_proj", flush=True)
        seventy = seventy_b_sweep(args.rows_70b, sweeps=2)
    ppl = {name: res["ppl"] for name, res in results.items() if not name.startswith("maskpro_from_swap")}
    maskpro_ppl = {name: res["ppl"] for name, res in results.items() if name.startswith("maskpro_from_swap")}
    # The headline is the median over seeds (one run: its own figure).
    ppl["maskpro_from_swap"] = statistics.median(maskpro_ppl.values()) if maskpro_ppl else None
    meta = {name: json.loads((work / name / "mask_manifest.json").read_text()).get("swap")
            for name in plan if name.startswith("swap")}
    summary = {
        "ppl": ppl,
        "minutes": round(timing["swap"]["wall_s"] / 60, 2),
        "cpu_minutes": round(timing["swap"]["cpu_s"] / 60, 2),
        "groups_changed": meta["swap"]["groups_changed_fraction"],
        "sweeps": {"max": meta["swap"]["sweeps_max"], "mean": meta["swap"]["sweeps_mean"], "limit": args.sweeps,
                   "tol": args.tol},
        "ranks_identical": ranks_identical,
        "seconds_per_sweep_70b_layer": seventy["seconds_per_sweep_layer"] if seventy else None,
        "seventy_b_layer": seventy,
        "maskpro_from_swap": {"per_run": maskpro_ppl, "steps": args.maskpro_steps or None,
                              "forwards_per_rank": _forwards(work, maskpro_ppl),
                              "median_vs_swap": (round(ppl["maskpro_from_swap"] / ppl["swap"] - 1, 4)
                                                 if maskpro_ppl else None),
                              "lr": args.maskpro_lr, "advantage_norm": "rms", "uninterrupted": _uninterrupted(work, maskpro_ppl)},
        "commit": git_commit(),
        "swap_vs_sparsegpt": round(ppl["swap"] / ppl["sparsegpt"], 4),
        "swap_vs_sparsegpt_32x128": round(ppl["swap"] / ppl["sparsegpt_32x128"], 4),
        "default_variant": args.variant,
        "calib_modes": {v: {"calib": VARIANTS[v][0], "target": VARIANTS[v][1], "ppl": ppl[name],
                            "minutes": round(timing[name]["wall_s"] / 60, 2),
                            "cpu_minutes": round(timing[name]["cpu_s"] / 60, 2),
                            "groups_changed": meta[name]["groups_changed_fraction"], "timing_s": meta[name]["timing_s"]}
                        for v in VARIANTS for name in ["swap" if v == args.variant else f"swap_{v}"]},
        "swap_from_sparsegpt": {"groups_changed": meta["swap_from_sparsegpt"]["groups_changed_fraction"],
                                "minutes": round(timing["swap_from_sparsegpt"]["wall_s"] / 60, 2)},
        "timing": timing,
        "swap_phases_s": meta["swap"]["timing_s"],
        "protocol": {"model": "SmolLM2-135M-Instruct", "pattern": "2:4", "layers": 210,
                     "calibration": f"{args.nsamples} x {args.seqlen} tokens of calib.txt",
                     "eval": f"first {results['dense']['tokens_used']} tokens of heldout.txt, seqlen "
                             f"{sizes.eval_seqlen}, {sizes.dtype}",
                     "machine": f"{os.cpu_count()} CPU cores, shared with other jobs (load averages in timing)"},
        "command": "python -m bench.prior_swap " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from maskpro_ds.formats.atomic import atomic_write_text

    atomic_write_text(out, json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: summary[k] for k in ("ppl", "minutes", "groups_changed", "ranks_identical",
                                              "seconds_per_sweep_70b_layer", "swap_vs_sparsegpt")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
