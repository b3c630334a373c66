"""Content checksums of checkpoint shards and mask artifacts, and what a user may pass as a checkpoint.

A flipped byte inside a shard's tensor data keeps the file's size and safetensors header intact, so
only the sha256 recorded at write time can tell. It must be caught on resume (the previous good
checkpoint is used, the shard named), before an export (``--verify`` or not), and by the inspect
command, each naming the file.
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import pytest

from maskpro_ds.cli.export import inspect_main, main
from maskpro_ds.export import apply_mask, export_checkpoint
from maskpro_ds.formats.checkpoint_format import read_manifest, verify_checksums
from maskpro_ds.formats.hashing import model_fingerprint, sha256_file
from maskpro_ds.formats.mask_artifact import MASK_FILE, MASK_MANIFEST, read_mask_artifact
from maskpro_ds.train.checkpoint import find_resumable
from tests.synthetic import write_synthetic_checkpoint
from tests.unit.test_export import OPTS, layer_shapes, make_base

SHARD = "shard-00001-of-00002.safetensors"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("checksums")
    base = make_base(root / "base")
    return {"root": root, "base": base, "shapes": layer_shapes(base), "fp": model_fingerprint(base)}


def checkpoint(world, run_dir: Path, step: int = 100) -> Path:
    return write_synthetic_checkpoint(run_dir, world["shapes"], 2, 4, 2,
                                      {"path": str(world["base"]), "fingerprint": world["fp"]}, step=step)


def flip_data_byte(file: Path, offset: int = 5) -> None:
    """Flip one bit of a byte inside the tensor data: size and header stay valid."""
    raw = bytearray(file.read_bytes())
    (header,) = struct.unpack("<Q", raw[:8])
    raw[8 + header + offset] ^= 0x10
    file.write_bytes(bytes(raw))


def test_every_shard_records_its_sha256(world, tmp_path):
    step = checkpoint(world, tmp_path / "run")
    raw = json.loads((step / "manifest.json").read_text())
    assert raw["version"] == 2
    for entry in raw["shards"]:
        assert entry["sha256"] == sha256_file(step / entry["file"])
    assert verify_checksums(read_manifest(step)) is True


def test_flipped_byte_in_a_logits_shard_is_caught_everywhere(world, tmp_path, capsys, caplog):
    run = tmp_path / "run"
    good = checkpoint(world, run, step=50)
    bad = checkpoint(world, run, step=100)
    flip_data_byte(bad / SHARD)
    read_manifest(bad)  # sizes and headers still pass: only the content hash can tell
    with pytest.raises(ValueError, match=f"{SHARD}: content changed since it was written"):
        verify_checksums(read_manifest(bad))
    # resume: the previous good checkpoint, with a message naming the shard
    with caplog.at_level(logging.ERROR):
        assert find_resumable(run / "checkpoints").path == good
    assert f"{bad} is unusable" in caplog.text and f"{bad / SHARD}: content changed" in caplog.text
    # export, with and without --verify: refused before anything is written, naming the file
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=SHARD):
        export_checkpoint(bad, world["base"], out, "hf-dense", **OPTS)
    assert not out.exists()
    capsys.readouterr()
    assert main([str(bad), "--base", str(world["base"]), "--out", str(out), "--verify"]) == 2
    err = capsys.readouterr().err
    assert f"{bad / SHARD}: content changed since it was written" in err and not out.exists()
    # inspect: a failed check (exit 1) naming the file
    assert inspect_main([str(bad)]) == 1
    printed = capsys.readouterr().out
    assert "sha256 FAILED" in printed and f"FAILED: {bad / SHARD}" in printed
    assert inspect_main([str(good)]) == 0 and "sha256 ok" in capsys.readouterr().out


def test_checkpoints_without_checksums_still_load(world, tmp_path, capsys):
    step = checkpoint(world, tmp_path / "run")
    raw = json.loads((step / "manifest.json").read_text())
    raw["version"] = 1
    for entry in raw["shards"]:
        del entry["sha256"]
    (step / "manifest.json").write_text(json.dumps(raw))
    assert verify_checksums(read_manifest(step)) is False
    assert inspect_main([str(step)]) == 0 and "sha256 not recorded" in capsys.readouterr().out
    raw["version"] = 2  # a version-2 manifest without a checksum is damaged, not old
    (step / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="a shard entry has no sha256"):
        read_manifest(step)


def test_mask_artifact_checksum(world, tmp_path, capsys):
    out = tmp_path / "exp"
    export_checkpoint(checkpoint(world, tmp_path / "run"), world["base"], out, "mask", **OPTS)
    mask_dir = out / "mask"
    manifest = json.loads((mask_dir / MASK_MANIFEST).read_text())
    assert manifest["checksums"] == {MASK_FILE: sha256_file(mask_dir / MASK_FILE)}
    assert read_mask_artifact(mask_dir).verify() is True
    assert inspect_main([str(out)]) == 0
    flip_data_byte(mask_dir / MASK_FILE)
    with pytest.raises(ValueError, match=f"{MASK_FILE}: content changed since it was written"):
        read_mask_artifact(mask_dir).verify()
    capsys.readouterr()
    assert inspect_main([str(out)]) == 1  # verify of the export names the file
    assert f"FAILED: {mask_dir / MASK_FILE}: content changed" in capsys.readouterr().out
    with pytest.raises(ValueError, match=MASK_FILE):  # before an apply
        apply_mask(mask_dir, world["base"], tmp_path / "applied", "hf-dense", **OPTS)
    assert not (tmp_path / "applied").exists()
    # a copy of the artifact on its own: the inspect command checks it too
    alone = tmp_path / "alone"
    alone.mkdir()
    for f in mask_dir.iterdir():
        (alone / f.name).write_bytes(f.read_bytes())
    assert inspect_main([str(alone)]) == 1 and f"FAILED: {alone / MASK_FILE}" in capsys.readouterr().out


@pytest.mark.parametrize("content", [b"hello, this is not a checkpoint\n", b'{"model_type": "llama"}\n',
                                     bytes(range(256)) * 4, b"../../etc\n"])
def test_a_regular_file_is_not_taken_for_a_pointer(world, tmp_path, capsys, content):
    given = tmp_path / "notes.txt"
    given.write_bytes(content)
    for command in ([str(given), "--base", str(world["base"]), "--out", str(tmp_path / "out")], [str(given)]):
        capsys.readouterr()
        code = (main if len(command) > 1 else inspect_main)(command)
        err = capsys.readouterr().err
        assert code == 2
        assert f"{given} is a file but not a checkpoint pointer" in err and "step directory" in err
        assert "Traceback" not in err and "hello" not in err and "llama" not in err
    # a real pointer still works
    step = checkpoint(world, tmp_path / "run")
    assert inspect_main([str(step.parent / "latest")]) == 0


def test_resume_check_shares_the_hashing_between_ranks(world, tmp_path):
    """Rank r hashes shards r, r + R, ...: each rank alone sees only its own shards' corruption."""
    from maskpro_ds.train.checkpoint import _problem

    step = checkpoint(world, tmp_path / "run")
    flip_data_byte(step / SHARD)
    assert _problem(step, 0, 2) is None
    assert SHARD in _problem(step, 1, 2)
    assert SHARD in _problem(step, 0, 1)
