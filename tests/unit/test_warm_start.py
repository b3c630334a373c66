"""The warm start's identity (priors/warm_start.py): which inputs make a new search, which reuse one."""

from __future__ import annotations

import json

import pytest

from maskpro_ds.config import Config
from maskpro_ds.priors.warm_start import prior_checksum, samples_forwards, warm_start_key


def _cfg(**mask) -> Config:
    cfg = Config()
    cfg.mask.warm_start = "swap"
    for key, value in mask.items():
        setattr(cfg.mask, key, value)
    return cfg


def test_key_changes_with_every_input_and_only_with_them(tmp_path):
    base = warm_start_key(_cfg(), "text-a", "base-a")
    assert warm_start_key(_cfg(), "text-a", "base-a") == base
    assert warm_start_key(_cfg(), "text-b", "base-a") != base
    assert warm_start_key(_cfg(), "text-a", "base-b") != base
    assert warm_start_key(_cfg(warm_start_samples=64), "text-a", "base-a") != base
    assert warm_start_key(_cfg(pattern="4:8"), "text-a", "base-a") != base
    assert warm_start_key(_cfg(init_scale=5.0), "text-a", "base-a") == base  # C does not change the mask
    prior = tmp_path / "prior"
    prior.mkdir()
    (prior / "mask_manifest.json").write_text(json.dumps({"checksums": {"masks.safetensors": "aa"}}))
    with_prior = warm_start_key(_cfg(prior=str(prior)), "text-a", "base-a")
    assert with_prior != base
    (prior / "mask_manifest.json").write_text(json.dumps({"checksums": {"masks.safetensors": "bb"}}))
    assert warm_start_key(_cfg(prior=str(prior)), "text-a", "base-a") != with_prior  # another prior's content


def test_prior_that_is_not_an_artifact_is_named(tmp_path):
    assert prior_checksum("") == "magnitude"
    with pytest.raises(ValueError, match="mask.prior .*no mask_manifest.json"):
        prior_checksum(str(tmp_path))


def test_forwards_counted_at_the_training_batch_size():
    assert samples_forwards(128, 4) == 32 and samples_forwards(9, 4) == 3


def test_config_refuses_unknown_warm_start_and_empty_samples():
    cfg = Config()
    cfg.mask.warm_start = "sparsegpt"
    with pytest.raises(ValueError, match="mask.warm_start"):
        cfg.validate()
    cfg = Config()
    cfg.mask.warm_start_samples = 0
    with pytest.raises(ValueError, match="mask.warm_start_samples"):
        cfg.validate()
