"""Export refusals and interruptions: every failure names its file and leaves no finished-looking output.

Same tiny bf16 Llama and synthetic checkpoints as test_export.py. "Nothing that looks finished"
means: the --out path does not exist, and no directory beside it lacks the ``.tmp-`` prefix.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from maskpro_ds.cli.export import inspect_main, main
from maskpro_ds.export import apply_mask, export_checkpoint
from maskpro_ds.formats.hashing import model_fingerprint, sha256_file
from tests.synthetic import write_synthetic_checkpoint
from tests.unit.test_export import OPTS, layer_shapes, make_base


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    base = make_base(root / "base")
    shapes = layer_shapes(base)
    fp = model_fingerprint(base)
    step = write_synthetic_checkpoint(root / "run", shapes, 2, 4, 2, {"path": str(base), "fingerprint": fp})
    return {"root": root, "base": base, "shapes": shapes, "fp": fp, "step": step}


def fresh_checkpoint(world, tmp_path, **kw) -> Path:
    shapes = kw.pop("shapes", world["shapes"])
    return write_synthetic_checkpoint(tmp_path / "run", shapes, kw.pop("n", 2), kw.pop("m", 4), 2,
                                      {"path": str(world["base"]), "fingerprint": kw.pop("fp", world["fp"])}, **kw)


def assert_nothing_finished(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".tmp-{out.name}-*")), "a failed export removes its temp dir"


def test_missing_shard(world, tmp_path):
    step = fresh_checkpoint(world, tmp_path)
    (step / "shard-00001-of-00002.safetensors").unlink()
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="shard-00001-of-00002.safetensors"):
        export_checkpoint(step, world["base"], out, "hf-dense", **OPTS)
    assert_nothing_finished(out)
    assert main([str(step), "--base", str(world["base"]), "--out", str(out)]) == 2
    assert inspect_main([str(step)]) == 2


def test_truncated_shard(world, tmp_path):
    step = fresh_checkpoint(world, tmp_path)
    shard = step / "shard-00000-of-00002.safetensors"
    os.truncate(shard, shard.stat().st_size - 10)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="shard-00000-of-00002.safetensors.*truncated"):
        export_checkpoint(step, world["base"], out, "hf-dense,mask", **OPTS)
    assert_nothing_finished(out)


def test_manifest_not_matching_shard(world, tmp_path):
    step = fresh_checkpoint(world, tmp_path)
    manifest = json.loads((step / "manifest.json").read_text())
    manifest["layers"][0]["name"] = "model.layers.0.self_attn.renamed"
    for shard in manifest["shards"]:
        shard["group_ranges"]["model.layers.0.self_attn.renamed"] = shard["group_ranges"].pop("model.layers.0.self_attn.q_proj")
    (step / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="shard-0000.*renamed"):
        export_checkpoint(step, world["base"], out, "hf-dense", **OPTS)
    assert_nothing_finished(out)


def test_truncated_base_shard(world, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(world["base"], base)
    victim = sorted(base.glob("model-*.safetensors"))[2]
    os.truncate(victim, victim.stat().st_size - 100)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=f"{victim.name}.*truncated"):
        export_checkpoint(world["step"], base, out, "hf-dense", **OPTS)
    assert_nothing_finished(out)


def test_wrong_base_shape(world, tmp_path):
    wide = tmp_path / "wide"
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(wide)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"model.safetensors: model.layers.0.mlp.gate_proj.weight has shape \[192, 64\]"):
        export_checkpoint(world["step"], wide, out, "hf-dense", **OPTS)
    assert_nothing_finished(out)


def test_masked_layer_missing_in_base(world, tmp_path):
    shapes = dict(world["shapes"], **{"model.layers.5.mlp.up_proj": (128, 64)})
    step = fresh_checkpoint(world, tmp_path, shapes=shapes)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="model.layers.5.mlp.up_proj has no tensor"):
        export_checkpoint(step, world["base"], out, "mask", **OPTS)
    assert_nothing_finished(out)


def test_fingerprint_mismatch(world, tmp_path):
    base = tmp_path / "other-base"
    shutil.copytree(world["base"], base)
    index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    file = base / index["model.norm.weight"]
    tensors = load_file(file)
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 2  # same shapes, other weights
    save_file(tensors, file, metadata={"format": "pt"})
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="fingerprint .* differs"):
        export_checkpoint(world["step"], base, out, "hf-dense", **OPTS)
    assert_nothing_finished(out)
    mask = export_checkpoint(world["step"], world["base"], tmp_path / "mask-out", "mask", **OPTS) / "mask"
    with pytest.raises(ValueError, match="fingerprint .* differs"):
        apply_mask(mask, base, out, "hf-dense", **OPTS)
    assert_nothing_finished(out)
    # an explicit opt-out exports anyway (e.g. the same weights re-saved in another layout)
    export_checkpoint(world["step"], base, out, "hf-dense", fingerprint_check=False, **OPTS)
    assert (out / "hf-dense" / "model.safetensors.index.json").is_file()


def test_existing_out_needs_force(world, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--force"):
        export_checkpoint(world["step"], world["base"], out, "mask", **OPTS)
    assert (out / "keep.txt").read_text() == "mine"
    assert main([str(world["step"]), "--base", str(world["base"]), "--out", str(out), "--format", "mask"]) == 2
    export_checkpoint(world["step"], world["base"], out, "mask", force=True, **OPTS)
    assert not (out / "keep.txt").exists() and (out / "mask" / "mask_manifest.json").is_file()


def test_ct_sparse24_refuses_other_patterns(world, tmp_path):
    step = fresh_checkpoint(world, tmp_path, n=4, m=8, fp=world["fp"])
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="ct-sparse24 stores 2:4 masks only; this mask is 4:8"):
        export_checkpoint(step, world["base"], out, "hf-dense,ct-sparse24", **OPTS)
    assert_nothing_finished(out)
    export_checkpoint(step, world["base"], out, "hf-dense,mask", **OPTS)  # 4:8 is fine elsewhere
    assert json.loads((out / "mask" / "mask_manifest.json").read_text())["pattern"] == "4:8"


def test_failure_midway_removes_everything(world, tmp_path):
    """A NaN logit in the last layer fails the export after every other layer has been written."""
    step = fresh_checkpoint(world, tmp_path)
    shard = step / "shard-00001-of-00002.safetensors"
    tensors = load_file(shard)
    name = "model.layers.1.mlp.down_proj"
    tensors[name][-1, 0] = float("nan")
    save_file(tensors, shard, metadata={"format": "maskpro_ds.checkpoint"})
    manifest = json.loads((step / "manifest.json").read_text())
    manifest["shards"][1]["bytes"] = shard.stat().st_size
    manifest["shards"][1]["sha256"] = sha256_file(shard)  # written that way: a NaN logit, not a corrupt file
    (step / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="model.layers.1.mlp.down_proj.*NaN"):
        export_checkpoint(step, world["base"], out, "hf-dense,mask,ct-sparse24,logits", **OPTS)
    assert not out.exists()
    assert list(tmp_path.glob(".tmp-*")) == []


KILL_SCRIPT = """
import os, signal, sys
from maskpro_ds.export import export_checkpoint, sources
calls = [0]
block = sources.CheckpointMasks.block
def block_then_die(self, *args):
    calls[0] += 1
    if calls[0] == 20:  # well into the pass: several layers already written
        os.kill(os.getpid(), signal.SIGKILL)
    return block(self, *args)
sources.CheckpointMasks.block = block_then_die
export_checkpoint(sys.argv[1], sys.argv[2], sys.argv[3], "hf-dense,mask,ct-sparse24", max_shard_size="20KB",
                  chunk_elements=1000, workers=int(sys.argv[4]), progress=False)
"""


def run_kill_script(world, out: Path, workers: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(world["step"]), str(world["base"]), str(out),
                           str(workers)], cwd=Path(__file__).resolve().parents[2], capture_output=True, timeout=120)


def test_killed_export_leaves_nothing_finished(world, tmp_path):
    out = tmp_path / "out"
    proc = run_kill_script(world, out, workers=1)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert not out.exists()
    leftovers = list(tmp_path.glob(".tmp-out-*"))
    assert len(leftovers) == 1, "the kill leaves the partial temp dir, marked as such"
    written = [p for p in leftovers[0].rglob("*.safetensors") if p.stat().st_size > 0]
    assert written, "the export had started writing when it was killed"
    assert not list(leftovers[0].rglob("export.json")) and not list(leftovers[0].rglob("*.index.json"))
    # the leftover does not block the next export
    export_checkpoint(world["step"], world["base"], out, "hf-dense", **OPTS)
    weights = load_file(out / "hf-dense" / sorted(p.name for p in (out / "hf-dense").glob("model-*"))[0])
    assert all(t.dtype in (torch.bfloat16,) for t in weights.values())


def test_killed_worker_fails_the_export_cleanly(world, tmp_path):
    """A worker killed mid-pass (the OOM killer, say): the parent stops with a clear error, no output."""
    out = tmp_path / "out"
    proc = run_kill_script(world, out, workers=2)
    assert proc.returncode == 1, proc.stderr.decode()[-2000:]
    assert "an export worker process died" in proc.stderr.decode()
    assert_nothing_finished(out)
