"""Entry points that start a training run under any launcher (deepspeed, torchrun, mpirun, srun)."""
