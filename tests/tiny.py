"""Tiny, offline test fixtures: a random Llama with a byte-level tokenizer, and a small text file.

Only for fast unit and distributed tests; quality numbers use the real SmolLM2 model and text.
"""

from __future__ import annotations

from pathlib import Path

from tests.byte_tokenizer import byte_tokenizer

TEXT = (
    "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
    "Sparse tensor cores keep two of every four weights. Masks are learned with forward passes only. "
)


def make_tiny_llama(path: Path, *, hidden: int = 64, intermediate: int = 128, layers: int = 2, heads: int = 4,
                    kv_heads: int = 2, seed: int = 0, dtype: str = "float32") -> Path:
    """Save a random LlamaForCausalLM (vocab 256) with its tokenizer into ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def make_text(path: Path, repeats: int = 40) -> Path:
    """Documents separated by blank lines, enough for dozens of 32-token samples."""
    docs = [f"Document {i}. " + TEXT * (1 + i % 3) for i in range(repeats)]
    path.write_text("\n\n".join(docs))
    return path
