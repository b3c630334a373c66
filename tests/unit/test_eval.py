"""Evaluation on a tiny random Llama: the perplexity protocol, masks on the fly, zero-shot scoring.

References are independent: a manual window loop with log_softmax/gather, a model whose logits are
all zero (perplexity = vocab size exactly), and per-choice log-prob sums from separate unpadded
forwards.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from maskpro_ds.cli.eval import ppl_main, zeroshot_main
from maskpro_ds.data.texts import join_texts, load_texts
from maskpro_ds.data.windows import bos_id
from maskpro_ds.eval.masked_model import apply_mask_artifact
from maskpro_ds.eval.perplexity import perplexity
from maskpro_ds.eval.zeroshot import (
    MCExample,
    choice_logprobs,
    evaluate_multiple_choice,
    lm_eval_missing,
    load_bigbench_task,
    split_context,
)
from maskpro_ds.formats.hashing import model_fingerprint
from maskpro_ds.formats.mask_artifact import write_mask_artifact
from maskpro_ds.models.dense import load_causal_lm
from tests.unit.char_tokenizer import char_tokenizer

VOCAB = 128


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(root / "model")
    char_tokenizer(bos=True).save_pretrained(root / "model")
    docs = [f"Document {i}: " + "the quick brown fox jumps over the lazy dog " * (1 + i % 3) for i in range(30)]
    (root / "text.txt").write_text(join_texts(docs))
    return root / "model", root / "text.txt", docs


def manual_ppl(model, ids, seqlen, bos):
    """Windows of ``seqlen - 1`` text tokens, each after BOS; mean CE per window, exp of the mean."""
    nlls = []
    body = seqlen - 1
    for start in range(0, ids.numel() - body + 1, body):
        window = torch.cat([torch.tensor([bos]), ids[start : start + body]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=window[None]).logits[0].double(), dim=-1)
        nlls.append(-logp[:-1].gather(1, window[1:, None]).mean())
    return math.exp(torch.stack(nlls).mean()), len(nlls)


def test_perplexity_matches_a_manual_window_loop(tiny):
    model_dir, text_path, _ = tiny
    model, tok = load_causal_lm(model_dir)
    text = text_path.read_text()
    assert tok(text)["input_ids"][0] == tok.bos_token_id  # the tokenizer adds BOS: every window starts with it
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    res = perplexity(model, tok, text, seqlen=64, max_tokens=1000, batch_size=3)
    expected, windows = manual_ppl(model, ids[:1000], 64, tok.bos_token_id)
    assert res.windows == windows == 1000 // 63  # remainder dropped
    assert res.tokens_used == 15 * 64 and res.tokens_total == ids.numel() and res.bos_per_window
    assert res.ppl == pytest.approx(expected, rel=1e-5)
    assert perplexity(model, tok, text, seqlen=64, max_tokens=1000, batch_size=1).ppl == pytest.approx(res.ppl, rel=1e-6)
    plain = perplexity(model, tok, text, seqlen=64, max_tokens=1000, add_bos="false")
    assert not plain.bos_per_window and plain.windows == 1000 // 64 and plain.ppl != res.ppl


def test_perplexity_of_a_uniform_model_is_the_vocab_size(tiny):
    model_dir, text_path, _ = tiny
    model, tok = load_causal_lm(model_dir)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: each token costs log(V)
    res = perplexity(model, tok, text_path.read_text(), seqlen=32)
    assert res.ppl == pytest.approx(VOCAB, rel=1e-6)


def test_load_texts_from_txt_json_and_parquet(tiny, tmp_path):
    _, text_path, docs = tiny
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    pd.DataFrame({"text": docs}).to_parquet(tmp_path / "d.parquet")
    assert load_texts(text_path, split_txt=False) == [text_path.read_text()]
    assert load_texts(tmp_path / "d.jsonl", split_txt=False) == docs
    assert load_texts(tmp_path / "d.parquet", split_txt=False) == docs
    assert join_texts(load_texts(tmp_path / "d.jsonl", split_txt=False)) == text_path.read_text()
    with pytest.raises(ValueError, match="--text-field"):
        load_texts(tmp_path / "d.jsonl", text_field="body", split_txt=False)
    with pytest.raises(FileNotFoundError):
        load_texts(tmp_path / "missing.jsonl", split_txt=False)


def _random_masks(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            r = torch.rand(mod.weight.shape, generator=g).reshape(-1, 4)
            masks[name] = r.argsort(1).argsort(1).lt(2).reshape(mod.weight.shape)
    return masks


def test_apply_mask_artifact_zeroes_exactly_the_pruned_slots(tiny, tmp_path):
    model_dir, _, _ = tiny
    model, _ = load_causal_lm(model_dir)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    masks = _random_masks(model)
    art = write_mask_artifact(tmp_path / "mask", masks, 2, 4, model_fingerprint(model_dir), meta={"method": "test"})
    applied = apply_mask_artifact(model, art, model_dir=model_dir)
    assert applied.layers == 14 and applied.fingerprint_checked and applied.method == "test"
    after = model.state_dict()
    for name, mask in masks.items():
        w = after[name + ".weight"]
        assert torch.equal(w[mask], before[name + ".weight"][mask])
        assert torch.all(w[~mask] == 0) and not torch.signbit(w[~mask]).any()  # +0.0, never -0.0
    assert torch.equal(after["lm_head.weight"], before["lm_head.weight"])

    other = write_mask_artifact(tmp_path / "other", masks, 2, 4, "0" * 64)
    with pytest.raises(ValueError, match="fingerprint"):
        apply_mask_artifact(model, other, model_dir=model_dir)


def test_eval_ppl_cli_with_mask_matches_the_api(tiny, tmp_path):
    model_dir, text_path, _ = tiny
    model, tok = load_causal_lm(model_dir)
    art = write_mask_artifact(tmp_path / "mask", _random_masks(model, 1), 2, 4, model_fingerprint(model_dir))
    apply_mask_artifact(model, art, model_dir=model_dir)
    expected = perplexity(model, tok, text_path.read_text(), seqlen=64).ppl
    out = tmp_path / "ppl.json"
    argv = [str(model_dir), "--data", str(text_path), "--seqlen", "64", "--mask", str(art), "--json-out", str(out)]
    assert ppl_main(argv) == 0
    result = json.loads(out.read_text())
    assert result["ppl"] == pytest.approx(expected, rel=1e-6)
    assert result["mask"]["layers"] == 14 and result["seqlen"] == 64 and result["dtype"] == "float32"
    assert ppl_main([str(model_dir), "--data", str(tmp_path / "nope.txt")]) == 2


def test_split_context_moves_whitespace_to_the_continuation():
    assert split_context("Q: x\nA: ", "yes") == ("Q: x\nA:", " yes")
    assert split_context("Q: x\nA:", "yes") == ("Q: x\nA:", " yes")
    assert split_context("Q: x\nA:", " yes") == ("Q: x\nA:", " yes")


def test_choice_logprobs_match_separate_forwards(tiny):
    model_dir, _, _ = tiny
    model, tok = load_causal_lm(model_dir)
    context, choices = "\nQ: what jumps?\nA: ", ["fox", "the lazy dog", "x"]
    got = choice_logprobs(model, tok, context, choices, bos=bos_id(tok))
    for choice, value in zip(choices, got, strict=True):
        ctx = tok("\nQ: what jumps?\nA:")["input_ids"]
        cont = tok(" " + choice, add_special_tokens=False)["input_ids"]  # char-level: no boundary merges
        ids = torch.tensor(ctx + cont)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids[None]).logits[0].double(), dim=-1)
        expected = sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
        assert value == pytest.approx(expected, rel=1e-5, abs=1e-4)


def test_multiple_choice_forced_answers_with_a_uniform_model(tiny, tmp_path):
    """Uniform logits: a choice of L chars costs (L+1)·log V (leading space), so the shortest choice
    wins acc and, normalised by L characters, the longest wins acc_norm."""
    model_dir, _, _ = tiny
    model, tok = load_causal_lm(model_dir)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    task = {"name": "forced", "examples": [
        {"input": "pick", "target_scores": {"ab": 1, "abcdef": 0, "abcd": 0}},
        {"input": "pick", "target_scores": {"abcdefgh": 0, "a": 1}},
        {"input": "pick", "target_scores": {"abc": 0, "abcdefg": 1}},
    ]}
    (tmp_path / "task.json").write_text(json.dumps(task))
    name, examples = load_bigbench_task(tmp_path / "task.json")
    res = evaluate_multiple_choice(model, tok, examples, name)
    assert (res.acc, res.acc_norm) == pytest.approx((2 / 3, 1 / 3))
    assert res.chance == pytest.approx((1 / 3 + 1 / 2 + 1 / 2) / 3)


def test_bigbench_loader_formats_and_multiple_correct(tmp_path):
    task = {"task_prefix": "T.", "example_input_prefix": "\nIn: ", "example_output_prefix": "\nOut: ",
            "examples": [{"input": "q", "target_scores": {"a": 1, "b": 1, "c": 0}},
                         {"input": "free text", "target": "no scores"}]}
    (tmp_path / "t.json").write_text(json.dumps(task))
    name, examples = load_bigbench_task(tmp_path / "t.json")
    assert name == tmp_path.name and len(examples) == 1
    assert examples[0] == MCExample("T.\nIn: q\nOut: ", ["a", "b", "c"], {0, 1})


def test_zeroshot_cli(tiny, tmp_path):
    model_dir, _, _ = tiny
    task = {"name": "toy", "examples": [{"input": "the quick brown", "target_scores": {"fox": 1, "cat": 0}}]}
    (tmp_path / "task.json").write_text(json.dumps(task))
    out = tmp_path / "zs.json"
    assert zeroshot_main([str(model_dir), "--bigbench", str(tmp_path / "task.json"), "--json-out", str(out)]) == 0
    assert json.loads(out.read_text())["tasks"]["toy"]["examples"] == 1


@pytest.mark.skipif(lm_eval_missing() is None, reason="lm-eval is installed")
def test_lm_eval_missing_is_reported_clearly(tiny, capsys):
    model_dir, _, _ = tiny
    assert zeroshot_main([str(model_dir), "--lm-eval-tasks", "hellaswag"]) == 2
    assert "pip install lm-eval" in capsys.readouterr().err


# lm-eval and the modules it imports at import time that the venv lacks, all pure Python (sacrebleu
# 2.1.0 is the last release that does not import lxml).
LM_EVAL_PINS = ["lm-eval==0.4.13", "sacrebleu==2.1.0", "portalocker==4.4.2", "tabulate==0.10.0", "colorama==0.4.6"]
# (input, choices, index of the correct one). The first 6: with uniform logits the shortest choice wins
# acc and the longest in characters wins acc_norm: acc hits 1, 2, 5, 6; acc_norm hits 3, 4 ("éé" is 4
# UTF-8 bytes, so a per-byte norm would miss 4). The last 5 have choices of equal length, so the random
# model's own preferences decide them (the best and second-best sums differ by 0.05 or more).
LM_EVAL_EXAMPLES = [
    ("pick", ["ab", "abcdef", "abcd"], 0),
    ("pick", ["abcdefgh", "a"], 1),
    ("pick", ["abc", "abcdefg"], 1),
    ("pick", ["éé", "abc"], 1),
    ("the quick brown", ["fox", "zebra"], 0),
    ("jumps over the", ["lazy dog", "cat"], 1),
    ("the quick brown", ["fox", "cat", "dog", "owl"], 3),
    ("over the lazy", ["dog", "cat", "fox"], 0),
    ("Document", ["1", "2", "3", "4", "5"], 2),
    ("the", ["quick", "brown", "jumps"], 0),
    ("2 + 2 =", ["4", "5", "3"], 0),
]


@pytest.mark.slow
def test_lm_eval_local_task_agrees_with_the_bigbench_scorer(tiny, tmp_path):
    """The same examples as a local lm-eval YAML task and as a BIG-bench task.json, both scored by one
    ``tools/eval_zeroshot.py`` run per model: lm-eval's acc/acc_norm equal ours on the tiny random
    model (all 11 examples) and on a uniform-logit copy (--limit 6), where both are forced to 2/3 and
    1/3.

    lm-eval is not a dependency: it is installed with --no-deps into a scratch directory (needs
    PyPI) and run in a subprocess on that path, with the venv's torch/transformers/datasets."""
    import os
    import subprocess
    import sys

    target = tmp_path / "lmeval"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                    *LM_EVAL_PINS], check=True)
    model_dir, _, _ = tiny
    model, tok = load_causal_lm(model_dir)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    model.save_pretrained(tmp_path / "uniform")
    tok.save_pretrained(tmp_path / "uniform")

    data = tmp_path / "forced.jsonl"
    data.write_text("".join(json.dumps({"input": q, "choices": c, "label": i}) + "\n" for q, c, i in LM_EVAL_EXAMPLES))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "forced.yaml").write_text(
        "task: forced\noutput_type: multiple_choice\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        'doc_to_text: "Q: {{input}}\\nA:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    bigbench = {"name": "forced", "example_input_prefix": "Q: ", "examples": [
        {"input": q, "target_scores": {ch: int(j == i) for j, ch in enumerate(c)}} for q, c, i in LM_EVAL_EXAMPLES]}
    (tmp_path / "task.json").write_text(json.dumps(bigbench))

    tool = Path(__file__).resolve().parents[2] / "tools" / "eval_zeroshot.py"
    env = {**os.environ, "PYTHONPATH": str(target), "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    for model_path, limit in ((model_dir, len(LM_EVAL_EXAMPLES)), (tmp_path / "uniform", 6)):
        out = tmp_path / "zs.json"
        subprocess.run([sys.executable, str(tool), str(model_path), "--bigbench", str(tmp_path / "task.json"),
                        "--lm-eval-tasks", "forced", "--lm-eval-include", str(tmp_path / "tasks"),
                        "--limit", str(limit), "--json-out", str(out)], check=True, env=env)
        result = json.loads(out.read_text())
        ours, theirs = result["tasks"]["forced"], result["lm_eval"]["forced"]
        assert ours["examples"] == theirs["sample_len"] == limit
        assert (theirs["acc,none"], theirs["acc_norm,none"]) == pytest.approx((ours["acc"], ours["acc_norm"]))
    assert (ours["acc"], ours["acc_norm"]) == pytest.approx((2 / 3, 1 / 3))
    bad = subprocess.run([sys.executable, str(tool), str(model_dir), "--lm-eval-tasks", "nosuchtask"],
                         env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "nosuchtask" in bad.stderr.splitlines()[-1]
