"""One tokenisation policy: training, calibration, held-out and evaluation windows of a text are identical.

The character tokenizer maps each character to one id (``<s>`` = 1 first when it adds BOS), so the
expected windows are computed from the text's characters, independently of the code under test.
The baseline pass reads the training samples themselves (checked bit for bit against the reference
in tests/distributed/test_archs.py).
"""

from __future__ import annotations

import pytest
import torch

from maskpro_ds.config import load_config
from maskpro_ds.data.samples import build_samples
from maskpro_ds.data.windows import adds_bos_by_default, bos_id
from maskpro_ds.eval.perplexity import perplexity_windows
from maskpro_ds.priors.calibration import calibration_tokens
from maskpro_ds.train.periodic_eval import heldout_windows
from tests.byte_tokenizer import byte_tokenizer
from tests.unit.char_tokenizer import char_tokenizer

SEQLEN = 32


def expected_windows(tok, text: str, bos: int | None) -> torch.Tensor:
    vocab = tok.get_vocab()
    ids = [vocab[ch] for ch in text]
    body = SEQLEN - (bos is not None)
    rows = [ids[i : i + body] for i in range(0, len(ids) - body + 1, body)]
    return torch.tensor([([bos] if bos is not None else []) + r for r in rows])


@pytest.mark.parametrize("policy, wants_bos", [("auto", True), ("true", True), ("false", False)])
def test_every_path_cuts_the_same_windows(tmp_path, policy, wants_bos):
    tok = char_tokenizer(bos=True)
    assert adds_bos_by_default(tok)
    body = SEQLEN - wants_bos
    text = "".join("abcdefghij klmnopqrstuvwxyz."[i % 28] for i in range(8 * body))  # exactly 8 windows
    path = tmp_path / "text.txt"
    path.write_text(text)
    bos = bos_id(tok, policy)
    assert (bos == tok.bos_token_id) if wants_bos else bos is None
    want = expected_windows(tok, text, bos)
    assert want.shape == (8, SEQLEN)

    training = build_samples(tok, str(path), seqlen=SEQLEN, num_samples=None, cache_dir=tmp_path / "c",
                             add_bos=policy).tokens
    calibration = calibration_tokens(tok, text, 8, SEQLEN, policy)  # 8 evenly spaced = the consecutive windows
    held_out = heldout_windows(tok, str(path), SEQLEN, 8 * SEQLEN, add_bos=policy)
    evaluation, total, _ = perplexity_windows(tok, text, SEQLEN, add_bos=policy)
    assert total == len(text)
    for name, got in [("training", training), ("calibration", calibration), ("held-out", held_out),
                      ("evaluation", evaluation)]:
        assert torch.equal(got, want), name


def test_a_tokenizer_without_bos(tmp_path):
    tok = byte_tokenizer()
    assert not adds_bos_by_default(tok) and bos_id(tok, "auto") is None and bos_id(tok, "false") is None
    with pytest.raises(ValueError, match="data.add_bos = true, but the tokenizer .* has no BOS token"):
        bos_id(tok, "true")
    with pytest.raises(ValueError, match="--add-bos = true"):
        calibration_tokens(tok, "x" * 100, 2, 16, "true")
    with pytest.raises(ValueError, match="data.add_bos = 'maybe' is not allowed"):
        bos_id(tok, "maybe")


def test_the_policy_is_part_of_the_cache_identity(tmp_path):
    tok = char_tokenizer(bos=True)
    path = tmp_path / "text.txt"
    path.write_text("the quick brown fox jumps over the lazy dog " * 10)
    cache = tmp_path / "cache"
    with_bos = build_samples(tok, str(path), seqlen=SEQLEN, num_samples=None, cache_dir=cache, add_bos="auto")
    without = build_samples(tok, str(path), seqlen=SEQLEN, num_samples=None, cache_dir=cache, add_bos="false")
    assert with_bos.source_fingerprint != without.source_fingerprint
    assert len(list(cache.glob("samples-*.safetensors"))) == 2
    assert (with_bos.tokens[:, 0] == tok.bos_token_id).all() and not (without.tokens[:, 0] == tok.bos_token_id).any()
    again = build_samples(tok, str(path), seqlen=SEQLEN, num_samples=None, cache_dir=cache, add_bos="true")
    assert again.source_fingerprint == with_bos.source_fingerprint  # auto resolved to BOS: the same windows, one file
    assert torch.equal(again.tokens, with_bos.tokens)


def test_config_add_bos_and_run_relative_cache(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("data:\n  add_bos: false\n")  # YAML reads false as a boolean
    assert load_config(config).data.add_bos == "false"
    assert load_config(None, ["--data.add_bos=true"]).data.add_bos == "true"
    assert load_config(None).data.add_bos == "auto" and load_config(None).data.cache_dir == ""
    with pytest.raises(ValueError, match="data.add_bos = 'maybe' is not allowed"):
        load_config(None, ["--data.add_bos=maybe"])
