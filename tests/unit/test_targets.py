"""The target selection rule: the pure matcher, and the one ``select_targets`` that training and the priors call."""

from __future__ import annotations

import logging

import pytest
import torch

from maskpro_ds.config import Config
from maskpro_ds.models.targets import DEFAULT_EXCLUDE, match_targets, select_targets

DEFAULT = r"\.layers\.\d+\."
LAYERS = [
    ("model.layers.0.self_attn.q_proj", (64, 64)),
    ("model.layers.0.mlp.down_proj", (64, 132)),  # 132 = 4 * 33: divisible by 4, not by 8
    ("model.layers.1.mlp.up_proj", (132, 64)),
    ("model.embed_proj", (64, 64)),  # outside the blocks
    ("lm_head", (128, 64)),
]


def test_default_rule_takes_block_linears_and_splits_off_indivisible_ones():
    assert match_targets(LAYERS, 4, DEFAULT, (), ("lm_head",)) == (
        ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.up_proj"],
        [],
    )
    assert match_targets(LAYERS, 8, DEFAULT, (), ("lm_head",)) == (
        ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"],
        ["model.layers.0.mlp.down_proj"],
    )


def test_include_and_exclude():
    assert match_targets(LAYERS, 4, DEFAULT, ["mlp"], ())[0] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.up_proj"]
    assert match_targets(LAYERS, 4, DEFAULT, ["mlp"], ["up_proj"])[0] == ["model.layers.0.mlp.down_proj"]
    assert match_targets(LAYERS, 4, ".", (), ())[0] == [name for name, _ in LAYERS]
    assert match_targets(LAYERS, 4, DEFAULT, ["nothing"], ()) == ([], [])


def test_targets_match_with_and_without_a_leading_dot():
    layers = [("layers.0.q_proj", (8, 8)), ("model.layers.1.q_proj", (8, 8))]
    assert match_targets(layers, 4, DEFAULT)[0] == ["layers.0.q_proj", "model.layers.1.q_proj"]  # top-level blocks
    assert match_targets(layers, 4, r"^model\.layers")[0] == ["model.layers.1.q_proj"]  # anchored patterns


def _tiny_llama(intermediate: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=intermediate, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, tie_word_embeddings=False)
    with torch.device("meta"):
        return LlamaForCausalLM(cfg)


@pytest.mark.parametrize(("pattern", "include", "expected"), [("2:4", [], 14), ("4:8", [], 12), ("2:4", ["mlp"], 6)])
def test_config_defaults_and_prior_cli_defaults_select_the_same_layers(pattern, include, expected, caplog):
    model = _tiny_llama(intermediate=68)  # down_proj in=68: divisible by 4, not by 8
    cfg = Config()
    cfg.mask.pattern = pattern
    cfg.model.include = include
    with caplog.at_level(logging.WARNING):
        trained = select_targets(model, cfg.mask.m, cfg.model.targets, cfg.model.include, cfg.model.exclude)
    assert len(trained) == expected
    # the prior tool's defaults (no --exclude given) are the config's defaults
    assert [t.name for t in trained] == [t.name for t in select_targets(model, cfg.mask.m, include=include)]
    assert list(DEFAULT_EXCLUDE) == cfg.model.exclude
    assert all(t.shape == tuple(model.get_submodule(t.name).weight.shape) for t in trained)
    if pattern == "4:8":
        assert "down_proj" in caplog.text  # skipped with a warning


def test_no_match_and_explicit_indivisible_layers_are_errors():
    model = _tiny_llama(intermediate=68)
    with pytest.raises(ValueError, match="no nn.Linear.*divisible by"):
        select_targets(model, 4, include=["nothing_matches"])
    with pytest.raises(ValueError, match="down_proj.*not divisible by M=8"):
        select_targets(model, 8, include=["down_proj"])
