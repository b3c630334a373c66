"""Real multi-rank MaskPro training on CPU/gloo under ZeRO-3, checked against the in-process reference.

Launches are shared: one 2-rank torchrun run (10 steps, checkpoints at 5 and 10) serves as the
baseline the other launchers, the kill-and-resume run and the world-size changes are compared to.

Equality is bit-for-bit. The distributed forward runs the same fp32 kernels on the same tensors as
the reference (ZeRO-3 gathers are exact copies), residuals cross ranks as float64, and the update
is an elementwise function of them, so there is no reduction-order freedom left to differ in.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from maskpro_ds.formats.checkpoint_format import load_layer_logits, read_manifest
from tests.distributed.launch import BIN, REPO, TRAIN, base_env, free_port, run, torchrun, train_args
from tests.reference import ReferenceMaskPro
from tests.tiny import byte_tokenizer, make_text, make_tiny_llama

pytestmark = pytest.mark.distributed
CONFIG = REPO / "configs" / "tiny_debug.yaml"
STEPS = 10


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    model = make_tiny_llama(root / "model")
    text = make_text(root / "text.txt")
    common = dict(model__path=model, data__source=text, data__cache_dir=root / "cache")
    run_dir = root / "run2"
    torchrun(2, train_args(CONFIG, train__run_dir=run_dir, **common))
    return {"root": root, "model": model, "text": text, "common": common, "run2": run_dir}


def logits_at(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    manifest = read_manifest(run_dir / "checkpoints" / f"step-{step:06d}")
    return {layer.name: load_layer_logits(manifest, layer.name) for layer in manifest.layers}


def samples_tokens(setup) -> torch.Tensor:
    from maskpro_ds.data.samples import build_samples

    return build_samples(byte_tokenizer(), str(setup["text"]), seqlen=32, num_samples=16, cache_dir=None).tokens


def reference(setup, schedule: list[tuple[int, int]]) -> ReferenceMaskPro:
    """Reference trained with ``schedule`` = [(steps, world_size), ...] (the config's hyper-parameters)."""
    ref = ReferenceMaskPro(setup["model"], samples_tokens(setup), c=3.0, lr=20.0, batch_size=2)
    for steps, world in schedule:
        for _ in range(steps):
            ref.step(world)
    return ref


def assert_same_logits(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name in got:
        assert torch.equal(got[name], want[name]), f"{name}: max diff {(got[name] - want[name]).abs().max()}"


def test_two_ranks_match_in_process_reference(setup):
    ref = reference(setup, [(STEPS, 2)])
    got = logits_at(setup["run2"], STEPS)
    names = [name for name, _ in ref.layers]
    assert list(got) == names
    for name, want in zip(names, ref.logits, strict=True):
        assert torch.equal(got[name], want), f"{name}: max diff {(got[name] - want).abs().max()}"
    # Learning happened: the logits moved away from C·m0, and the run explored other masks.
    moved = sum(int((g != torch.round(g / 3.0) * 3.0).any()) for g in got.values())
    assert moved == len(got)
    lines = [json.loads(x) for x in (setup["run2"] / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, STEPS + 1))
    assert all(x["train/deviating_groups_frac"] > 0 for x in lines)


def test_base_is_partitioned_and_frozen(setup):
    from transformers import AutoModelForCausalLM

    reports = [json.loads((setup["run2"] / "ranks" / f"rank-{r:05d}.json").read_text()) for r in range(2)]
    plain = AutoModelForCausalLM.from_pretrained(str(setup["model"]), dtype=torch.float32)
    full = sum(p.numel() for p in plain.parameters())
    for rep in reports:
        assert rep["param_full_numel"] == full
        assert rep["param_local_numel"] <= full // 2 + 64 * rep["params_total"]  # half, plus per-param padding
        assert rep["params_released"] == rep["params_total"]  # nothing left gathered after the forwards
        assert rep["weight_digest_start"] == rep["weight_digest_end"]  # frozen
    # The partitions are the real weights: their sums over ranks add up to the model's.
    total = sum(float(p.detach().double().sum()) for p in plain.parameters())
    squares = sum(float((p.detach().double() ** 2).sum()) for p in plain.parameters())
    assert sum(r["weight_digest_start"][0] for r in reports) == pytest.approx(total, rel=1e-9, abs=1e-6)
    assert sum(r["weight_digest_start"][1] for r in reports) == pytest.approx(squares, rel=1e-9)
    # Logits are sharded: each rank holds about half of them.
    groups = [r["logit_local_groups"] for r in reports]
    assert abs(groups[0] - groups[1]) <= 2 * 14  # at most one alignment unit per layer apart


def test_killed_rank_fails_fast_and_resume_is_bit_identical(setup):
    run_dir = setup["root"] / "killed"
    args = train_args(CONFIG, train__run_dir=run_dir, **setup["common"])
    t0 = time.time()
    proc = torchrun(2, args, env=base_env(MASKPRO_FAULT_STEP="7", MASKPRO_FAULT_RANK="1"), check=False)
    assert proc.returncode != 0
    assert time.time() - t0 < 90  # the surviving rank does not hang until the collective timeout
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-000005"
    assert not (run_dir / "checkpoints" / "step-000010").exists()
    torchrun(2, [*args, "--resume"])
    assert_same_logits(logits_at(run_dir, STEPS), logits_at(setup["run2"], STEPS))
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))  # the resumed log has no duplicate or missing step


@pytest.mark.parametrize("world", [1, 4])
def test_resume_at_another_world_size(setup, world):
    run_dir = setup["root"] / f"resume{world}"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(setup["run2"] / "checkpoints" / "step-000005", run_dir / "checkpoints" / "step-000005")
    (run_dir / "checkpoints" / "latest").write_text("step-000005\n")
    args = [*train_args(CONFIG, train__run_dir=run_dir, train__steps=7, **setup["common"]), "--resume"]
    if world == 1:
        run([str(BIN / "python"), TRAIN, *args])
    else:
        torchrun(world, args)
    manifest = read_manifest(run_dir / "checkpoints" / "step-000007")
    assert manifest.world_size == world
    ref = reference(setup, [(5, 2), (2, world)])
    assert_same_logits(logits_at(run_dir, 7), dict(zip([n for n, _ in ref.layers], ref.logits, strict=True)))


def test_two_simulated_nodes_with_the_deepspeed_launcher(setup, tmp_path):
    run_dir = setup["root"] / "twonode"
    hosts = tmp_path / "hosts"
    hosts.write_text("node0 slots=1\nnode1 slots=1\n")
    port = str(free_port())
    args = train_args(CONFIG, train__run_dir=run_dir, **setup["common"])
    procs = [
        subprocess.Popen([str(BIN / "deepspeed"), "--hostfile", str(hosts), "--no_ssh", "--node_rank", str(node),
                          "--num_nodes", "2", "--num_gpus", "1", "--master_addr", "127.0.0.1", "--master_port", port,
                          TRAIN, *args], cwd=REPO, env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for node in (0, 1)
    ]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-5000:]
    assert_same_logits(logits_at(run_dir, STEPS), logits_at(setup["run2"], STEPS))


def test_mpirun(setup):
    run_dir = setup["root"] / "mpi"
    args = train_args(CONFIG, train__run_dir=run_dir, **setup["common"])
    env = base_env(MASTER_PORT=str(free_port()))
    run([str(BIN / "mpirun"), "-n", "2", str(BIN / "python"), TRAIN, *args], env=env)
    assert_same_logits(logits_at(run_dir, STEPS), logits_at(setup["run2"], STEPS))


def test_online_baseline_matches_the_precomputed_one(setup):
    """train.baseline=online recomputes f(m0) with a second forward each step instead of the cache.

    Same numbers up to matmul blocking (the cached pass batched the samples differently), so the
    trajectories agree to float rounding; a wrong baseline (e.g. the sampled mask) would give zero
    residuals and logits stuck at C·m0."""
    run_dir = setup["root"] / "online"
    torchrun(2, train_args(CONFIG, train__run_dir=run_dir, train__baseline="online", **setup["common"]))
    assert not (run_dir / "baseline.safetensors").exists()
    got, want = logits_at(run_dir, STEPS), logits_at(setup["run2"], STEPS)
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=0, atol=1e-4), name
