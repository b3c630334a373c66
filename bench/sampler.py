"""Cost of MaskPro's O(weights) work per training step, beside the matmuls of the same Linears.

Two parts, all timed in this process so the ratios compare like with like on whatever machine
runs it (best of --repeat runs after a warm-up). Writes bench/results/sampler.json.

* ``layer``: one 4096 x 11008 layer of 2:4 logits (C * m0 + N(0, 0.01)): the sampler and the
  update beside a softmax over the same ``[G, 4]`` logits, plain torch and compiled kernels.
* ``step``: the 210 Linears of SmolLM2-135M (106.2M weights), as rank 0 of R ranks does them in a
  step: draw the R masks of its 1/R of the groups and pack them (the send buffer), apply its own
  full mask to the weights (model.masked_weight: packed bits into one compiled select, or unpack +
  torch.where with plain kernels; the masked forward's share), then the update with the
  masks kept from the forward (or drawn again: ``cache_samples=False``). Beside it: the matmuls
  of those Linears for one rank's batch (--tokens), the forward's main cost.

    python -m bench.sampler                   # 1 thread, R = 1 and 2, 512 and 4096 tokens
    python -m bench.sampler --part step --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

# SmolLM2-135M: 30 blocks of q, k, v, o, gate, up, down (out, in).
SMOLLM2_BLOCK = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["layer", "step", "both"], default="both")
    parser.add_argument("--c", type=float, default=10.0, help="prior logit scale C")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per figure (best is kept)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="world sizes R to model")
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 4096], help="tokens per rank for the matmuls")
    parser.add_argument("--out", default="bench/results/sampler.json", help="JSON result path")
    return parser.parse_args()


def best_time(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def layer_part(args, torch, nm, policy, sampling, select_kernels) -> dict:
    gen = torch.Generator().manual_seed(0)
    prior = nm.magnitude_prior(torch.randn(4096, 11008, generator=gen), 2, 4)
    logits = policy.init_logits(prior, args.c, 4) + 0.01 * torch.randn(4096 * 11008 // 4, 4, generator=gen)
    groups = logits.shape[0]
    keys = [sampling.key_scalar(0, 1, k, 0) for k in range(2)]
    codes = sampling.sample_codes(logits, keys)
    sample_c, update_c, name = select_kernels("auto")
    work = logits.clone()
    timings = {
        "softmax over groups": lambda: torch.softmax(logits, dim=-1),
        "sample_masks (bool [G,4])": lambda: sampling.sample_masks(logits, 2, keys[0]),
        "sample 2 masks as codes, plain": lambda: sampling.sample_codes(logits, keys),
        "update K=2, plain": lambda: policy.apply_update_codes_(work, codes, [1e-3, -1e-3], 50.0),
    }
    if name == "compiled":
        timings["sample 2 masks as codes, compiled"] = lambda: sampling.sample_codes(
            logits, keys, kernel=sample_c, chunk=1 << 16)
        timings["update K=2, compiled"] = lambda: policy.apply_update_codes_(
            work, codes, [1e-3, -1e-3], 50.0, kernel=update_c, chunk=1 << 16)
    seconds = {k: best_time(fn, args.repeat) for k, fn in timings.items()}
    base = seconds["softmax over groups"]
    print(f"\nlayer 4096x11008: {groups} groups of 4, C={args.c}, threads={args.threads}, kernels {name}")
    print(f"{'pass':<36} {'seconds':>8} {'Mgroups/s':>10} {'x softmax':>10}")
    for k, sec in seconds.items():
        print(f"{k:<36} {sec:8.3f} {groups / sec / 1e6:10.1f} {sec / base:10.2f}")
    return {"groups": groups, "kernels": name, "seconds": seconds,
            "ratio_to_softmax": {k: v / base for k, v in seconds.items()}}


def step_part(args, torch, nm, LogitStore, masked_weight) -> dict:
    from maskpro_ds.train.mask_modes import SampleMode  # after main() has set the thread count

    shapes = SMOLLM2_BLOCK * 30
    names = [f"layer{i}" for i in range(len(shapes))]
    weights = sum(o * i for o, i in shapes)
    gen = torch.Generator().manual_seed(0)
    dense = [torch.randn(o, i, generator=gen) for o, i in shapes]
    priors = [nm.magnitude_prior(w, 2, 4).view(-1, 4) for w in dense]
    out: dict = {"weights": weights, "layers": len(shapes), "per_rank": {}}
    print(f"\nSmolLM2-135M Linears: {len(shapes)} layers, {weights / 1e6:.1f}M weights, threads={args.threads}")
    matmul = {}
    for tokens in args.tokens:
        xs = {i: torch.randn(tokens, i, generator=gen) for i in {s[1] for s in shapes}}
        matmul[tokens] = best_time(lambda xs=xs: [xs[w.shape[1]] @ w.t() for w in dense], args.repeat)
        print(f"matmuls of the masked Linears, {tokens} tokens: {matmul[tokens]:.3f} s")
    out["matmul_s"] = matmul
    print(f"{'R':>2} {'kernels':<9} {'cache':<6} {'sample+pack':>11} {'unpack+where':>12} {'update':>7} {'total':>7}  "
          + "  ".join(f"{'/mm@' + str(t):>8}" for t in args.tokens))
    for world in args.ranks:
        for kernels, cache in (("plain", True), ("auto", True), ("auto", False)):
            store = LogitStore(names, shapes, 2, 4, 0, world, seed=0, cache_samples=cache, kernels=kernels)
            for layer, prior in enumerate(priors):
                g0, g1 = store.local_range(layer)
                store.init_from_prior(layer, prior[g0:g1], args.c)
            kernel_name = store.kernels()[2]
            packed = [nm.pack_bits(p.reshape(-1)) for p in priors]  # stands for the received mask bits
            state = {"t": 0}

            def forward_send(store=store, state=state):
                for layer in range(len(shapes)):
                    store.forward_send(layer, SampleMode(state["t"]))

            def unpack_where(packed=packed, fused=kernel_name == "compiled"):
                for w, bits in zip(dense, packed, strict=True):
                    if fused:  # the trainer's path: packed bits straight into the compiled select
                        masked_weight(w, bits)
                    else:
                        masked_weight(w, nm.unpack_bits(bits, w.numel()).view(w.shape))

            def update(store=store, state=state, world=world):
                for layer in range(len(shapes)):
                    store.apply_update(layer, state["t"], [1e-3] * world, 50.0)
                state["t"] += 1

            def one_step():
                forward_send()
                update()

            one_step()  # warm-up (and compile)
            parts = {"sample_pack": [], "unpack_where": [], "update": []}
            for _ in range(args.repeat):
                for key, fn in (("sample_pack", forward_send), ("unpack_where", unpack_where), ("update", update)):
                    start = time.perf_counter()
                    fn()
                    parts[key].append(time.perf_counter() - start)
            best = {k: min(v) for k, v in parts.items()}
            total = sum(best.values())
            label = f"R{world}_{'compiled' if kernel_name == 'compiled' else 'plain'}_{'cache' if cache else 'redraw'}"
            out["per_rank"][label] = {**best, "total": total,
                                      **{f"total_over_matmul_{t}": total / matmul[t] for t in args.tokens}}
            print(f"{world:>2} {kernel_name[:9]:<9} {str(cache):<6} {best['sample_pack']:11.3f} "
                  f"{best['unpack_where']:12.3f} {best['update']:7.3f} {total:7.3f}  "
                  + "  ".join(f"{total / matmul[t]:8.2f}" for t in args.tokens))
    return out


def headline(layer: dict) -> dict:
    """The table-row figures: groups/s of drawing one mask and applying its score (the default kernels),
    beside groups/s of a softmax over the same logits, and their ratio (> 1: faster than the softmax)."""
    secs, groups = layer["seconds"], layer["groups"]
    kind = "compiled" if layer["kernels"] == "compiled" else "plain"
    per_mask = (secs[f"sample 2 masks as codes, {kind}"] + secs[f"update K=2, {kind}"]) / 2
    sampled, softmax = groups / per_mask, groups / secs["softmax over groups"]
    return {"groups_per_s": sampled, "elementwise_groups_per_s": softmax, "ratio": sampled / softmax}


def main() -> None:
    args = parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch starts its pool
    import torch

    from maskpro_ds.masks import nm, policy, sampling
    from maskpro_ds.train.logit_store import LogitStore, select_kernels
    from maskpro_ds.train.zero_model import masked_weight

    torch.set_num_threads(args.threads)
    result = {"threads": args.threads, "torch": torch.__version__}
    with torch.no_grad():
        if args.part in ("layer", "both"):
            result["layer"] = layer_part(args, torch, nm, policy, sampling, select_kernels)
        if args.part in ("step", "both"):
            result["step"] = step_part(args, torch, nm, LogitStore, masked_weight)
        if "layer" in result:
            result.update(headline(result["layer"]))
            print(f"sampling + score: {result['groups_per_s'] / 1e6:.1f} Mgroups/s per mask; softmax over the same "
                  f"logits: {result['elementwise_groups_per_s'] / 1e6:.1f} Mgroups/s; ratio {result['ratio']:.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
