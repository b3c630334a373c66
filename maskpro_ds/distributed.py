"""Process-group setup for every launcher, rank facts, and the few collectives MaskPro needs.

Launchers and what they give us:
- ``deepspeed`` and ``torchrun`` set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.
- ``mpirun`` (MPICH, Open MPI) sets its own variables; we map them (via mpi4py when present). The
  master address is taken from MASTER_ADDR when given, else rank 0's resolved hostname is
  broadcast over MPI (on one machine: 127.0.0.1). ``hostname -I`` is never used.
- SLURM (``srun``, one task per GPU): SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, and the first host
  of SLURM_JOB_NODELIST (expanded with ``scontrol show hostnames`` when available).
- A plain ``python`` run is rank 0 of 1 on 127.0.0.1.

Seed policy: nothing here seeds a stateful RNG. Masks come from the counter-based sampler keyed by
(train.seed, step, rank, layer, group) and batches from (train.seed, step, rank), so every random
choice is a pure function of the config and the world size.

Collectives go through ``deepspeed.comm`` so DeepSpeed's comms logger counts them beside ZeRO-3's.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _first_slurm_host(nodelist: str) -> str:
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=False)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    # Fallback for the common "prefix[01-04,07]" form when scontrol is absent.
    match = re.match(r"^([^\[,]+)(?:\[([0-9]+))?", nodelist)
    if not match:
        raise ValueError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}; set MASTER_ADDR explicitly")
    return match.group(1) + (match.group(2) or "")


def map_launcher_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from MPI or SLURM when absent.

    Returns the variables it set (also written into ``env``, default ``os.environ``).
    """
    env = os.environ if env is None else env
    updates: dict[str, str] = {}
    if "RANK" in env and "WORLD_SIZE" in env:
        pass
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        updates["RANK"] = env["SLURM_PROCID"]
        updates["WORLD_SIZE"] = env["SLURM_NTASKS"]
        updates["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        if "MASTER_ADDR" not in env and "SLURM_JOB_NODELIST" in env:
            updates["MASTER_ADDR"] = _first_slurm_host(env["SLURM_JOB_NODELIST"])
    elif any(k in env for k in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")):
        updates.update(_mpi_env(env))
    else:
        updates.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    if "LOCAL_RANK" not in env and "LOCAL_RANK" not in updates:
        updates["LOCAL_RANK"] = "0"
    if "MASTER_ADDR" not in env and "MASTER_ADDR" not in updates:
        updates["MASTER_ADDR"] = "127.0.0.1"
    if "MASTER_PORT" not in env:
        updates["MASTER_PORT"] = "29500"
    env.update(updates)
    return updates


def _mpi_env(env: dict[str, str]) -> dict[str, str]:
    try:
        from mpi4py import MPI
    except ImportError:
        rank = env.get("PMI_RANK") or env.get("OMPI_COMM_WORLD_RANK") or env["PMIX_RANK"]
        size = env.get("PMI_SIZE") or env.get("OMPI_COMM_WORLD_SIZE") or "1"
        local = env.get("MPI_LOCALRANKID") or env.get("OMPI_COMM_WORLD_LOCAL_RANK") or "0"
        return {"RANK": rank, "WORLD_SIZE": size, "LOCAL_RANK": local}
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
    updates = {"RANK": str(rank), "WORLD_SIZE": str(size), "LOCAL_RANK": str(local)}
    if "MASTER_ADDR" not in env:
        nodes = comm.allgather(socket.gethostname())
        addr = "127.0.0.1" if len(set(nodes)) == 1 else socket.gethostbyname(nodes[0])
        updates["MASTER_ADDR"] = comm.bcast(addr, root=0)
    return updates


def init_distributed(backend: str = "auto", timeout_s: int = 600) -> RankInfo:
    """Initialise the default process group through DeepSpeed (idempotent) and return rank facts."""
    import deepspeed
    import deepspeed.comm as dist

    map_launcher_env()
    use_cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        deepspeed.init_distributed(
            dist_backend=backend, auto_mpi_discovery=False, verbose=False,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return RankInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def destroy() -> None:
    import torch.distributed

    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End a rank's process with ``code`` once its work is done, skipping interpreter finalisation.

    Why: even after ``destroy_process_group``, the C++ side of gloo/DeepSpeed can still be torn
    down during interpreter finalisation; on CPU about one clean run in twenty then aborts with
    "terminate called without an active exception" (SIGABRT) after every file was written, and the
    launcher (or SLURM) reports the finished run as failed. Logging, stdout and stderr are flushed
    first; the caller has closed its files and destroyed the process group.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def all_gather_floats(values: torch.Tensor) -> torch.Tensor:
    """All-gather a small 1-D float64 tensor from every rank -> ``[world, len]`` (scalars, not gradients)."""
    import deepspeed.comm as dist

    world = dist.get_world_size()
    out = torch.empty((world * values.numel(),), dtype=values.dtype, device=values.device)
    dist.all_gather_into_tensor(out, values.contiguous())
    return out.view(world, -1)


def all_to_all_bytes(send: torch.Tensor, send_sizes: list[int], recv_sizes: list[int]) -> torch.Tensor:
    """Exchange uint8 buffers: ``send`` is the concatenation of one chunk per destination rank."""
    import deepspeed.comm as dist

    recv = torch.empty(sum(recv_sizes), dtype=torch.uint8, device=send.device)
    if dist.get_world_size() == 1:
        recv.copy_(send)
        return recv
    dist.all_to_all_single(recv, send, output_split_sizes=recv_sizes, input_split_sizes=send_sizes)
    return recv


def barrier() -> None:
    import deepspeed.comm as dist

    dist.barrier()


def all_gather_objects(obj: object) -> list:
    """Every rank's small picklable object, created by our own code (never user files), rank order."""
    import torch.distributed

    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return [obj]
    out: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, src: int = 0) -> object:
    """Broadcast a small picklable object created by our own code (never user files)."""
    import torch.distributed

    holder = [obj]
    torch.distributed.broadcast_object_list(holder, src=src)
    return holder[0]
