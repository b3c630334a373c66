"""Export formats on a tiny random Llama: what each format holds, checked against in-process references.

Base: LlamaConfig(hidden 64, intermediate 128, 2 layers, vocab 128) in bf16, saved in 40 KB shards
(6 files + index). Row 0 of layer 0's q_proj starts with [0.0, -0.0, 0.5, -0.0, -0.0 x4] so kept
zeros and negative zeros are exercised. Checkpoints at world sizes 1 and 2 hold the same logits,
rounded to halves so that ties (lower column wins) are common. The exporter runs with 1000-element
row blocks and 20 KB output shards, so every layer spans several blocks and several files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from maskpro_ds.cli.export import inspect_main
from maskpro_ds.export import apply_mask, export_checkpoint, verify_export
from maskpro_ds.export.sinks.ct_sparse24 import decompress
from maskpro_ds.formats.hashing import model_fingerprint
from maskpro_ds.formats.mask_artifact import read_mask_artifact
from maskpro_ds.masks.nm import topn_mask
from tests.synthetic import synthetic_logits, write_synthetic_checkpoint

LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
ALL_FORMATS = "hf-dense,mask,ct-sparse24,logits"
OPTS = {"max_shard_size": "20KB", "chunk_elements": 1000, "progress": False}


def make_base(path: Path) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, :8] = torch.tensor([0.0, -0.0, 0.5, -0.0, -0.0, -0.0, -0.0, -0.0])
    model.save_pretrained(path, max_shard_size="40KB")
    (path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "WordLevel"}}\n')
    return path


def layer_shapes(base: Path) -> dict[str, tuple[int, int]]:
    index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    shapes = {}
    for i in range(2):
        for lin in LINEARS:
            name = f"model.layers.{i}.{lin}"
            with safe_open(str(base / index[f"{name}.weight"]), framework="pt") as f:
                shapes[name] = tuple(f.get_slice(f"{name}.weight").get_shape())
    return shapes


def base_state(base: Path) -> dict[str, torch.Tensor]:
    index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    state = {}
    for file in sorted(set(index.values())):
        with safe_open(str(base / file), framework="pt") as f:
            state.update({k: f.get_tensor(k) for k in f.keys()})
    return state


def expected_mask(name: str, shape: tuple[int, int]) -> torch.Tensor:
    logits = synthetic_logits(name, 0, shape[0] * shape[1] // 4, 4, ties=True)
    return topn_mask(logits.reshape(shape), 2, 4)


def load_dir(directory: Path) -> dict[str, torch.Tensor]:
    state = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            state.update({k: f.get_tensor(k) for k in f.keys()})
    return state


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    base = make_base(root / "base")
    shapes = layer_shapes(base)
    fp = model_fingerprint(base)
    ckpt = {ws: write_synthetic_checkpoint(root / f"run{ws}", shapes, 2, 4, ws, {"path": str(base), "fingerprint": fp},
                                           step=300, run_id="tiny-run", ties=True) for ws in (1, 2)}
    out1 = export_checkpoint(root / "run1", base, root / "out1", ALL_FORMATS, **OPTS)  # run dir form
    out2 = export_checkpoint(ckpt[2].parent / "latest", base, root / "out2", ALL_FORMATS, **OPTS)  # latest file form
    return {"root": root, "base": base, "shapes": shapes, "fp": fp, "ckpt": ckpt, "out1": out1, "out2": out2}


def test_layout_and_sharding(setup):
    out = setup["out1"]
    assert sorted(p.name for p in out.iterdir()) == ["ct-sparse24", "export.json", "hf-dense", "logits", "mask"]
    hf = out / "hf-dense"
    shards = sorted(hf.glob("model-*.safetensors"))
    assert len(shards) > 3, "20 KB shards of a 180 KB model must give several files"
    assert all(f.stat().st_size < 20_000 + 2_000 or len(safe_open(str(f), "pt").keys()) == 1 for f in shards)
    assert (hf / "tokenizer.json").read_bytes() == (setup["base"] / "tokenizer.json").read_bytes()
    assert (hf / "generation_config.json").is_file()
    config = json.loads((hf / "config.json").read_text())
    assert "quantization_config" not in config and "sparsity_config" not in config
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(base_state(setup["base"]))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in load_dir(hf).values())


def test_hf_dense_weights_and_transformers_logits(setup):
    base, shapes = setup["base"], setup["shapes"]
    dense = load_dir(setup["out1"] / "hf-dense")
    original = base_state(base)
    for name, shape in shapes.items():
        mask = expected_mask(name, shape)
        w, ref = dense[f"{name}.weight"], torch.where(mask, original[f"{name}.weight"], 0)
        assert w.dtype == torch.bfloat16
        assert torch.equal(w.view(torch.int16), ref.view(torch.int16)), name
        assert not bool((torch.signbit(w) & ~mask).any()), f"{name}: a pruned slot is -0.0"
        assert int(mask.sum()) == shape[0] * shape[1] // 2
    # kept slots that are zero in the base stay as they were: the row starts [0.0, -0.0, 0.5, -0.0]
    q = dense["model.layers.0.self_attn.q_proj.weight"]
    assert int((q[0, :8] == 0).sum()) >= 7
    for name in original:
        if name[: -len(".weight")] not in shapes:
            assert torch.equal(dense[name].view(torch.uint8), original[name].view(torch.uint8)), name

    reference = LlamaForCausalLM.from_pretrained(base, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        for name, shape in shapes.items():
            module = reference.get_submodule(name)
            module.weight.copy_(torch.where(expected_mask(name, shape), module.weight, 0))
        exported = LlamaForCausalLM.from_pretrained(setup["out1"] / "hf-dense", dtype=torch.bfloat16).eval()
        ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
        got, want = exported(ids).logits, reference(ids).logits
    assert torch.equal(got, want)
    dense_logits = LlamaForCausalLM.from_pretrained(base, dtype=torch.bfloat16).eval()(ids).logits
    assert not torch.equal(got, dense_logits.detach()), "masking must change the output"


def test_mask_artifact_matches_weights(setup):
    art = read_mask_artifact(setup["out1"] / "mask")
    assert art.pattern == "2:4" and art.base_fingerprint == setup["fp"]
    assert art.meta["run_id"] == "tiny-run" and art.meta["step"] == 300
    assert art.shapes == setup["shapes"]
    dense = load_dir(setup["out1"] / "hf-dense")
    original = base_state(setup["base"])
    for name, shape in setup["shapes"].items():
        mask = art.layer_mask(name)
        assert torch.equal(mask, expected_mask(name, shape))
        with safe_open(str(setup["out1"] / "mask" / "masks.safetensors"), "pt") as f:
            packed = f.get_tensor(name).numpy()
        assert np.array_equal(packed, np.packbits(mask.numpy(), axis=-1, bitorder="little"))
        w = dense[f"{name}.weight"]
        assert bool((w[~mask].view(torch.int16) == 0).all()), "every pruned slot is +0.0"
        assert torch.equal(w[mask].view(torch.int16), original[f"{name}.weight"][mask].view(torch.int16))


def test_ct_sparse24_byte_layout_and_round_trip(setup):
    ct = load_dir(setup["out1"] / "ct-sparse24")
    dense = load_dir(setup["out1"] / "hf-dense")
    original = base_state(setup["base"])
    shapes = setup["shapes"]
    for name, (out_f, in_f) in shapes.items():
        assert f"{name}.weight" not in ct
        mask = expected_mask(name, (out_f, in_f)).numpy()
        bits = original[f"{name}.weight"].view(torch.int16).numpy()
        comp, bitmask, shape = ct[f"{name}.compressed"], ct[f"{name}.bitmask"], ct[f"{name}.shape"]
        assert comp.dtype == torch.bfloat16 and tuple(comp.shape) == (out_f, in_f // 2)
        assert np.array_equal(comp.view(torch.int16).numpy(), bits[mask].reshape(out_f, in_f // 2))
        assert bitmask.dtype == torch.uint8
        assert np.array_equal(bitmask.numpy(), np.packbits(mask, axis=-1, bitorder="little"))
        assert shape.dtype == torch.int64 and shape.tolist() == [[out_f], [in_f]]
        # decompression (numpy, independent of the exporter's code) == hf-dense, bit for bit
        restored = np.zeros((out_f, in_f), dtype=np.int16)
        restored[np.unpackbits(bitmask.numpy(), axis=-1, bitorder="little")[:, :in_f].astype(bool)] = \
            comp.view(torch.int16).numpy().reshape(-1)
        assert np.array_equal(restored, dense[f"{name}.weight"].view(torch.int16).numpy())
        assert torch.equal(decompress(comp, bitmask, in_f).view(torch.int16), dense[f"{name}.weight"].view(torch.int16))
    for name, t in original.items():
        if name[: -len(".weight")] not in shapes:
            assert torch.equal(ct[name].view(torch.uint8), t.view(torch.uint8)), name
    zeros = sum(int((t == 0).sum()) for t in dense.values() if t.is_floating_point())
    total = sum(t.numel() for t in dense.values() if t.is_floating_point())
    config = json.loads((setup["out1"] / "ct-sparse24" / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "compressed-tensors", "version": "0.14.0", "config_groups": {},
        "sparsity_config": {"format": "sparse-24-bitmask", "sparsity_structure": "2:4",
                            "global_sparsity": zeros / total, "targets": sorted(shapes), "ignore": ["lm_head"],
                            "registry_requires_subclass": False}}
    assert 0.4 < zeros / total < 0.5  # embeddings, norms and lm_head stay dense


def test_logits_format(setup):
    directory = setup["out1"] / "logits"
    manifest = json.loads((directory / "logits_manifest.json").read_text())
    assert manifest["dtype"] == "fp32" and manifest["pattern"] == "2:4" and manifest["step"] == 300
    got = load_dir(directory)
    for name, shape in setup["shapes"].items():
        g = shape[0] * shape[1] // 4
        assert torch.equal(got[name], synthetic_logits(name, 0, g, 4, ties=True))
    half = export_checkpoint(setup["root"] / "run2", setup["base"], setup["root"] / "out-fp16", "logits",
                             logits_dtype="fp16", **OPTS)
    got16 = load_dir(half / "logits")
    name = "model.layers.1.mlp.down_proj"
    assert got16[name].dtype == torch.float16 and torch.equal(got16[name], got[name].half())


def test_world_size_does_not_change_a_byte(setup):
    for fmt in ("hf-dense", "mask", "ct-sparse24", "logits"):
        a, b = setup["out1"] / fmt, setup["out2"] / fmt
        names = sorted(p.name for p in a.iterdir())
        assert names == sorted(p.name for p in b.iterdir())
        for file in names:
            assert (a / file).read_bytes() == (b / file).read_bytes(), f"{fmt}/{file}"


def test_apply_reproduces_the_export(setup):
    out = apply_mask(setup["out1"] / "mask", setup["base"], setup["root"] / "applied", "hf-dense,ct-sparse24", **OPTS)
    for fmt in ("hf-dense", "ct-sparse24"):
        for file in sorted(p.name for p in (setup["out1"] / fmt).iterdir()):
            assert (out / fmt / file).read_bytes() == (setup["out1"] / fmt / file).read_bytes(), f"{fmt}/{file}"
    with pytest.raises(ValueError, match="logits"):
        apply_mask(setup["out1"] / "mask", setup["base"], setup["root"] / "applied-logits", "logits", **OPTS)


def test_verify_passes_and_catches_tampering(setup, tmp_path, capsys):
    report = verify_export(setup["out1"], chunk_elements=1000)
    assert report.ok, report.summary()
    row = report.layers["model.layers.0.mlp.up_proj"]
    assert row["kept_fraction"] == 0.5 and row["zero_fraction"] >= 0.5
    assert inspect_main([str(setup["out1"]), "--base", str(setup["base"])]) == 0
    assert "model.layers.1.mlp.down_proj" in capsys.readouterr().out

    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(setup["out1"], bad)
    dense = load_dir(bad / "hf-dense")
    name = "model.layers.1.self_attn.o_proj.weight"
    mask = expected_mask(name[: -len(".weight")], tuple(dense[name].shape))
    flat = int(torch.nonzero(~mask.reshape(-1))[5])
    index = json.loads((bad / "hf-dense" / "model.safetensors.index.json").read_text())
    file = bad / "hf-dense" / index["weight_map"][name]
    with safe_open(str(file), "pt") as f:
        keys = list(f.keys())
    raw = file.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    assert name in keys
    pos = 8 + header_len + header[name]["data_offsets"][0] + 2 * flat
    raw = raw[: pos + 1] + bytes([raw[pos + 1] | 0x80]) + raw[pos + 2 :]  # pruned +0.0 -> -0.0
    file.write_bytes(raw)
    report = verify_export(bad, chunk_elements=1000)
    assert not report.ok and any("o_proj" in f and "+0.0" in f for f in report.failures)
    assert any("ct-sparse24" in f for f in report.failures), "hf-dense no longer matches ct-sparse24"
    assert inspect_main([str(bad), "--base", str(setup["base"])]) == 1
    assert inspect_main([str(bad / "mask"), "--base", str(setup["base"])]) == 0  # the mask alone is intact


def test_cli_export_verify_and_checkpoint_summary(setup, capsys):
    from maskpro_ds.cli.export import main

    out = setup["root"] / "cli-out"
    argv = [str(setup["ckpt"][2]), "--out", str(out), "--format", "mask,hf-dense", "--verify", "--no-progress",
            "--max-shard-size", "30KB"]  # --base defaults to the path recorded in the checkpoint
    assert main(argv) == 0
    assert (out / "mask" / "masks.safetensors").read_bytes() == (setup["out1"] / "mask" / "masks.safetensors").read_bytes()
    assert main(argv) == 2 and "--force" in capsys.readouterr().err
    assert inspect_main([str(setup["ckpt"][2]), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["world_size"] == 2 and summary["step"] == 300 and len(summary["layers"]) == 14


def test_single_file_base_gives_the_same_weights(setup, tmp_path):
    """The same weights saved as one model.safetensors: the fingerprint differs (other files), so the
    check is declined explicitly, and the export holds exactly the same tensors."""
    single = tmp_path / "single"
    LlamaForCausalLM.from_pretrained(setup["base"], dtype=torch.bfloat16).save_pretrained(single)
    assert (single / "model.safetensors").is_file() and not (single / "model.safetensors.index.json").exists()
    with pytest.raises(ValueError, match="fingerprint"):
        export_checkpoint(setup["ckpt"][1], single, tmp_path / "refused", "hf-dense", **OPTS)
    out = export_checkpoint(setup["ckpt"][1], single, tmp_path / "out", "hf-dense", fingerprint_check=False, **OPTS)
    got, want = load_dir(out / "hf-dense"), load_dir(setup["out1"] / "hf-dense")
    assert set(got) == set(want) and all(torch.equal(got[k].view(torch.uint8), want[k].view(torch.uint8)) for k in want)


_CT_DECOMPRESS = """
import json, sys
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.config import SparsityCompressionConfig
from safetensors.torch import save_file
ct_dir, out = sys.argv[1], sys.argv[2]
sparsity = json.loads(open(ct_dir + "/config.json").read())["quantization_config"]["sparsity_config"]
# transformers < 5 reads "config_groups": {} as "no quantization": only the sparsity compressor is built
compressor = ModelCompressor(sparsity_config=SparsityCompressionConfig.load_from_registry(sparsity["format"], **sparsity))
save_file({k: v.contiguous() for k, v in compressor.sparsity_compressor.decompress(ct_dir)}, out)
"""


@pytest.mark.slow
def test_ct_sparse24_reference_decompressor(setup, tmp_path):
    """compressed-tensors 0.14's own Sparse24BitMaskCompressor restores hf-dense bit for bit.

    compressed-tensors is not a dependency (0.14 wants transformers < 5), so it is installed with
    --no-deps into a scratch directory (needs PyPI) and run in a subprocess on that path."""
    import subprocess
    import sys

    target = tmp_path / "ct"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                    "compressed-tensors==0.14.0", "loguru"], check=True)
    out = tmp_path / "restored.safetensors"
    env = {**__import__("os").environ, "PYTHONPATH": str(target)}
    subprocess.run([sys.executable, "-c", _CT_DECOMPRESS, str(setup["out1"] / "ct-sparse24"), str(out)], check=True, env=env)
    from safetensors.torch import load_file

    restored = load_file(str(out))
    dense = load_dir(setup["out1"] / "hf-dense")
    assert set(restored) == set(dense)
    assert all(torch.equal(restored[k].view(torch.uint8), dense[k].view(torch.uint8)) for k in dense)
