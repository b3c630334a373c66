"""Bad input and failures during training: clear errors, nothing good overwritten, NaN steps skipped."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch

from maskpro_ds.formats.mask_artifact import write_mask_artifact
from maskpro_ds.masks.nm import magnitude_prior
from tests.distributed.launch import BIN, REPO, TRAIN, base_env, run, torchrun, train_args
from tests.distributed.test_training import logits_at, samples_tokens
from tests.reference import ReferenceMaskPro
from tests.tiny import make_text, make_tiny_llama

pytestmark = pytest.mark.distributed
CONFIG = REPO / "configs" / "tiny_debug.yaml"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fail")
    model = make_tiny_llama(root / "model")
    text = make_text(root / "text.txt")
    return {"root": root, "model": model, "text": text,
            "common": dict(model__path=model, data__source=text, data__cache_dir=root / "cache")}


def train_one_rank(args: list[str], **env: str):
    return run([str(BIN / "python"), TRAIN, *args], env=base_env(**env), check=False)


def test_missing_model_dir(setup):
    common = {**setup["common"], "model__path": setup["root"] / "nope"}
    proc = train_one_rank(train_args(CONFIG, train__run_dir=setup["root"] / "r1", **common))
    assert proc.returncode == 2
    assert "model.path" in proc.stderr and "nope" in proc.stderr and "does not exist" in proc.stderr


def test_unknown_config_key(setup):
    proc = train_one_rank([*train_args(CONFIG, **setup["common"]), "--train.stepz=3"])
    assert proc.returncode == 2
    assert "unknown config key train.stepz" in proc.stderr and "steps" in proc.stderr


def test_pattern_that_does_not_divide(setup):
    proc = train_one_rank(train_args(CONFIG, train__run_dir=setup["root"] / "r2", mask__pattern="2:7", **setup["common"]))
    assert proc.returncode == 2
    assert "divisible by 7" in proc.stderr


def test_prior_from_another_model(setup):
    other = make_tiny_llama(setup["root"] / "other", hidden=32, intermediate=64)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(other))
    masks = {name: magnitude_prior(mod.weight, 2, 4) for name, mod in model.named_modules()
             if isinstance(mod, torch.nn.Linear) and ".layers." in name}
    prior = write_mask_artifact(setup["root"] / "other_prior", masks, 2, 4, base_fingerprint=None)
    proc = train_one_rank(train_args(CONFIG, train__run_dir=setup["root"] / "r3", mask__prior=prior, **setup["common"]))
    assert proc.returncode == 2
    assert "mask.prior" in proc.stderr and "another model" in proc.stderr and "shape" in proc.stderr


def test_corrupt_newest_checkpoint_falls_back_and_keeps_good_ones(setup):
    run_dir = setup["root"] / "corrupt"
    args = train_args(CONFIG, train__run_dir=run_dir, **setup["common"])
    torchrun(2, args)
    good = run_dir / "checkpoints" / "step-000005"
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in good.iterdir()}
    expected = logits_at(run_dir, 10)
    shard = run_dir / "checkpoints" / "step-000010" / "shard-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated
    proc = torchrun(2, [*args, "--resume"])
    assert "step-000010 is unusable" in proc.stderr and "truncated or corrupt" in proc.stderr
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in good.iterdir()} == before
    got = logits_at(run_dir, 10)  # re-trained from step 5: the same logits as before the corruption
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    # Every checkpoint corrupt: a clear error, nothing deleted.
    for step_dir in (run_dir / "checkpoints").glob("step-*"):
        (step_dir / "manifest.json").write_text("{not json")
    proc = train_one_rank([*args, "--resume"])
    assert proc.returncode == 2 and "no usable checkpoint" in proc.stderr
    assert good.is_dir()


def test_nan_loss_skips_the_step_everywhere_then_stops_with_a_checkpoint(setup):
    run_dir = setup["root"] / "nan"
    args = train_args(CONFIG, train__run_dir=run_dir, **setup["common"])
    torchrun(2, args, env=base_env(MASKPRO_FAULT_NAN_STEPS="3", MASKPRO_FAULT_RANK="1"))
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["train/skipped_steps"] == 1
    # Reference: step 3 leaves logits and delta untouched on every rank.
    ref = ReferenceMaskPro(setup["model"], samples_tokens(setup), c=3.0, lr=20.0, batch_size=2)
    for t in range(10):
        if t == 3:
            ref.step_index += 1
            continue
        ref.step(2)
    got = logits_at(run_dir, 10)
    for (name, _), want in zip(ref.layers, ref.logits, strict=True):
        assert torch.equal(got[name], want), name
    # Repeated NaN: stop with exit code 3, a message, and a checkpoint at the step reached.
    run_dir2 = setup["root"] / "nan2"
    proc = torchrun(2, [*train_args(CONFIG, train__run_dir=run_dir2, train__max_bad_steps=3, **setup["common"])],
                    env=base_env(MASKPRO_FAULT_NAN_STEPS="2,3,4,5", MASKPRO_FAULT_RANK="0"), check=False)
    assert proc.returncode != 0
    assert "3 consecutive steps had a non-finite loss" in proc.stderr + proc.stdout
    assert (run_dir2 / "checkpoints" / "latest").read_text().strip() == "step-000005"
    shutil.rmtree(run_dir2)


def test_deviation_guard_halves_the_step_then_stops_with_a_checkpoint(setup):
    run_dir = setup["root"] / "guard"
    args = train_args(CONFIG, train__run_dir=run_dir, train__steps=20, train__max_deviation=1e-9,
                      train__advantage_norm="rms", **setup["common"])
    proc = torchrun(2, args, check=False)
    assert proc.returncode != 0
    assert "lr fell below train.lr/1000 after repeated guard trips" in proc.stderr + proc.stdout
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    lrs = [x["train/lr"] for x in lines]  # the lr each step used: a trip halves it from the next step on
    assert lrs == [20.0 / 2 ** k for k in range(len(lrs))]  # every step tripped the guard once
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert len(lrs) == 10 and latest == "step-000010"  # the 10th halving, after step 10, stops the run
    state = json.loads((run_dir / "checkpoints" / latest / "manifest.json").read_text())["state"]
    assert float.fromhex(state["lr"]) < 20.0 / 1000
