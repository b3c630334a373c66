"""Mask artifacts, model fingerprints, atomic outputs, and the checkpoint format's own checks."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from maskpro_ds.formats.atomic import atomic_directory
from maskpro_ds.formats.checkpoint_format import (
    LayerEntry,
    load_layer_logits,
    read_manifest,
    split_groups,
    write_manifest,
    write_shard,
)
from maskpro_ds.formats.hashing import model_fingerprint
from maskpro_ds.formats.mask_artifact import MASK_FILE, read_mask_artifact, write_mask_artifact
from maskpro_ds.masks.nm import magnitude_prior
from tests.tiny import make_tiny_llama


def masks():
    torch.manual_seed(0)
    return {"model.layers.0.mlp.up_proj": magnitude_prior(torch.randn(6, 24), 2, 4),
            "model.layers.0.self_attn.q_proj": magnitude_prior(torch.randn(4, 12), 2, 4)}


def test_round_trip_bytes_and_reproducibility(tmp_path):
    ms = masks()
    a = write_mask_artifact(tmp_path / "a", ms, 2, 4, "f" * 64, {"method": "magnitude"})
    b = write_mask_artifact(tmp_path / "b", ms, 2, 4, "f" * 64, {"method": "magnitude"})
    digest = [hashlib.sha256((p / MASK_FILE).read_bytes()).hexdigest() for p in (a, b)]
    assert digest[0] == digest[1]  # the same masks give the same bytes
    art = read_mask_artifact(a)
    assert (art.n, art.m, art.meta["method"]) == (2, 4, "magnitude")
    for name, mask in ms.items():
        assert torch.equal(art.layer_mask(name), mask)
    from safetensors.numpy import load_file

    packed = load_file(str(a / MASK_FILE))["model.layers.0.self_attn.q_proj"]
    want = np.packbits(ms["model.layers.0.self_attn.q_proj"].numpy(), axis=-1, bitorder="little")
    assert packed.shape == (4, 2) and np.array_equal(packed, want)  # 12 columns -> 2 bytes per row


def test_refuses_non_strict_masks_and_leaves_nothing(tmp_path):
    ms = masks()
    ms["model.layers.0.mlp.up_proj"][0, :4] = True
    with pytest.raises(ValueError, match=r"not strict N:M[\s\S]*up_proj: 1 groups, first \[0\]"):
        write_mask_artifact(tmp_path / "bad", ms, 2, 4, None)
    assert list(tmp_path.iterdir()) == []


def test_fingerprint_follows_weights_not_paths(tmp_path):
    a = make_tiny_llama(tmp_path / "a", seed=0)
    b = make_tiny_llama(tmp_path / "b", seed=0)
    c = make_tiny_llama(tmp_path / "c", seed=1)
    assert model_fingerprint(a) == model_fingerprint(b) != model_fingerprint(c)
    art = read_mask_artifact(write_mask_artifact(tmp_path / "m", masks(), 2, 4, model_fingerprint(a)))
    art.check_base(model_fingerprint(b))
    with pytest.raises(ValueError, match="pass the base model the mask was made from"):
        art.check_base(model_fingerprint(c))


def test_atomic_directory_refuses_overwrite_and_cleans_up(tmp_path):
    with atomic_directory(tmp_path / "out") as d:
        (d / "x").write_text("1")
    with pytest.raises(FileExistsError, match="--force"):
        with atomic_directory(tmp_path / "out"):
            pass
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "out", force=True) as d:
            (d / "x").write_text("2")
            raise RuntimeError("boom")
    assert (tmp_path / "out" / "x").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _checkpoint(tmp_path, world):
    torch.manual_seed(0)
    full = {"l0": torch.randn(10, 4), "l1": torch.randn(3, 4)}
    step_dir = tmp_path / f"ckpt{world}"
    step_dir.mkdir()
    shards = []
    for r in range(world):
        ranges = {k: split_groups(v.shape[0], world, align=2)[r] for k, v in full.items()}
        slices = {k: full[k][g0:g1] for k, (g0, g1) in ranges.items()}
        shards.append(write_shard(step_dir, r, world, slices, ranges, step=5))
    layers = [LayerEntry("l0", (5, 8), 10), LayerEntry("l1", (1, 12), 3)]
    write_manifest(step_dir, step=5, n=2, m=4, layers=layers, shards=shards, state={}, config={},
                   base_model={}, run_id="t")
    return step_dir, full


@pytest.mark.parametrize("world", [1, 2, 3])
def test_checkpoint_format_reassembles_any_world_size(tmp_path, world):
    step_dir, full = _checkpoint(tmp_path, world)
    manifest = read_manifest(step_dir)
    for name, want in full.items():
        assert torch.equal(load_layer_logits(manifest, name), want)
        assert torch.equal(load_layer_logits(manifest, name, (1, 3)), want[1:3])


def test_checkpoint_format_errors_name_the_file(tmp_path):
    step_dir, _ = _checkpoint(tmp_path, 2)
    shard = step_dir / "shard-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.raises(ValueError, match="shard-00001-of-00002.safetensors: .* truncated or corrupt"):
        read_manifest(step_dir)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="shard of rank 1 is missing"):
        read_manifest(step_dir)
    raw = json.loads((step_dir / "manifest.json").read_text())
    raw["shards"][0]["group_ranges"]["l0"] = [0, 6]  # overlaps rank 1's [4, 10)
    (step_dir / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="do not tile"):
        read_manifest(step_dir, check_files=False)


def test_split_groups_is_aligned_and_covers():
    for groups, world, align in [(10, 3, 2), (1, 4, 2), (1000, 7, 8), (5, 1, 1)]:
        ranges = split_groups(groups, world, align)
        assert ranges[0][0] == 0 and ranges[-1][1] == groups
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
        assert all(g0 % align == 0 for g0, _ in ranges)


def test_fingerprint_cache_is_reused_until_a_weight_file_changes(tmp_path):
    model = make_tiny_llama(tmp_path / "m", seed=0)
    cache = tmp_path / "fp.json"
    first = model_fingerprint(model, cache)
    assert json.loads(cache.read_text())["fingerprint"] == first == model_fingerprint(model)
    raw = json.loads(cache.read_text())
    raw["fingerprint"] = "stale"
    cache.write_text(json.dumps(raw))
    assert model_fingerprint(model, cache) == "stale"  # same names, sizes, mtimes: the cache answers
    make_tiny_llama(tmp_path / "m", seed=1)  # rewritten weights: new mtime, so it is hashed again
    assert model_fingerprint(model, cache) not in ("stale", first)


def test_pointer_files_resolve(tmp_path):
    from maskpro_ds.formats.checkpoint_format import resolve_checkpoint

    step_dir, _ = _checkpoint(tmp_path, 1)
    for pointer in ("latest", "best"):
        (tmp_path / pointer).write_text(step_dir.name + "\n")
        assert resolve_checkpoint(tmp_path / pointer) == step_dir
    (tmp_path / "best").write_text("step-999999\n")
    with pytest.raises(FileNotFoundError, match="points to"):
        resolve_checkpoint(tmp_path / "best")
