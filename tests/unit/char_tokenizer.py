"""A character-level tokenizer built in memory (no hub) for the tiny vocab-128 test models.

99 ids: ``<unk>``, ``<s>``, ``</s>``, the 95 printable ASCII characters and ``"\\n"``, one id per
character, so a text's token count is its length (plus one with ``bos``).
"""

from __future__ import annotations


def char_tokenizer(bos: bool = False):
    """The tokenizer; with ``bos`` it prepends ``<s>`` to every text, as Llama's does."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in list(string.printable[:95]) + ["\n"]:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
