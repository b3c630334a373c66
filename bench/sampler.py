"""Throughput of 2:4 mask sampling and the logit update beside a plain softmax over the same logits.

One 4096 x 11008 layer (11.3M groups of 4), fp32 logits = C * m0 + N(0, 0.01) noise. Each figure
is the best of --repeat timed runs after one warm-up, all in this process, so the ratios compare
like with like on whatever machine runs it. Writes bench/results/sampler.json.

    python bench/sampler.py                 # 1 thread (the default, as in training on CPU)
    python bench/sampler.py --threads 2
    python bench/sampler.py --rows 1024     # a quarter-size layer, for a quick look
    python bench/sampler.py --compile       # also time torch.compile'd chunk kernels (~1 min to build)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096, help="out features of the layer")
    parser.add_argument("--cols", type=int, default=11008, help="in features of the layer")
    parser.add_argument("--c", type=float, default=10.0, help="prior logit scale C")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per figure (best is kept)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd kernels")
    parser.add_argument("--out", default="bench/results/sampler.json", help="JSON result path")
    return parser.parse_args()


def best_time(fn, repeat: int, sync) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    args = parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch starts its pool
    import torch

    from maskpro_ds.masks import nm, policy, sampling

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(args.rows, args.cols, generator=gen)
    prior = nm.magnitude_prior(weight, 2, 4)
    logits = policy.init_logits(prior, args.c, 4)
    logits += 0.01 * torch.randn(logits.shape, generator=gen)
    logits = logits.to(device)
    groups = logits.shape[0]
    key = sampling.key_scalar(0, 1, 0, 0)
    mask = sampling.sample_masks(logits, 2, key)
    masks4 = [sampling.sample_masks(logits, 2, sampling.key_scalar(0, 1, k, 0)) for k in range(4)]
    work = logits.clone()

    timings = {
        "softmax over groups": best_time(lambda: torch.softmax(logits, dim=-1), args.repeat, sync),
        "copy": best_time(lambda: logits.clone(), args.repeat, sync),
        "sample_masks (2:4)": best_time(lambda: sampling.sample_masks(logits, 2, key), args.repeat, sync),
        "update, K=1": best_time(lambda: policy.apply_update_(work, [mask], [1e-3], 50.0), args.repeat, sync),
        "update, K=4": best_time(lambda: policy.apply_update_(work, masks4, [1e-3] * 4, 50.0), args.repeat, sync),
    }
    if args.compile:
        sample_kernel = torch.compile(sampling.pair_index_block, dynamic=True)
        update_kernel = torch.compile(policy.update_block, dynamic=True)
        compiled_mask = sampling.sample_masks(logits, 2, key, kernel=sample_kernel)
        timings["sample_masks, compiled"] = best_time(
            lambda: sampling.sample_masks(logits, 2, key, kernel=sample_kernel), args.repeat, sync)
        timings["update K=1, compiled"] = best_time(
            lambda: policy.apply_update_(work, [mask], [1e-3], 50.0, kernel=update_kernel), args.repeat, sync)
        # Same bits as the plain path here; not guaranteed in general (last-bit rounding).
        compiled_differs = int((compiled_mask != mask).any(dim=1).sum())
    flips = float((mask != prior.view(-1, 4).to(device)).any(dim=1).float().mean())
    base = timings["softmax over groups"]
    print(f"layer {args.rows}x{args.cols}: {groups} groups of 4, C={args.c}, threads={args.threads}, "
          f"device={device.type}, sampled flip rate {flips:.2e}")
    print(f"{'pass':<22} {'seconds':>9} {'Mgroups/s':>10} {'x softmax':>10}")
    for name, sec in timings.items():
        print(f"{name:<22} {sec:9.4f} {groups / sec / 1e6:10.1f} {sec / base:10.2f}")

    result = {
        "groups_per_s": groups / timings["sample_masks (2:4)"],
        "elementwise_groups_per_s": groups / base,
        "ratio": timings["sample_masks (2:4)"] / base,
        "ratio_meaning": "sample_masks time / softmax-over-groups time (lower is better)",
        "update_groups_per_s": groups / timings["update, K=1"],
        "update_k4_groups_per_s": groups / timings["update, K=4"],
        "update_ratio": timings["update, K=1"] / base,
        "copy_groups_per_s": groups / timings["copy"],
        "groups": groups,
        "threads": args.threads,
        "device": device.type,
        "torch": torch.__version__,
        "flip_rate": flips,
    }
    if args.compile:
        result["compiled_groups_per_s"] = groups / timings["sample_masks, compiled"]
        result["compiled_update_groups_per_s"] = groups / timings["update K=1, compiled"]
        result["compiled_groups_differing_from_plain"] = compiled_differs
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"sampling runs at {result['ratio']:.2f}x the softmax time; update K=1 at "
          f"{result['update_ratio']:.2f}x; wrote {out}")


if __name__ == "__main__":
    main()
