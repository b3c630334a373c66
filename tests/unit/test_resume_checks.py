"""What a resume compares with its checkpoint, and the one flag that lets a named difference through."""

from __future__ import annotations

from pathlib import Path

import pytest

from maskpro_ds.formats.checkpoint_format import Manifest
from maskpro_ds.train.resume_checks import ResumeMismatch, RunIdentity, check_resume, parse_allowed

OURS = RunIdentity(seed=0, data_fingerprint="d" * 64, num_samples=16, n=2, m=4, base_fingerprint="b" * 64)


def manifest(n=2, m=4, base="b" * 64, **state) -> Manifest:
    return Manifest(path=Path("/runs/x/checkpoints/step-000005"), step=5, world_size=2, n=n, m=m, layers=[], shards=[],
                    state={**OURS.state(), **state}, config={"data": {"source": "text.txt"}}, base_fingerprint=base,
                    run_id="r")


def test_a_matching_checkpoint_passes():
    assert check_resume(manifest(), OURS) == []


def test_every_difference_is_listed_with_both_values_and_the_flag():
    other = manifest(seed=7, data={"fingerprint": "e" * 64, "num_samples": 32}, base="c" * 64)
    with pytest.raises(ResumeMismatch) as info:
        check_resume(other, OURS)
    message = str(info.value)
    assert "train.seed=7, this run has train.seed=0" in message
    assert "32 samples of text.txt (fingerprint eeeeeeeeeeeeeeee…), this run has 16 samples" in message
    assert "base model fingerprint cccccccccccccccc…, model.path has bbbbbbbbbbbbbbbb…" in message
    assert "nothing was changed" in message and "--resume-allow-mismatch=seed,data,base" in message


def test_allowed_differences_become_warnings_and_the_rest_still_fail():
    other = manifest(seed=7, base="c" * 64)
    warnings = check_resume(other, OURS, parse_allowed("seed,base"))
    assert len(warnings) == 2 and "--resume-allow-mismatch=seed" in warnings[0]
    with pytest.raises(ResumeMismatch, match="--resume-allow-mismatch=base") as info:
        check_resume(other, OURS, parse_allowed("seed"))
    assert "train.seed" not in str(info.value)


def test_the_pattern_cannot_be_overridden():
    with pytest.raises(ResumeMismatch, match="logits are 2:8, mask.pattern is 2:4 .this one cannot be overridden") as info:
        check_resume(manifest(m=8), OURS, parse_allowed("seed,data,base"))
    assert "--resume-allow-mismatch" not in str(info.value)


def test_older_checkpoints_are_checked_for_what_they_hold():
    old = manifest()
    del old.state["data"]
    old.state.pop("seed")
    old.base_fingerprint = None
    assert check_resume(old, OURS) == []


def test_the_flag_names_only_known_checks():
    assert parse_allowed("") == frozenset() and parse_allowed(" seed , data") == {"seed", "data"}
    with pytest.raises(ValueError, match="--resume-allow-mismatch: unknown pattern, sed; choose among seed, data, base"):
        parse_allowed("sed,pattern")
