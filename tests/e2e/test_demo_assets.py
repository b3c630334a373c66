"""The offline demo assets: a real SmolLM2 checkpoint and real Wikipedia text, cached and verified.

The session fixture prepares the shared cache once; the tests that damage files work on a private
copy under tmp_path, seeded with the already-downloaded gensim wheel so a rebuild needs no download.
"""

import json
import os
import shutil
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from maskpro_ds.demo.assets import (
    MANIFEST_NAME,
    TEXT_SPEC,
    DemoAssetError,
    ensure_wiki_text,
    prepare_demo,
    split_articles,
)
from maskpro_ds.formats.hashing import sha256_file


def _manifest(cache):
    return json.loads((cache / MANIFEST_NAME).read_text())


def _cache_of(assets):
    return assets.model_dir.parent


def test_assets_exist_with_expected_sizes(demo_assets):
    model_dir = demo_assets.model_dir
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (model_dir / name).is_file(), name
    # 134.5 M float32 parameters (embedding tied with the head, stored once)
    assert 530e6 < (model_dir / "model.safetensors").stat().st_size < 545e6
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config

    meta = json.loads((demo_assets.calib_text.parent / "meta.json").read_text())
    assert meta["articles"] == {"calib": 85, "heldout": 21}  # 106 articles, every 5th held out
    chars = meta["characters"]
    assert chars["calib"] == len(demo_assets.calib_text.read_text(encoding="utf-8"))
    assert 2.7e6 < chars["calib"] + chars["heldout"] < 3.0e6
    # ~534 K / ~109 K tokens with the SmolLM2 tokenizer
    assert 480_000 < demo_assets.calib_tokens < 580_000
    assert 90_000 < demo_assets.heldout_tokens < 130_000

    manifest = _manifest(_cache_of(demo_assets))
    for rel, want in {**manifest["entries"]["model"]["files"], **manifest["entries"]["wiki"]["files"]}.items():
        assert sha256_file(_cache_of(demo_assets) / rel) == want["sha256"], rel


def test_text_is_clean_prose(demo_assets):
    text = demo_assets.calib_text.read_text(encoding="utf-8") + demo_assets.heldout_text.read_text(encoding="utf-8")
    for markup in ("[[", "]]", "{{", "}}", "{|", "<ref", "</ref>", "&nbsp;", "thumb|"):
        assert markup not in text, markup
    first = split_articles(demo_assets.calib_text.read_text(encoding="utf-8"))[0]
    assert first.startswith("Anarchism is a political philosophy")


def test_model_loads_and_predicts_real_text(demo_assets):
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(demo_assets.model_dir, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    tokenizer = AutoTokenizer.from_pretrained(demo_assets.model_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30
    assert model.config.hidden_size == 576
    assert model.config.intermediate_size == 1536
    assert model.config.vocab_size == 49152
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert load_s < 30  # a plain safetensors dir: ~1.3 s here, versus ~13 s to dequantise the GGUF

    text = demo_assets.calib_text.read_text(encoding="utf-8")[:4000]
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[:, :128]
    assert ids.shape == (1, 128)
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    # 3.21 measured; an untrained model of this vocabulary would give ln(49152) = 10.8
    assert 1.5 < loss < 5.0, loss


def test_split_is_disjoint(demo_assets):
    calib = split_articles(demo_assets.calib_text.read_text(encoding="utf-8"))
    heldout = split_articles(demo_assets.heldout_text.read_text(encoding="utf-8"))
    meta = json.loads((demo_assets.calib_text.parent / "meta.json").read_text())
    assert len(calib) == len(meta["titles"]["calib"]) == 85
    assert len(heldout) == len(meta["titles"]["heldout"]) == 21
    assert not set(meta["titles"]["calib"]) & set(meta["titles"]["heldout"])
    calib_text = "\n".join(calib)
    for article in heldout:
        # the longest paragraph of every held-out article appears nowhere in the calibration text
        line = max(article.splitlines(), key=len)
        assert len(line) > 40 and line not in calib_text, line[:80]


def test_second_call_is_fast_and_changes_nothing(demo_assets):
    cache = _cache_of(demo_assets)
    before = (cache / MANIFEST_NAME).read_bytes()
    stamps = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file() and p.name != ".lock"}
    t0 = time.perf_counter()
    again = prepare_demo(cache)
    elapsed = time.perf_counter() - t0
    assert elapsed < 3.0, elapsed
    assert again == demo_assets
    assert (cache / MANIFEST_NAME).read_bytes() == before
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


@pytest.fixture
def private_wiki(demo_assets, tmp_path):
    """A private copy of the prepared text (files, manifest entry, gensim wheel) to damage freely."""
    shared = _cache_of(demo_assets)
    entry = _manifest(shared)["entries"]["wiki"]
    (tmp_path / "pkgs").mkdir()
    shutil.copy2(shared / "pkgs" / entry["wheel"], tmp_path / "pkgs" / entry["wheel"])
    shutil.copytree(shared / "wiki", tmp_path / "wiki")
    manifest = {"format": _manifest(shared)["format"], "entries": {"wiki": entry}}
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(manifest))
    return tmp_path


def test_intact_copy_is_accepted_without_rebuild(private_wiki):
    stamps = {p: p.stat().st_mtime_ns for p in (private_wiki / "wiki").iterdir()}
    calib, heldout = ensure_wiki_text(private_wiki)
    assert (calib, heldout) == (private_wiki / "wiki" / "calib.txt", private_wiki / "wiki" / "heldout.txt")
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_damaged_text_is_rebuilt_byte_identical(demo_assets, private_wiki):
    calib = private_wiki / "wiki" / "calib.txt"
    heldout_stamp = (private_wiki / "wiki" / "heldout.txt").stat().st_mtime_ns
    recorded = _manifest(private_wiki)["entries"]["wiki"]["files"]["wiki/calib.txt"]["sha256"]
    damaged = bytearray(calib.read_bytes())
    damaged[1000] ^= 0x01  # same size, one bit off: only the hash can notice
    calib.write_bytes(bytes(damaged))

    calib2, heldout2 = ensure_wiki_text(private_wiki)
    assert calib2 == calib
    assert heldout2.stat().st_mtime_ns != heldout_stamp  # rebuilt from the wheel, not patched
    # A fresh parse reproduces the shared cache's files exactly: the split is deterministic.
    assert calib2.read_bytes() == demo_assets.calib_text.read_bytes()
    assert heldout2.read_bytes() == demo_assets.heldout_text.read_bytes()
    assert sha256_file(calib2) == recorded
    assert not list(private_wiki.rglob(".tmp-*"))  # the rebuild left no temp paths behind


def test_failed_download_names_the_package_and_command(tmp_path, monkeypatch):
    # An index that cannot serve anything: no config files, no index, an empty find-links folder.
    empty = tmp_path / "no_wheels"
    empty.mkdir()
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    with pytest.raises(DemoAssetError) as info:
        ensure_wiki_text(tmp_path / "cache")
    message = str(info.value)
    assert "'gensim'" in message
    assert "pip download --no-deps --only-binary=:all:" in message and TEXT_SPEC in message
    assert not (tmp_path / "cache" / "wiki").exists()
