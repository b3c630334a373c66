"""Training step vs plain ZeRO-3 forward in the same processes: the time ratio and the bytes-moved ratio.

Run on every rank of a launched job (``python -m maskpro_ds.train.step_timing`` under torchrun;
bench/step_vs_forward.py and the GPU self-check start it). Both engines are the same model,
partitioned by ZeRO-3 in the same processes: the trainer's (masked Linears, sampling, exchange,
update) and a plain one (nothing installed). Timings alternate plain forward / training step on the
same batch so machine load hits both alike; the figure is the ratio of medians. "Plain forward"
includes the fp32 loss, the work any evaluation does.

Bytes are counted with DeepSpeed's comms logger (every deepspeed.comm collective: ZeRO-3's weight
gathers, the mask all_to_all and the scalar all_gathers alike), enabled for one extra forward and
one extra step after the timed ones so its synchronisation does not touch the timings. On CUDA the
peak memory of the steps is recorded too. The precomputed baseline pass f(m0) is a one-off cost,
reported separately.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from maskpro_ds import distributed
from maskpro_ds.config import load_config
from maskpro_ds.data.schedule import batch_ids
from maskpro_ds.formats.atomic import atomic_write_text


def received_bytes(comms_logger, world: int) -> tuple[int, dict[str, int]]:
    """Bytes this rank receives from other ranks, per op and in total.

    DeepSpeed's logger records the size of each op's input tensor; what crosses the network per rank
    depends on the op: an all-gather of an input of s bytes brings (R-1)s, an all-to-all of s bytes
    (equal chunks) brings (R-1)s/R, a ring all-reduce 2(R-1)s/R, a broadcast s.
    """
    factors = {"all_gather": world - 1, "allgather": world - 1, "all_to_all": (world - 1) / world,
               "all_reduce": 2 * (world - 1) / world, "reduce_scatter": (world - 1) / world, "broadcast": 1}
    per_op: dict[str, int] = {}
    for name, sizes in comms_logger.comms_dict.items():
        factor = next((f for key, f in factors.items() if key in name), 1)
        per_op[name] = int(sum(rec[0] * size * factor for size, rec in sizes.items()))
    return sum(per_op.values()), per_op


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model_facts(trainer) -> dict:
    """What docs/scaling.md's memory model needs to know about the model."""
    from maskpro_ds.train.zero_utils import full_numel

    hf = trainer.model.config
    sizes = [s[0] * s[1] for s in trainer.store.shapes]
    return {"params": sum(full_numel(p) for p in trainer.model.parameters()), "masked": sum(sizes),
            "largest_linear": max(sizes), "layer_weights": sum(sizes) // max(1, hf.num_hidden_layers),
            "hidden": hf.hidden_size, "intermediate": getattr(hf, "intermediate_size", 4 * hf.hidden_size),
            "vocab": hf.vocab_size, "max_live": trainer.cfg.zero.max_live_parameters,
            "draws": trainer.store.draws}


def measure(cfg, repeats: int) -> dict | None:
    """Time ``repeats`` plain-forward / training-step pairs; the main rank returns the figures."""
    import deepspeed.comm as dist
    from deepspeed.comm.comm import comms_logger

    from maskpro_ds.train.trainer import Trainer
    from maskpro_ds.train.zero_model import causal_lm_loss, load_partitioned_model

    t0 = time.time()
    trainer = Trainer(cfg)
    init_s = time.time() - t0
    (Path(cfg.train.run_dir) / "baseline.safetensors").unlink(missing_ok=True)
    dist.barrier()
    t0 = time.time()
    trainer.baseline = trainer._baseline()
    baseline_s = time.time() - t0
    plain_engine, _ = load_partitioned_model(cfg, trainer.ds_config)
    info, batch = trainer.info, cfg.data.batch_size

    def plain_forward(step: int) -> None:
        ids = batch_ids(cfg.train.seed, step, info.rank, info.world_size, batch, len(trainer.samples.ids))
        tokens = trainer.samples.tokens[ids].to(info.device)
        with torch.no_grad():
            causal_lm_loss(plain_engine(input_ids=tokens).logits, tokens)

    plain_forward(0)  # warm-up both paths (kernel compilation, allocator)
    trainer.step()
    if info.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(info.device)
    fwd_times, step_times = [], []
    for _ in range(repeats):
        dist.barrier()
        t = time.time()
        plain_forward(trainer.step_index)
        _sync(info.device)
        fwd_times.append(time.time() - t)
        dist.barrier()
        t = time.time()
        trainer.step()
        _sync(info.device)
        step_times.append(time.time() - t)
    peak_gpu = torch.cuda.max_memory_allocated(info.device) if info.device.type == "cuda" else None

    comms_logger.enabled, comms_logger.prof_all, comms_logger.verbose = True, True, False
    comms_logger.comms_dict.clear()
    plain_forward(trainer.step_index)
    fwd_bytes, fwd_ops = received_bytes(comms_logger, info.world_size)
    comms_logger.comms_dict.clear()
    trainer.step()
    step_bytes, step_ops = received_bytes(comms_logger, info.world_size)
    comms_logger.enabled = False

    result = None
    if info.is_main:
        fwd, step = statistics.median(fwd_times), statistics.median(step_times)
        result = {
            "model": Path(cfg.model.path).name, "ranks": info.world_size, "device": str(info.device.type),
            "tokens_per_rank": batch * cfg.data.seqlen, "dtype": cfg.model.dtype,
            # one rank gathers nothing, so there is no bytes ratio to give
            "step_over_forward": round(step / fwd, 4),
            "bytes_over_forward": round(step_bytes / fwd_bytes, 4) if fwd_bytes else None,
            "median_step_s": round(step, 3), "median_forward_s": round(fwd, 3),
            "step_times_s": [round(x, 3) for x in step_times], "forward_times_s": [round(x, 3) for x in fwd_times],
            "forward_bytes_received": fwd_bytes, "step_bytes_received": step_bytes,
            "forward_ops": fwd_ops, "step_ops": step_ops,
            "baseline_pass_s": round(baseline_s, 2), "baseline_samples": len(trainer.samples.ids),
            "init_s": round(init_s, 2), "threads_per_rank": torch.get_num_threads(),
            "masked_weights": sum(s[0] * s[1] for s in trainer.store.shapes),
            "kernels": trainer.store.kernels()[2] if trainer.store.n == 2 else "general",
            "peak_gpu_memory_bytes": peak_gpu, "model_facts": _model_facts(trainer),
        }
    trainer.close()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML config (the model, data and batch to measure); "
                                                        "--section.key=value overrides follow")
    parser.add_argument("--repeats", type=int, default=4, help="timed forward/step pairs")
    parser.add_argument("--out", required=True, help="JSON file the main rank writes")
    args, overrides = parser.parse_known_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    result = measure(load_config(args.config, overrides), args.repeats)
    if result is not None:
        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    distributed.destroy()
    distributed.exit_process(0)


if __name__ == "__main__":
    main()
