"""Training step vs plain ZeRO-3 forward, side by side in one run: time ratio and bytes-moved ratio.

    python -m bench.step_vs_forward                 # SmolLM2-135M demo model, 2 ranks, 32 x 128 tokens/rank, bf16
    python -m bench.step_vs_forward --ranks 4 --batch 8

Both engines are the same model, loaded partitioned by ZeRO-3 in the same processes: the trainer's
(masked Linears, sampling, exchange, update) and a plain one (nothing installed). Timings alternate
plain forward / training step on the same batch so machine load hits both alike; the figure is the
ratio of medians. "Plain forward" includes the fp32 loss, the work any evaluation does.

Bytes are counted with DeepSpeed's comms logger (every deepspeed.comm collective, ZeRO-3's weight
gathers and our mask all_to_all and scalar all_gathers alike), enabled for one extra forward and
one extra step after the timed ones so its synchronisation does not touch the timings.
The precomputed baseline pass f(m0) is a one-off cost, reported separately.
Writes bench/results/step_vs_forward.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "bench" / "results" / "step_vs_forward.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--batch", type=int, default=32, help="sequences per rank (the paper: 32)")
    p.add_argument("--seqlen", type=int, default=128, help="tokens per sequence (the paper: 128)")
    p.add_argument("--repeats", type=int, default=4, help="timed forward/step pairs")
    p.add_argument("--dtype", default="auto", help="fp32 | bf16 | auto (default: bf16 where the CPU runs it natively)")
    p.add_argument("--model", default=str(REPO / ".cache" / "demo" / "smollm2-135m-instruct"))
    p.add_argument("--data", default=str(REPO / ".cache" / "demo" / "wiki" / "calib.txt"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", default="", help=argparse.SUPPRESS)
    p.add_argument("--commit", default="", help=argparse.SUPPRESS)  # the launcher's git HEAD, for the result
    args = p.parse_args(argv)
    from maskpro_ds.formats.compute_dtype import resolve_dtype

    args.dtype = resolve_dtype(args.dtype)
    return args


def launch(args) -> int:
    from bench.provenance import git_commit

    if not Path(args.model).is_dir():
        from maskpro_ds.demo.assets import prepare_demo

        prepare_demo(REPO / ".cache" / "demo")
    run_dir = Path(tempfile.mkdtemp(prefix="bench-step-"))
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(args.ranks), "--master_port", "29533",
           __file__, "--worker", "--run-dir", str(run_dir), "--batch", str(args.batch), "--seqlen", str(args.seqlen),
           "--repeats", str(args.repeats), "--dtype", args.dtype, "--model", args.model, "--data", args.data,
           "--commit", git_commit() or ""]
    try:
        return subprocess.run(cmd, env=env).returncode
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def worker(args) -> None:
    import deepspeed.comm as dist
    import torch
    from deepspeed.comm.comm import comms_logger

    from maskpro_ds.config import load_config
    from maskpro_ds.formats.compute_dtype import cpu_has_native_bf16
    from maskpro_ds.train.trainer import Trainer
    from maskpro_ds.train.zero_model import causal_lm_loss, load_partitioned_model

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    overrides = [f"--model.path={args.model}", f"--model.dtype={args.dtype}", f"--data.source={args.data}",
                 f"--data.batch_size={args.batch}", f"--data.seqlen={args.seqlen}",
                 f"--data.num_samples={args.batch * 4}", f"--train.run_dir={args.run_dir}",
                 "--metrics.progress=false", "--metrics.tensorboard=false", "--checkpoint.every=1000000"]
    cfg = load_config(REPO / "configs" / "demo_smollm2.yaml", overrides)
    t0 = time.time()
    trainer = Trainer(cfg)
    init_s = time.time() - t0
    (Path(args.run_dir) / "baseline.safetensors").unlink(missing_ok=True)
    dist.barrier()
    t0 = time.time()
    trainer.baseline = trainer._baseline()
    baseline_s = time.time() - t0
    plain_engine, _ = load_partitioned_model(cfg, trainer.ds_config)
    from maskpro_ds.data.schedule import batch_ids
    from maskpro_ds.train.step_timing import received_bytes

    def plain_forward(step: int) -> None:
        ids = batch_ids(cfg.train.seed, step, trainer.info.rank, trainer.info.world_size, args.batch,
                        len(trainer.samples.ids))
        tokens = trainer.samples.tokens[ids]
        with torch.no_grad():
            causal_lm_loss(plain_engine(input_ids=tokens).logits, tokens)

    plain_forward(0)  # warm-up both paths
    trainer.step()
    fwd_times, step_times = [], []
    for _ in range(args.repeats):
        dist.barrier()
        t = time.time()
        plain_forward(trainer.step_index)
        fwd_times.append(time.time() - t)
        dist.barrier()
        t = time.time()
        trainer.step()
        step_times.append(time.time() - t)

    comms_logger.enabled, comms_logger.prof_all, comms_logger.verbose = True, True, False
    comms_logger.comms_dict.clear()
    plain_forward(trainer.step_index)
    fwd_bytes, fwd_ops = received_bytes(comms_logger, trainer.info.world_size)
    comms_logger.comms_dict.clear()
    trainer.step()
    step_bytes, step_ops = received_bytes(comms_logger, trainer.info.world_size)
    comms_logger.enabled = False

    if trainer.info.is_main:
        fwd, step = statistics.median(fwd_times), statistics.median(step_times)
        result = {
            "model": Path(args.model).name, "ranks": trainer.info.world_size,
            "tokens_per_rank": args.batch * args.seqlen, "dtype": args.dtype,
            "step_over_forward": round(step / fwd, 4), "bytes_over_forward": round(step_bytes / fwd_bytes, 4),
            "median_step_s": round(step, 3), "median_forward_s": round(fwd, 3),
            "step_times_s": [round(x, 3) for x in step_times], "forward_times_s": [round(x, 3) for x in fwd_times],
            "forward_bytes_received": fwd_bytes, "step_bytes_received": step_bytes,
            "forward_ops": fwd_ops, "step_ops": step_ops,
            "baseline_pass_s": round(baseline_s, 2), "baseline_samples": len(trainer.samples.ids),
            "init_s": round(init_s, 2), "threads_per_rank": torch.get_num_threads(),
            "masked_weights": sum(s[0] * s[1] for s in trainer.store.shapes),
            "cpu_native_bf16": cpu_has_native_bf16(),
            "commit": args.commit or None,
        }
        print(json.dumps(result, indent=1))
        print(f"\nstep / forward = {result['step_over_forward']:.3f}   bytes / forward = {result['bytes_over_forward']:.4f}")
        RESULT.parent.mkdir(parents=True, exist_ok=True)
        RESULT.write_text(json.dumps(result, indent=1) + "\n")
    trainer.close()


def main() -> int:
    args = parse_args()
    if args.worker:
        worker(args)
        return 0
    return launch(args)


if __name__ == "__main__":
    sys.exit(main())
