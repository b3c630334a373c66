"""Faults that lose or corrupt data, on real CPU ranks: each one is caught, named, and loses nothing.

One 2-rank run of 10 steps (checkpoints at 5 and 10) is the baseline; tests that damage or resume a
run work on copies of its directory. Guards are compared with the in-process reference
(tests/reference.py) bit for bit, NaN baselines come from a real NaN (one token's embedding row),
and the full disk is a real write failure (a file-size limit on the ranks' processes).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from maskpro_ds.data.schedule import BatchSchedule
from maskpro_ds.train.local_launch import free_port
from maskpro_ds.train.run_lock import LOCK_NAME, RunLock
from tests.distributed.launch import BIN, REPO, TRAIN, base_env, run, torchrun, train_args
from tests.distributed.test_training import assert_same_logits, logits_at, samples_tokens
from tests.reference import ReferenceMaskPro
from tests.tiny import byte_tokenizer, make_text, make_tiny_llama

pytestmark = pytest.mark.distributed
CONFIG = REPO / "configs" / "tiny_debug.yaml"
PY = str(BIN / "python")
T = 1200  # seconds per launch: generous, a shared 2-core machine can be slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    model = make_tiny_llama(root / "model")
    text = make_text(root / "text.txt")
    common = dict(model__path=model, data__source=text, data__cache_dir=root / "cache", mask__kernels="plain")
    run10 = root / "run10"
    torchrun(2, train_args(CONFIG, train__run_dir=run10, **common), timeout=T)
    return {"root": root, "model": model, "text": text, "common": common, "run10": run10}


def copy_run(setup, name: str) -> Path:
    run_dir = setup["root"] / name
    shutil.copytree(setup["run10"], run_dir)
    return run_dir


def train_one_rank(args: list[str]) -> subprocess.CompletedProcess:
    return run([PY, TRAIN, *args], check=False, timeout=T)


def snapshot(run_dir: Path, lock_mtime: bool = True) -> dict[str, tuple[str, int | None]]:
    """Every file's content hash and modification time."""
    out = {}
    for path in sorted(p for p in run_dir.rglob("*") if p.is_file()):
        keep_mtime = lock_mtime or path.name != LOCK_NAME
        out[str(path.relative_to(run_dir))] = (hashlib.sha256(path.read_bytes()).hexdigest(),
                                               path.stat().st_mtime_ns if keep_mtime else None)
    return out


def flip_data_byte(file: Path, offset: int = 5) -> None:
    raw = bytearray(file.read_bytes())
    (header,) = struct.unpack("<Q", raw[:8])
    raw[8 + header + offset] ^= 0x10
    file.write_bytes(bytes(raw))


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and every process under it. torchrun starts each rank in a session of its own,
    so killing the launcher's process group would leave the ranks training on as orphans."""
    import psutil

    try:
        family = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=30)
    proc.wait()


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------- one run per run dir
def test_a_second_training_on_the_same_run_dir_exits_2_touching_nothing(setup):
    run_dir = setup["root"] / "shared"
    args = train_args(CONFIG, train__run_dir=run_dir, train__steps=100000, checkpoint__every=100000, **setup["common"])
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
           str(free_port()), TRAIN, *args]
    log = (setup["root"] / "shared.log").open("w")
    first = subprocess.Popen(cmd, cwd=REPO, env=base_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + T
        while not ((run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").read_text().count("\n") >= 2):
            assert first.poll() is None, (setup["root"] / "shared.log").read_text()[-3000:]
            assert time.time() < deadline, "the first run did not start training"
            time.sleep(1)
        holder = json.loads((run_dir / LOCK_NAME).read_text())
        config = (run_dir / "config.yaml").read_bytes()
        second = train_one_rank(train_args(CONFIG, train__run_dir=run_dir, train__lr=7.0, **setup["common"]))
        assert second.returncode == 2, second.stderr[-3000:]
        assert (f"is in use by another run: pid {holder['pid']} on host {holder['host']}, started {holder['started']}"
                in second.stderr), second.stderr[-3000:]
        assert "--train.run_dir" in second.stderr and "filled" not in second.stderr  # refused before the model
        assert (run_dir / "config.yaml").read_bytes() == config
        steps = [x["step"] for x in metrics(run_dir)]
        assert steps == list(range(1, len(steps) + 1))  # one writer: no step twice
        assert first.poll() is None  # the first run was not disturbed
    finally:
        kill_tree(first)
        log.close()


def test_a_locked_run_dir_is_left_exactly_as_it_was(setup):
    run_dir = copy_run(setup, "locked")
    lock = RunLock(run_dir)
    lock.acquire()
    try:
        before = snapshot(run_dir, lock_mtime=False)  # our own heartbeat touches the lock
        proc = train_one_rank([*train_args(CONFIG, train__run_dir=run_dir, train__steps=12, **setup["common"]),
                               "--resume"])
        assert proc.returncode == 2 and f"pid {os.getpid()}" in proc.stderr
        assert snapshot(run_dir, lock_mtime=False) == before
    finally:
        lock.release()


# ---------------------------------------------------------------------------------- checksums
def test_flipped_byte_in_a_logits_shard_is_named_by_resume_export_and_inspect(setup):
    run_dir = copy_run(setup, "flipped")
    expected = logits_at(run_dir, 10)
    step10 = run_dir / "checkpoints" / "step-000010"
    shard = step10 / "shard-00001-of-00002.safetensors"
    flip_data_byte(shard)
    out = setup["root"] / "flipped_export"
    proc = run([PY, str(REPO / "tools" / "export_masks.py"), str(step10), "--out", str(out), "--format", "mask",
                "--verify"], check=False, timeout=T)
    assert proc.returncode == 2 and f"{shard}: content changed since it was written" in proc.stderr
    assert not out.exists()
    proc = run([PY, str(REPO / "tools" / "inspect_checkpoint.py"), str(step10)], check=False, timeout=T)
    assert proc.returncode == 1 and f"FAILED: {shard}: content changed" in proc.stdout
    proc = torchrun(2, [*train_args(CONFIG, train__run_dir=run_dir, **setup["common"]), "--resume"], timeout=T)
    assert f"{step10} is unusable ({shard}: content changed since it was written" in proc.stderr
    assert_same_logits(logits_at(run_dir, 10), expected)  # retrained from step 5, bit for bit


# ---------------------------------------------------------------------------------- resume checks
def test_refused_resume_changes_nothing_and_an_explicit_override_continues(setup):
    run_dir = copy_run(setup, "refused")
    other_model = make_tiny_llama(setup["root"] / "other_model", seed=1)  # same shapes, other weights
    other_text = make_text(setup["root"] / "other_text.txt", repeats=41)
    before = snapshot(run_dir, lock_mtime=False)
    cases = [({"train__seed": 1}, "seed", "train.seed=0, this run has train.seed=1"),
             ({"data__source": other_text}, "data", "the checkpoint was trained on 16 samples of"),
             ({"model__path": other_model}, "base", "the checkpoint was made from base model fingerprint")]
    for overrides, name, message in cases:
        args = train_args(CONFIG, train__run_dir=run_dir, train__steps=12, **{**setup["common"], **overrides})
        proc = train_one_rank([*args, "--resume"])
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert message in proc.stderr and f"--resume-allow-mismatch={name}" in proc.stderr
        assert "nothing was changed" in proc.stderr and "filled" not in proc.stderr
        assert snapshot(run_dir, lock_mtime=False) == before  # config.yaml included: not rewritten
    proc = train_one_rank([*train_args(CONFIG, train__run_dir=run_dir, **setup["common"]), "--resume"])
    assert proc.returncode == 0 and "nothing to train" in proc.stderr and "step 10 and train.steps = 10" in proc.stderr
    assert snapshot(run_dir, lock_mtime=False) == before
    proc = train_one_rank([*train_args(CONFIG, train__run_dir=run_dir, train__steps=11, train__seed=1,
                                       **setup["common"]), "--resume", "--resume-allow-mismatch=seed"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--resume-allow-mismatch=seed: the checkpoint was trained with train.seed=0" in proc.stderr
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-000011"
    assert "seed: 1" in (run_dir / "config.yaml").read_text()


# ---------------------------------------------------------------------------------- guards
def rms_reference(setup, lrs: list[float]) -> ReferenceMaskPro:
    ref = ReferenceMaskPro(setup["model"], samples_tokens(setup), c=3.0, lr=20.0, batch_size=2, norm="rms")
    for lr in lrs:
        ref.lr = lr
        ref.step(2)
    return ref


def ref_logits(ref: ReferenceMaskPro) -> dict[str, torch.Tensor]:
    return {name: logits for (name, _), logits in zip(ref.layers, ref.logits, strict=True)}


def test_max_abs_advantage_is_checked_in_loss_units(setup):
    """A limit above every |r - delta| but below the rms-scaled |a| never trips (it did when the scaled
    advantages were checked)."""
    ref = rms_reference(setup, [20.0] * 10)
    raw = max(abs(a) for step in ref.raw_advantages for a in step)
    scaled = max(abs(a) for step in ref.advantages for a in step)
    assert raw < scaled, "the test needs raw advantages smaller than the scaled ones"
    limit = (raw + scaled) / 2
    run_dir = setup["root"] / "units"
    torchrun(2, train_args(CONFIG, train__run_dir=run_dir, train__advantage_norm="rms",
                           train__max_abs_advantage=limit, **setup["common"]), timeout=T)
    lines = metrics(run_dir)
    assert [x["train/lr"] for x in lines] == [20.0] * 10
    assert max(x["train/raw_advantage_abs_max"] for x in lines) == pytest.approx(raw, rel=1e-12)
    assert_same_logits(logits_at(run_dir, 10), ref_logits(ref))


def test_guard_stop_then_resume_is_bit_identical_to_an_uninterrupted_run(setup):
    """Every step trips the guard: lr halves from the next step on, the 10th halving stops the run with
    a checkpoint of step 10, and the resumed run (guard off) continues as if it had never stopped."""
    run_dir = setup["root"] / "guardstop"
    args = train_args(CONFIG, train__run_dir=run_dir, train__steps=20, train__advantage_norm="rms",
                      train__max_abs_advantage=1e-12, **setup["common"])
    proc = torchrun(2, args, check=False, timeout=T)
    assert proc.returncode != 0
    assert "lr fell below train.lr/1000" in proc.stderr + proc.stdout
    assert "checkpoint saved at step 10" in proc.stderr + proc.stdout
    lines = metrics(run_dir)
    assert [x["step"] for x in lines] == list(range(1, 11))
    assert [x["train/lr"] for x in lines] == [20.0 / 2**k for k in range(10)]  # a trip changes the next step
    manifest = json.loads((run_dir / "checkpoints" / "step-000010" / "manifest.json").read_text())
    assert float.fromhex(manifest["state"]["lr"]) == 20.0 / 1024
    torchrun(2, [*train_args(CONFIG, train__run_dir=run_dir, train__steps=12, train__advantage_norm="rms",
                             train__max_abs_advantage=0.0, **setup["common"]), "--resume"], timeout=T)
    ref = rms_reference(setup, [20.0 / 2**min(t, 10) for t in range(12)])
    assert_same_logits(logits_at(run_dir, 12), ref_logits(ref))
    assert [x["step"] for x in metrics(run_dir)] == list(range(1, 13))


# ---------------------------------------------------------------------------------- NaN baselines
@pytest.fixture(scope="module")
def nan_inputs(setup):
    """A model whose embedding of '#' is NaN, and a text where '#' appears in one place only."""
    root = setup["root"]
    model = make_tiny_llama(root / "nan_model")
    hash_id = byte_tokenizer()("#", add_special_tokens=False)["input_ids"][0]
    weights = load_file(model / "model.safetensors")
    weights["model.embed_tokens.weight"][hash_id] = float("nan")
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    plain = make_text(root / "plain.txt").read_text()
    assert plain[300] not in "\n "
    text = root / "nan_text.txt"
    text.write_text(plain[:300] + "#" + plain[301:])  # inside sample 300 // 32 = 9 (one byte per token)
    from maskpro_ds.data.samples import build_samples

    tokens = build_samples(byte_tokenizer(), str(text), seqlen=32, num_samples=16, cache_dir=None).tokens
    bad = sorted(int(i) for i in torch.nonzero((tokens == hash_id).any(1)).reshape(-1))
    assert len(bad) == 1
    common = {**setup["common"], "model__path": model, "data__source": text}
    return {"common": common, "bad": bad}


def test_nan_in_the_precomputed_baseline_names_the_samples(setup, nan_inputs):
    proc = train_one_rank(train_args(CONFIG, train__run_dir=setup["root"] / "nan_pre", **nan_inputs["common"]))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"non-finite baseline loss f(m0) for sample ids {nan_inputs['bad']}" in proc.stderr
    assert "run the precompute pass" not in proc.stderr


def test_nan_online_baseline_stops_with_a_checkpoint_naming_the_samples(setup, nan_inputs):
    schedule = BatchSchedule(0, 2, 2, 16)
    step = next(t for t in range(10) if any(set(schedule.ids(t, r).tolist()) & set(nan_inputs["bad"]) for r in (0, 1)))
    run_dir = setup["root"] / "nan_online"
    proc = torchrun(2, train_args(CONFIG, train__run_dir=run_dir, train__baseline="online", **nan_inputs["common"]),
                    check=False, timeout=T)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"step {step}: the baseline loss f(m0) is not finite for sample ids {nan_inputs['bad']}" in out
    assert f"Checkpoint saved at step {step}" in out
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step-{step:06d}"


# ---------------------------------------------------------------------------------- a full disk
def test_full_disk_during_a_checkpoint_gives_one_message_and_leaves_latest(setup):
    run_dir = copy_run(setup, "full")
    ckpt = run_dir / "checkpoints"
    shutil.rmtree(ckpt / "step-000010")
    (ckpt / "latest").write_text("step-000005\n")
    shard_bytes = (ckpt / "step-000005" / "shard-00000-of-00002.safetensors").stat().st_size
    limit = shard_bytes // 2  # a shard cannot be written; the logs, the manifest and the rank reports can
    assert limit > 32_000
    args = [*train_args(CONFIG, train__run_dir=run_dir, **setup["common"]), "--resume"]
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
           str(free_port()), TRAIN, *args]
    proc = subprocess.run(cmd, cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=T,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert out.count("checkpoint of step 10 could not be written") == 1, out[-4000:]
    assert "File too large" in out and "latest is unchanged (step-000005)" in out
    assert not re.search(r'File "[^"]*maskpro_ds/', out), "no traceback through our code"
    assert (ckpt / "latest").read_text().strip() == "step-000005"
    assert not (ckpt / "step-000010").exists() and not list(ckpt.glob(".tmp-*"))
    # What a killed run leaves behind is removed at the next start; the run then finishes as before.
    (ckpt / ".tmp-step-000099").mkdir()
    (ckpt / ".tmp-step-000099" / "shard-00000-of-00002.safetensors").write_bytes(b"partial")
    (ckpt / ".tmp-latest-deadbeef").write_text("step-000099\n")
    proc = torchrun(2, args, timeout=T)
    assert "removed 2 temporary file(s) left by an interrupted run" in proc.stderr
    assert not list(ckpt.glob(".tmp-*"))
    assert_same_logits(logits_at(run_dir, 10), logits_at(setup["run10"], 10))


# ---------------------------------------------------------------------------------- bad input
def test_bad_input_is_named(setup, tmp_path):
    binary = tmp_path / "corpus.txt"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
    proc = train_one_rank(train_args(CONFIG, train__run_dir=tmp_path / "r1", **{**setup["common"],
                                                                               "data__source": binary}))
    assert proc.returncode == 2
    assert f"data source {binary}: not UTF-8 text" in proc.stderr and "documents separated by blank lines" in proc.stderr
    proc = train_one_rank(train_args(CONFIG, train__run_dir=tmp_path / "r2", train__steps=0, **setup["common"]))
    assert proc.returncode == 2 and "train.steps must be > 0" in proc.stderr
    assert not (tmp_path / "r2").exists()
