"""``maskpro-train --config CONFIG.yaml [--resume] [--section.key=value ...]``: train MaskPro masks.

Works under every launcher (the process group is set up in maskpro_ds.distributed); each
launcher starts this module (``python -m maskpro_ds.cli.train``) or ``launchers/train.py``:
    deepspeed --hostfile hosts launchers/train.py --config configs/llama2_7b.yaml
    deepspeed --num_gpus 8 launchers/train.py --config configs/llama3_8b.yaml
    torchrun --nproc_per_node 2 -m maskpro_ds.cli.train --config configs/tiny_debug.yaml
    mpirun -n 2 maskpro-train --config configs/tiny_debug.yaml
    sbatch launchers/slurm/train.sbatch --config configs/llama_70b_multinode.yaml
Exit status: 0 done (or nothing left to train), 1 a failure (a checkpoint that could not be written:
one message; a crash: traceback on stderr), 2 a user error (named on stderr: bad config, a run
directory in use by another run, a resume that does not match its checkpoint), 3 a guard stopped
the run (checkpoint saved), 75 stopped by SIGTERM/SIGUSR1 after checkpointing the last finished step
(maskpro_ds.train.preemption; the sbatch script requeues on it).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

# One intra-op thread per rank unless the user chose otherwise: several ranks share the cores, and
# the deepspeed launcher (unlike torchrun) does not set it. Must precede the torch import.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from maskpro_ds import distributed  # noqa: E402
from maskpro_ds.config import load_config  # noqa: E402
from maskpro_ds.train import preemption  # noqa: E402
from maskpro_ds.train.resume_checks import ResumeMismatch, parse_allowed  # noqa: E402


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="maskpro-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (see configs/); every key can be overridden as --section.key=value")
    parser.add_argument("--resume", action="store_true", help="continue from <train.run_dir>/checkpoints/latest")
    parser.add_argument("--auto-resume", action="store_true",
                        help="continue when train.run_dir holds a usable checkpoint, else start fresh "
                             "(what a requeued batch job passes)")
    parser.add_argument("--resume-allow-mismatch", default="", metavar="WHAT",
                        help="comma-separated among seed, data, base: resume even though the checkpoint was made "
                             "with another seed, other samples or another base model (refused otherwise)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    # From here a SIGTERM/SIGUSR1 (scheduler, torchrun) ends the run at the next step boundary with a
    # checkpoint instead of killing it mid-step; a signal during loading is honoured after the first step.
    preemption.install_handlers()
    rank = os.environ.get("RANK", os.environ.get("PMI_RANK", os.environ.get("SLURM_PROCID", "0")))
    logging.basicConfig(level=logging.INFO if rank == "0" else logging.WARNING,
                        format=f"[rank{rank}] %(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, overrides)
        allow_mismatch = parse_allowed(args.resume_allow_mismatch)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from maskpro_ds.priors.warm_start import run_warm_start
    from maskpro_ds.train.checkpoint import CheckpointWriteError
    from maskpro_ds.train.run_lock import RunLocked
    from maskpro_ds.train.trainer import NothingToTrain, Trainer, TrainingStopped

    def once(message: str) -> None:  # errors every rank agreed on: printed by rank 0 only
        if rank == "0":
            print(message, file=sys.stderr)

    trainer = None
    try:
        resume = args.resume or (args.auto_resume and preemption.has_checkpoint(cfg.train.run_dir))
        trainer = Trainer(cfg, resume=resume, allow_mismatch=allow_mismatch, warm_start=run_warm_start)
        trainer.train()
    except preemption.Preempted as e:
        logging.getLogger("maskpro_ds").warning("%s", e)
        return preemption.EXIT_PREEMPTED
    except TrainingStopped as e:
        logging.getLogger("maskpro_ds").error("%s", e)
        return 3
    except NothingToTrain as e:
        once(str(e))
        return 0
    except (RunLocked, ResumeMismatch) as e:
        once(f"error: {e}")
        return 2
    except CheckpointWriteError as e:
        once(f"error: {e}")
        return 1
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if trainer is not None:
            trainer.close()
        distributed.destroy()
    return 0


def run(argv: list[str] | None = None) -> None:
    """The console entry point: ``main``, every ending (a crash included: exit 1) through exit_process."""
    try:
        code = main(argv)
    except SystemExit:
        raise  # argparse (--help, a bad flag): nothing started yet
    except BaseException:  # noqa: BLE001 - report it, then leave like any other ending
        # Interpreter finalisation after a crash can hang in gloo/DeepSpeed teardown (a dead peer),
        # and the launcher's SIGTERM no longer ends a rank at once (it is a stop request now).
        traceback.print_exc()
        code = 1
    distributed.exit_process(code)  # not sys.exit: see exit_process (a finished run must not abort at exit)


if __name__ == "__main__":
    run()
