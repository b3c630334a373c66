"""A 256-token byte-level tokenizer built in memory, for tiny test models and the shape benches.

Every tiny or config-only model this project builds (tests, bench/memory.py, the 70B-shaped run)
uses it, so none of them needs a tokenizer from a hub.
"""

from __future__ import annotations


def byte_tokenizer():
    """A 256-token byte-level tokenizer built in memory (no hub access)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=sorted(alphabet)[0])
