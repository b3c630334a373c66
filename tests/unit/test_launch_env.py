"""Launcher plumbing without launching a run: env mapping for SLURM / MPI / plain runs, the shell
scripts' syntax and defaults, and every shipped config loading into a valid DeepSpeed config."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from maskpro_ds.config import load_config
from maskpro_ds.distributed import map_launcher_env
from maskpro_ds.train.zero_model import build_ds_config

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RUN_LOCAL = REPO / "launchers" / "run_local.sh"
SBATCH = REPO / "launchers" / "slurm" / "train.sbatch"
MAPPED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# ---------------------------------------------------------------------------------------- env mapping
def test_plain_python_is_rank_0_of_1_on_loopback():
    env: dict[str, str] = {"PATH": "/usr/bin"}
    updates = map_launcher_env(env)
    assert updates == {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29500"}
    assert {k: env[k] for k in MAPPED} == updates
    assert env["PATH"] == "/usr/bin"


def test_torchrun_env_is_left_alone():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234",
           # a torchrun started inside a SLURM allocation: the launcher's variables win
           "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "gpu[01-02]"}
    before = dict(env)
    assert map_launcher_env(env) == {}
    assert env == before


def test_partial_env_gets_defaults_for_what_is_missing():
    env = {"RANK": "1", "WORLD_SIZE": "2"}
    assert map_launcher_env(env) == {"LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


@pytest.mark.parametrize(("nodelist", "first"), [
    ("gpu[03-04,07]", "gpu03"),
    ("gpu-[007-010]", "gpu-007"),
    ("node17", "node17"),
    ("a01,b02", "a01"),
    ("dgx[12]", "dgx12"),
])
def test_slurm_task_maps_to_rank_and_first_host(nodelist, first, monkeypatch):
    # The built-in parser, used where scontrol is absent: hide an installed one (CI has SLURM).
    monkeypatch.setenv("PATH", "/nonexistent")
    assert shutil.which("scontrol") is None
    env = {"SLURM_PROCID": "13", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5", "SLURM_JOB_NODELIST": nodelist}
    updates = map_launcher_env(env)
    assert updates == {"RANK": "13", "WORLD_SIZE": "16", "LOCAL_RANK": "5", "MASTER_ADDR": first,
                       "MASTER_PORT": "29500"}


def test_slurm_keeps_master_addr_and_port_set_by_the_script():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "gpu[01-02]",
           "MASTER_ADDR": "ib-gpu01", "MASTER_PORT": "23456"}
    updates = map_launcher_env(env)
    assert updates == {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
    assert env["MASTER_ADDR"] == "ib-gpu01" and env["MASTER_PORT"] == "23456"


def test_slurm_without_localid_is_local_rank_0():
    env = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "MASTER_ADDR": "h"}
    assert map_launcher_env(env)["LOCAL_RANK"] == "0"


@pytest.mark.parametrize("env", [
    {"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1"},                                  # MPICH / Hydra
    {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1"},  # Open MPI
])
def test_mpi_env_without_mpi4py(env, monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py now raises ImportError
    updates = map_launcher_env(env)
    assert updates == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29500"}


MPI_CHILD = """
import json, os, sys
from pathlib import Path
from maskpro_ds.distributed import map_launcher_env
os.environ["MASTER_PORT"] = "29999"
updates = map_launcher_env()
Path(sys.argv[1], "rank-" + updates["RANK"] + ".json").write_text(json.dumps(updates))
"""


def test_mpirun_two_processes_get_distinct_ranks(tmp_path):
    """A real ``mpirun -n 2``: ranks come from MPI itself (mpi4py), the master is loopback on one host."""
    mpirun = BIN / "mpirun"
    if not mpirun.exists():
        pytest.skip("mpirun not installed in this environment (pip install mpich mpi4py)")
    env = {k: v for k, v in os.environ.items() if k not in MAPPED}
    proc = subprocess.run([str(mpirun), "-n", "2", sys.executable, "-c", MPI_CHILD, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank-*.json"))]
    assert got == [{"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1"}
                   for r in range(2)]


# ---------------------------------------------------------------------------------------- shell scripts
@pytest.mark.parametrize("script", [RUN_LOCAL, SBATCH])
def test_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_run_local_is_executable():
    assert os.access(RUN_LOCAL, os.X_OK)


def test_sbatch_one_task_per_gpu_and_passes_arguments_through():
    text = SBATCH.read_text()
    directives = dict(re.findall(r"^#SBATCH --([a-z-]+)=(\S+)", text, flags=re.M))
    assert directives["ntasks-per-node"] == directives["gpus-per-node"]
    assert 'launchers/train.py "$@"' in text
    assert "MASTER_PORT" in text


@pytest.mark.parametrize(("env", "message"), [
    ({"CONFIG": "configs/no_such.yaml"}, "CONFIG=configs/no_such.yaml does not exist"),
    ({"LAUNCHER": "pdsh"}, "LAUNCHER=pdsh is not supported"),
])
def test_run_local_rejects_bad_settings(env, message):
    proc = subprocess.run([str(RUN_LOCAL)], env={**os.environ, **env}, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert message in proc.stderr


# ---------------------------------------------------------------------------------------- configs
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
# The world size each recipe is written for (its header's launch command).
RECIPE_WORLD = {"llama2_7b": 8, "llama3_8b": 8, "llama_70b_multinode": 64}


def test_recipes_exist():
    assert set(RECIPE_WORLD) <= {p.stem for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    dumped = tmp_path / "config.yaml"
    dumped.write_text(cfg.dump_yaml())
    assert load_config(dumped).to_dict() == cfg.to_dict()


@pytest.mark.parametrize(("name", "world"), sorted(RECIPE_WORLD.items()))
def test_recipe_fits_its_world_size(name, world):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    ds = build_ds_config(cfg, world)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["bf16"]["enabled"] and cfg.model.dtype == "bf16"
    assert ds["train_batch_size"] == cfg.data.batch_size * world
    # Ranks of one step never share a sample (data.batch_ids' condition).
    assert cfg.data.num_samples % (world * cfg.data.batch_size) == 0
    hpz = cfg.zero.hpz_partition_size
    assert ds["zero_optimization"].get("zero_hpz_partition_size", 1) == hpz
    assert cfg.mask.init_scale == 10.0 and cfg.data.seqlen == 128


def test_70b_hpz_needs_a_multiple_of_the_node_size():
    cfg = load_config(REPO / "configs" / "llama_70b_multinode.yaml")
    with pytest.raises(ValueError, match="hpz_partition_size=8 must divide the world size 12"):
        build_ds_config(cfg, 12)
    cfg = load_config(REPO / "configs" / "llama_70b_multinode.yaml", ["--zero.hpz_partition_size=1"])
    assert "zero_hpz_partition_size" not in build_ds_config(cfg, 12)["zero_optimization"]
