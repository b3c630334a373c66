"""launchers/run_local.sh really starts a multi-rank run: 2 ranks, a few steps, a checkpoint each rank wrote."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from maskpro_ds.formats.checkpoint_format import read_manifest
from tests.distributed.launch import REPO, base_env, free_port, run
from tests.tiny import make_text, make_tiny_llama

pytestmark = pytest.mark.distributed


# The deepspeed branch costs ~14 s more (its launcher starts slower); it runs with the slow tests.
@pytest.mark.parametrize("launcher", ["torchrun", pytest.param("deepspeed", marks=pytest.mark.slow)])
def test_run_local_two_ranks(tmp_path, launcher):
    model = make_tiny_llama(tmp_path / "model")
    text = make_text(tmp_path / "text.txt")
    run_dir = tmp_path / "run"
    env = base_env(NPROC="2", LAUNCHER=launcher, MASTER_PORT=str(free_port()), PYTHON=sys.executable)
    env.pop("OMP_NUM_THREADS")  # the script's default must supply it
    run([str(REPO / "launchers" / "run_local.sh"), f"--model.path={model}", f"--data.source={text}",
         f"--data.cache_dir={tmp_path / 'cache'}", f"--train.run_dir={run_dir}", "--train.steps=3"], env=env)
    reports = [json.loads((run_dir / "ranks" / f"rank-{r:05d}.json").read_text()) for r in range(2)]
    assert [(x["rank"], x["world_size"], x["step"]) for x in reports] == [(0, 2, 3), (1, 2, 3)]
    # both ranks hold half of the partitioned base and of the logits
    assert reports[0]["param_local_numel"] + reports[1]["param_local_numel"] >= reports[0]["param_full_numel"]
    assert reports[0]["logit_local_bytes"] == reports[1]["logit_local_bytes"] > 0
    manifest = read_manifest(run_dir / "checkpoints" / "step-000003")
    assert manifest.world_size == 2 and manifest.step == 3


@pytest.mark.slow
def test_hpz_secondary_copy_gives_identical_masks(tmp_path):
    """ZeRO++ hpZ (the 70B recipe's zero.hpz_partition_size) at 4 ranks in groups of 2: the same logits,
    bit for bit, as plain ZeRO-3 (gathers are exact copies, wherever they come from)."""
    from maskpro_ds.formats.checkpoint_format import load_layer_logits
    from tests.distributed.launch import torchrun, train_args

    model = make_tiny_llama(tmp_path / "model")
    text = make_text(tmp_path / "text.txt")
    common = dict(model__path=model, data__source=text, data__cache_dir=tmp_path / "cache", train__steps=4)
    config = REPO / "configs" / "tiny_debug.yaml"
    for hpz in (1, 2):
        torchrun(4, train_args(config, train__run_dir=tmp_path / f"hpz{hpz}", zero__hpz_partition_size=hpz, **common))
    a = read_manifest(tmp_path / "hpz1" / "checkpoints" / "step-000004")
    b = read_manifest(tmp_path / "hpz2" / "checkpoints" / "step-000004")
    for layer in a.layers:
        assert torch.equal(load_layer_logits(a, layer.name), load_layer_logits(b, layer.name)), layer.name
