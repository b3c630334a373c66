"""Train MaskPro masks: ``launchers/train.py --config CONFIG.yaml [--resume] [--section.key=value ...]``.

A thin caller of ``maskpro_ds.cli.train`` (the ``maskpro-train`` command), kept at this path for the
launchers that start a script: ``deepspeed``, ``torchrun``, ``mpirun`` and launchers/slurm/train.sbatch.
    deepspeed --hostfile hosts launchers/train.py --config configs/llama2_7b.yaml
    torchrun --nproc_per_node 2 launchers/train.py --config configs/tiny_debug.yaml
    mpirun -n 2 python launchers/train.py --config configs/tiny_debug.yaml
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported: one intra-op thread per rank

from maskpro_ds.cli.train import run  # noqa: E402

if __name__ == "__main__":
    run()
