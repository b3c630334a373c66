"""Partitioned loading (``load_partitioned_model``) against a plain single-process ``from_pretrained``.

Two ranks build the model under ZeRO-3 and fill their partitions straight from the safetensors file;
every gathered parameter must be bit-identical to transformers' own loading. The larger model also
checks the memory claim: rank 0's peak RSS grows by its partitions plus one tensor, not the model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from tests.distributed.launch import BIN, REPO, free_port, run
from tests.tiny import make_tiny_llama

pytestmark = pytest.mark.distributed
WORKER = str(REPO / "tests" / "distributed" / "load_worker.py")


def load_two_ranks(model_dir: Path, out_dir: Path, dtype: str = "fp32") -> dict:
    run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
         str(free_port()), WORKER, str(model_dir), str(out_dir), dtype], timeout=180)
    return json.loads((out_dir / "hashes.json").read_text())


def reference_hashes(model_dir: Path, dtype: torch.dtype) -> dict[str, str]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    return {name: hashlib.sha256(p.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            for name, p in model.named_parameters(remove_duplicate=False)}


def make_tied_llama(path: Path) -> Path:
    """Like make_tiny_llama but with tie_word_embeddings=True (lm_head.weight is not in the file)."""
    from safetensors import safe_open
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(path)
    with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
        assert "lm_head.weight" not in handle.keys()
    return path


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_two_rank_load_equals_from_pretrained(tmp_path, dtype):
    model_dir = make_tiny_llama(tmp_path / "model", hidden=72)  # odd sizes: partitions end mid-row, padded
    got = load_two_ranks(model_dir, tmp_path / "out", dtype)
    want = reference_hashes(model_dir, {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    assert got["dtype"] == str({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    assert got["hashes"] == want


def test_tied_embeddings(tmp_path):
    model_dir = make_tied_llama(tmp_path / "tied")
    got = load_two_ranks(model_dir, tmp_path / "out")
    assert got["hashes"]["lm_head.weight"] == got["hashes"]["model.embed_tokens.weight"]
    assert got["hashes"] == reference_hashes(model_dir, torch.float32)


def test_reading_the_files_costs_one_tensor_not_the_model(tmp_path):
    model_dir = make_tiny_llama(tmp_path / "big", hidden=512, intermediate=2048, layers=4, heads=8, kv_heads=8)
    model_bytes = (model_dir / "model.safetensors").stat().st_size  # ~68 MB; largest tensor 4 MB
    got = load_two_ranks(model_dir, tmp_path / "out")
    # Filling the partitions costs each rank about one tensor's rows of peak RSS. A full state dict
    # would cost 1x the model, and even keeping the file mapped would count this rank's half of it.
    for growth in got["fill_peak_rss_growth"]:
        assert growth < 0.25 * model_bytes, (got, model_bytes)


def test_plain_model_errors_and_prefix(tmp_path):
    """In-process, on an unpartitioned model: key matching, error messages, pickle refusal."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from maskpro_ds.train.weights_loader import load_weights

    src = make_tiny_llama(tmp_path / "src")
    tensors = load_file(str(src / "model.safetensors"))
    fresh = lambda: AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(src)))  # noqa: E731
    # Base-model keys without the "model." prefix load to the same tensors.
    stripped = tmp_path / "stripped"
    stripped.mkdir()
    (stripped / "config.json").write_text((src / "config.json").read_text())
    save_file({k.removeprefix("model."): v for k, v in tensors.items()}, str(stripped / "model.safetensors"))
    model = fresh()
    load_weights(model, stripped)
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight, tensors["model.layers.1.mlp.up_proj.weight"])
    # A key the model lacks and a parameter the file lacks are both named.
    save_file({**{k: v for k, v in tensors.items() if k != "lm_head.weight"}, "extra.weight": torch.zeros(2)},
              str(stripped / "model.safetensors"))
    with pytest.raises(ValueError, match=r"lm_head\.weight \(a model parameter absent[\s\S]*extra\.weight in model"):
        load_weights(fresh(), stripped)
    # Pickle-only checkpoints are refused, not unpickled.
    (stripped / "model.safetensors").unlink()
    (stripped / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="convert them to safetensors"):
        load_weights(fresh(), stripped)
