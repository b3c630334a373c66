"""Training data: text sources, stable token samples and their cache, rank batches, baseline cache.

The tokenizer is a real byte-level BPE built offline with no merges and ids chosen so that token id
== UTF-8 byte value; so the expected tokens of any text are ``list(text.encode())``, an independent
reference computed without the tokenizer.
"""

import json
import logging

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from maskpro_ds.data.samples import build_samples
from maskpro_ds.data.schedule import BatchSchedule, batch_ids
from maskpro_ds.data.texts import load_texts
from maskpro_ds.train.baseline_cache import BaselineCache, baseline_fingerprint

DOCS = [
    "The first article talks about sparsity.\nIt has two lines.",
    "Second article: N:M masks keep N of every M weights.",
    "Third one, with ünïcödé and digits 0123456789.",
    "A fourth, short.",
    "Fifth article closes the set; it is long enough to fill a few windows of sixteen bytes.",
]
JOINED = "\n\n".join(DOCS)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what the ByteLevel pre-tokenizer emits)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}  # token id == byte value
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


class CountingTokenizer:
    """Wraps the real tokenizer and counts encode calls (to see cache hits)."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = 0
        self.backend_tokenizer = inner.backend_tokenizer

    def __call__(self, text, **kwargs):
        self.calls += 1
        return self.inner(text, **kwargs)


def reference_windows(text: str, seqlen: int) -> torch.Tensor:
    ids = list(text.encode("utf-8"))
    n = len(ids) // seqlen
    return torch.tensor(ids[: n * seqlen]).reshape(n, seqlen)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def sources(tmp_path):
    """The same five documents as .txt, .jsonl, .json, .parquet and .csv."""
    txt = tmp_path / "docs.txt"
    txt.write_text("\n\n".join(DOCS) + "\n", encoding="utf-8")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)), encoding="utf-8")
    js = tmp_path / "docs.json"
    js.write_text(json.dumps([{"text": d} for d in DOCS]), encoding="utf-8")
    parquet = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": DOCS, "n": list(range(len(DOCS)))}), parquet)
    csv = tmp_path / "docs.csv"
    pa_csv.write_csv(pa.table({"text": DOCS}), csv)
    return {"txt": txt, "jsonl": jsonl, "json": js, "parquet": parquet, "csv": csv}


# ----------------------------------------------------------------------------------------- texts
def test_tokenizer_maps_bytes_to_ids(tokenizer):
    text = "ab\n\nü"
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == list(text.encode())


def test_txt_documents_are_separated_by_blank_lines(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("first\nline two\n\nsecond\n\n\n\nthird\n", encoding="utf-8")
    assert load_texts(str(f)) == ["first\nline two", "second", "third"]
    assert load_texts(str(f), max_documents=2) == ["first\nline two", "second"]


@pytest.mark.parametrize("kind", ["txt", "jsonl", "json", "parquet", "csv"])
def test_every_file_kind_gives_the_same_documents(sources, kind, tmp_path):
    assert load_texts(str(sources[kind]), datasets_cache_dir=tmp_path / "hf") == DOCS


def test_txt_read_whole_keeps_the_file_exactly(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("first\n\n\n\nsecond\n", encoding="utf-8")
    assert load_texts(f, split_txt=False) == ["first\n\n\n\nsecond\n"]


def test_directory_reads_files_in_name_order(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "b.txt").write_text("two\n\nthree", encoding="utf-8")
    (d / "a.jsonl").write_text(json.dumps({"text": "one"}) + "\n", encoding="utf-8")
    (d / "notes.md").write_text("ignored", encoding="utf-8")
    assert load_texts(str(d), datasets_cache_dir=tmp_path / "hf") == ["one", "two", "three"]


def test_missing_file_names_the_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_texts(str(tmp_path / "nope.jsonl"))


def test_unreachable_hub_dataset_says_what_to_do(tmp_path):
    # conftest sets HF_DATASETS_OFFLINE=1, so a hub name can never be fetched here.
    with pytest.raises(RuntimeError, match=r"'wikitext:wikitext-2-raw-v1' \(split 'test'\).*local file"):
        load_texts("wikitext:wikitext-2-raw-v1", split="test", datasets_cache_dir=tmp_path / "hf")


def test_missing_text_field_lists_the_columns(sources, tmp_path):
    with pytest.raises(ValueError, match=r"'content'.*\['text', 'id'\]"):
        load_texts(str(sources["jsonl"]), text_field="content", datasets_cache_dir=tmp_path / "hf")
    with pytest.raises(ValueError, match=r"'body'.*\['text', 'n'\]"):
        load_texts(str(sources["parquet"]), text_field="body", datasets_cache_dir=tmp_path / "hf")


# --------------------------------------------------------------------------------------- samples
@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_samples_are_the_windows_of_the_joined_text(tokenizer, sources, kind, tmp_path):
    s = build_samples(
        tokenizer, str(sources[kind]), seqlen=16, num_samples=None, cache_dir=None, datasets_cache_dir=tmp_path / "hf"
    )
    ref = reference_windows(JOINED, 16)
    assert ref.shape[0] == len(JOINED.encode()) // 16 >= 10
    assert s.tokens.dtype == torch.long
    assert torch.equal(s.tokens, ref)
    assert torch.equal(s.ids, torch.arange(ref.shape[0]))


def test_file_kind_does_not_change_the_tokens(tokenizer, sources, tmp_path):
    built = {
        k: build_samples(tokenizer, str(p), seqlen=8, num_samples=20, cache_dir=None, datasets_cache_dir=tmp_path / "hf")
        for k, p in sources.items()
    }
    for k in ("jsonl", "json", "parquet"):
        assert torch.equal(built[k].tokens, built["txt"].tokens), k


def test_num_samples_keeps_a_prefix_and_ids_are_stable(tokenizer, sources, tmp_path):
    all_ = build_samples(tokenizer, str(sources["txt"]), seqlen=16, num_samples=None, cache_dir=tmp_path / "c")
    few = build_samples(tokenizer, str(sources["txt"]), seqlen=16, num_samples=4, cache_dir=tmp_path / "c")
    again = build_samples(tokenizer, str(sources["txt"]), seqlen=16, num_samples=4, cache_dir=tmp_path / "c")
    assert torch.equal(few.tokens, all_.tokens[:4])
    assert torch.equal(few.ids, torch.tensor([0, 1, 2, 3]))
    assert torch.equal(again.tokens, few.tokens)
    assert few.source_fingerprint == all_.source_fingerprint == again.source_fingerprint


def test_max_documents_limits_the_text(tokenizer, sources):
    s = build_samples(tokenizer, str(sources["txt"]), seqlen=8, num_samples=None, cache_dir=None, max_documents=2)
    assert torch.equal(s.tokens, reference_windows("\n\n".join(DOCS[:2]), 8))


def test_cache_hit_skips_the_tokenizer(tokenizer, sources, tmp_path):
    counting = CountingTokenizer(tokenizer)
    first = build_samples(counting, str(sources["txt"]), seqlen=16, num_samples=5, cache_dir=tmp_path / "c")
    assert counting.calls == 1
    assert len(list((tmp_path / "c").glob("samples-*.safetensors"))) == 1
    second = build_samples(counting, str(sources["txt"]), seqlen=16, num_samples=5, cache_dir=tmp_path / "c")
    assert counting.calls == 1
    assert torch.equal(first.tokens, second.tokens)
    # Another seqlen is another cache entry, tokenised again.
    build_samples(counting, str(sources["txt"]), seqlen=8, num_samples=5, cache_dir=tmp_path / "c")
    assert counting.calls == 2
    assert len(list((tmp_path / "c").glob("samples-*.safetensors"))) == 2
    assert not list((tmp_path / "c").glob(".tmp-*"))


def test_changed_source_changes_the_fingerprint(tokenizer, sources, tmp_path):
    a = build_samples(tokenizer, str(sources["txt"]), seqlen=16, num_samples=2, cache_dir=tmp_path / "c")
    sources["txt"].write_text("Completely different words, enough for two windows of sixteen.\n", encoding="utf-8")
    b = build_samples(tokenizer, str(sources["txt"]), seqlen=16, num_samples=2, cache_dir=tmp_path / "c")
    assert a.source_fingerprint != b.source_fingerprint
    new_text = "Completely different words, enough for two windows of sixteen."
    assert torch.equal(b.tokens, reference_windows(new_text, 16)[:2])


def test_corrupt_cache_is_rebuilt_with_a_warning(tokenizer, sources, tmp_path, caplog):
    counting = CountingTokenizer(tokenizer)
    good = build_samples(counting, str(sources["txt"]), seqlen=16, num_samples=5, cache_dir=tmp_path / "c")
    (path,) = (tmp_path / "c").glob("samples-*.safetensors")
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with caplog.at_level(logging.WARNING, logger="maskpro_ds.data"):
        rebuilt = build_samples(counting, str(sources["txt"]), seqlen=16, num_samples=5, cache_dir=tmp_path / "c")
    assert "rebuilding" in caplog.text
    assert counting.calls == 2
    assert torch.equal(rebuilt.tokens, good.tokens)
    build_samples(counting, str(sources["txt"]), seqlen=16, num_samples=5, cache_dir=tmp_path / "c")
    assert counting.calls == 2  # the rewritten cache is valid again


def test_too_few_windows_says_how_many_exist(tokenizer, sources):
    n = len(JOINED.encode()) // 16
    with pytest.raises(ValueError, match=rf"only {n} windows.*data.num_samples = 1000.*data.seqlen"):
        build_samples(tokenizer, str(sources["txt"]), seqlen=16, num_samples=1000, cache_dir=None)


# --------------------------------------------------------------------------------------- batches
def test_batch_ids_is_a_pure_function():
    a = [batch_ids(7, step, 1, 2, 3, 24) for step in range(10)]
    b = [batch_ids(7, step, 1, 2, 3, 24) for step in reversed(range(10))][::-1]
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(batch_ids(7, 0, 0, 1, 24, 24), batch_ids(8, 0, 0, 1, 24, 24))


def test_each_epoch_visits_every_sample_once_and_ranks_are_disjoint():
    S, W, B = 24, 2, 3
    steps_per_epoch = S // (W * B)
    seen_epochs = []
    for epoch in range(3):
        ids = []
        for step in range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch):
            per_rank = [batch_ids(5, step, r, W, B, S) for r in range(W)]
            assert not set(per_rank[0].tolist()) & set(per_rank[1].tolist())
            ids += torch.cat(per_rank).tolist()
        assert sorted(ids) == list(range(S))
        seen_epochs.append(ids)
    assert seen_epochs[0] != seen_epochs[1]  # a fresh permutation per epoch


def test_ranks_split_the_single_process_stream():
    # Rank r of W with batch B reads the same positions as one process with batch W*B.
    for step in range(6):
        whole = batch_ids(3, step, 0, 1, 12, 20)
        for r in range(4):
            assert torch.equal(batch_ids(3, step, r, 4, 3, 20), whole[3 * r : 3 * r + 3])


def test_a_batch_may_straddle_two_epochs():
    S, B = 10, 4  # B does not divide S: step 2 reads positions 8..11 = end of epoch 0 + start of epoch 1
    stream = torch.cat([batch_ids(0, step, 0, 1, B, S) for step in range(5)]).tolist()
    assert sorted(stream[:10]) == list(range(S))
    assert sorted(stream[10:]) == list(range(S))
    schedule = BatchSchedule(seed=0, world_size=1, batch_size=B, num_samples=S)
    assert schedule.ids(2, 0).tolist() == stream[8:12]


def test_batch_ids_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rank 2"):
        batch_ids(0, 0, 2, 2, 4, 16)
    with pytest.raises(ValueError, match="batch_size"):
        batch_ids(0, 0, 0, 1, 0, 16)


# ---------------------------------------------------------------------------------- baseline cache
def test_baseline_cache_round_trip(tmp_path):
    fp = baseline_fingerprint("samples", "prior:wanda", "model:abc", "fp32")
    cache = BaselineCache(6, fingerprint=fp)
    assert not cache.complete
    cache.set(torch.tensor([4, 0, 2]), torch.tensor([2.5, 3.25, 1.0], dtype=torch.float32))
    assert cache.missing().tolist() == [1, 3, 5]
    cache.set(torch.tensor([1, 3, 5]), torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64))
    assert cache.complete
    cache.save(tmp_path / "baseline.safetensors")
    back = BaselineCache.load(tmp_path / "baseline.safetensors", fp)
    got = back.get(torch.tensor([5, 4, 0, 0]))
    assert got.dtype == torch.float64
    assert got.tolist() == [0.3, 2.5, 3.25, 3.25]
    assert back.complete and back.num_samples == 6
    grown = BaselineCache.load(tmp_path / "baseline.safetensors", fp, num_samples=8)
    assert grown.missing().tolist() == [6, 7]
    assert grown.get(torch.tensor([1])).tolist() == [0.1]


def test_baseline_cache_missing_ids_are_named():
    cache = BaselineCache(5)
    cache.set(torch.tensor([0, 1]), torch.tensor([1.0, 2.0]))
    with pytest.raises(KeyError, match=r"\[3, 4\].*precompute pass"):
        cache.get(torch.tensor([0, 4, 3]))
    with pytest.raises(IndexError, match="outside 0..4"):
        cache.get(torch.tensor([5]))
    with pytest.raises(ValueError, match="non-finite"):
        cache.set(torch.tensor([2]), torch.tensor([float("nan")]))


def test_stale_baseline_cache_is_rejected(tmp_path):
    old = baseline_fingerprint("samples", "prior:magnitude", "model:abc")
    new = baseline_fingerprint("samples", "prior:wanda", "model:abc")
    assert old != new
    cache = BaselineCache(3, fingerprint=old)
    cache.set(torch.arange(3), torch.ones(3))
    cache.save(tmp_path / "b.safetensors")
    with pytest.raises(ValueError, match="stale"):
        BaselineCache.load(tmp_path / "b.safetensors", new)
    (tmp_path / "junk.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="unreadable"):
        BaselineCache.load(tmp_path / "junk.safetensors", new)
    with pytest.raises(FileNotFoundError, match="precompute"):
        BaselineCache.load(tmp_path / "absent.safetensors", new)
