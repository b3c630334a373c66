"""Tiny random decoders of several Hugging Face families, built from config objects (no hub).

One per architecture the project claims (docs/architectures.md): what each adds over Llama is kept
small but real: Mistral's sliding window is shorter than the test windows, Gemma 3 mixes sliding
and full layers whose rotary tables have different bases and scales its (tied) embedding, Phi-3
fuses q/k/v and gate/up into single Linears, Qwen2-MoE keeps its experts as fused 3-D parameters
beside a shared expert. Llama and Gemma 3 get a tokenizer that adds BOS by default (as theirs do),
the others the byte tokenizer, which adds nothing.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.byte_tokenizer import byte_tokenizer
from tests.unit.char_tokenizer import char_tokenizer

ARCHS = ("llama", "qwen3", "mistral", "gemma3", "phi3", "qwen2_moe")
MOE_FAMILIES = ("qwen2_moe", "qwen3_moe", "mixtral", "olmoe")  # fused experts, per-expert checkpoints
MOE_EXCLUDE = r"\.experts\."  # fused experts are refused as targets: MoE runs leave them dense


def _config(arch: str, layers: int):
    import transformers as T

    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if arch == "llama":
        return T.LlamaConfig(**common, tie_word_embeddings=False)
    if arch == "qwen3":
        return T.Qwen3Config(**common, head_dim=16, tie_word_embeddings=False)
    if arch == "mistral":
        return T.MistralConfig(**common, sliding_window=8, tie_word_embeddings=False)
    if arch == "gemma3":
        kinds = ["sliding_attention", "full_attention"] * (layers // 2) + ["sliding_attention"] * (layers % 2)
        return T.Gemma3TextConfig(**common, head_dim=16, sliding_window=8, layer_types=kinds,
                                  tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "phi3":
        return T.Phi3Config(**common, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "qwen2_moe":
        return T.Qwen2MoeConfig(**common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                shared_expert_intermediate_size=64, tie_word_embeddings=False)
    moe = dict(num_experts_per_tok=2, tie_word_embeddings=False)
    if arch == "qwen3_moe":
        return T.Qwen3MoeConfig(**common, num_experts=4, moe_intermediate_size=32, **moe)
    if arch == "mixtral":  # its checkpoints also name the MoE block block_sparse_moe (renamed to mlp on load)
        return T.MixtralConfig(**common, num_local_experts=4, **moe)
    if arch == "olmoe":
        return T.OlmoeConfig(**common, num_experts=4, pad_token_id=0, eos_token_id=2, **moe)
    raise ValueError(f"unknown architecture {arch}")


def make_arch(arch: str, path: Path, *, layers: int = 2, seed: int = 0) -> Path:
    """Save a random ``arch`` causal LM (fp32) with its tokenizer into ``path``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = _config(arch, layers)
    model = AutoModelForCausalLM.from_config(config)
    if arch == "gemma3":
        # Default rotary bases differ (full 1e6, sliding 1e4); a real check needs them to.
        rope = model.config.rope_parameters
        assert rope["full_attention"]["rope_theta"] != rope["sliding_attention"]["rope_theta"]
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer = char_tokenizer(bos=True) if arch in ("llama", "gemma3") else byte_tokenizer()
    tokenizer.save_pretrained(path)
    return path


def exclude_for(arch: str) -> list[str]:
    """The ``model.exclude`` a run of ``arch`` uses (the default plus the fused experts of an MoE)."""
    return ["lm_head", MOE_EXCLUDE] if arch == "qwen2_moe" else ["lm_head"]
