"""Training data: load texts, cut them into fixed token samples with stable ids, schedule rank batches.

The data set of a MaskPro run is small and fixed (hundreds of windows of a few hundred tokens), so
it is tokenised once, cut into ``num_samples`` windows and cached. Three properties matter:

* **Stable sample ids.** Sample ``i`` is the ``i``-th non-overlapping ``seqlen`` window of the
  tokenised text, for a given (source, tokenizer, seqlen, text_field, max_documents). The
  per-sample baseline loss f(m0, ξ) is keyed by this id (:mod:`maskpro_ds.baseline_cache`), so it
  never depends on the step, the batch size or the world size.
* **Same protocol as evaluation.** Documents are joined with ``"\\n\\n"`` and tokenised in one call
  without special tokens, then cut into windows with the remainder dropped (the SparseGPT / Wanda
  perplexity protocol, see docs/data.md).
* **Layout-free batches.** :func:`batch_ids` is a pure function of integers, so a resumed run, a
  single-process reference and rank 3 of 4 all agree on which samples a step uses.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from maskpro_ds.artifacts import sha256_file
from maskpro_ds.atomic import atomic_write_bytes

log = logging.getLogger(__name__)

# File kinds a local source may hold, and the `datasets` builder that reads each (.txt is read directly).
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
_SUFFIXES = (".txt", *_BUILDERS)
# Bump when the cut or the cache layout changes, so old cache files are never reused.
_SAMPLES_FORMAT = "maskpro_ds.samples/1"


# --------------------------------------------------------------------------------------------- texts
def _is_local(source: str) -> bool:
    """A source is a local path if it exists, or if it clearly names a file (so a typo is reported as
    a missing file rather than as an unreachable hub data set)."""
    if os.path.exists(source):
        return True
    return source.startswith(("/", ".", "~")) or source.lower().endswith(_SUFFIXES)


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix.lower() not in _SUFFIXES:
            raise ValueError(f"data source {path}: unsupported file type {path.suffix!r}; use one of {_SUFFIXES}")
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in _SUFFIXES)
    if not files:
        raise FileNotFoundError(f"data source {path}: directory holds no {', '.join(_SUFFIXES)} files")
    return files


def _read_txt(path: Path, split_txt: bool) -> list[str]:
    """A .txt file is a sequence of documents separated by blank lines ("\\n\\n"), in file order.

    Each document keeps its inner single newlines; runs of extra blank lines are dropped. So for a
    file laid out as documents joined by "\\n\\n", ``"\\n\\n".join(docs)`` gives the file back.
    With ``split_txt=False`` the file is one document, read whole (blank-line runs kept).
    """
    text = path.read_text(encoding="utf-8")  # text mode turns \r\n into \n
    if not split_txt:
        return [text]
    docs = (d.strip("\n") for d in text.split("\n\n"))
    return [d for d in docs if d.strip()]


def _column(ds, text_field: str, where: str) -> list[str]:
    if text_field not in ds.column_names:
        raise ValueError(
            f"data source {where}: no text field {text_field!r}; available columns: {ds.column_names}. "
            "Set data.text_field (--text-field) to one of them."
        )
    return [t if t is not None else "" for t in ds[text_field]]


def load_texts(
    source: str | os.PathLike,
    *,
    split: str = "train",
    text_field: str = "text",
    max_documents: int | None = None,
    datasets_cache_dir: str | Path | None = None,
    config: str | None = None,
    split_txt: bool = True,
) -> list[str]:
    """Return the documents of ``source`` in order (the first ``max_documents`` when given).

    ``source`` is a local ``.txt`` (documents separated by blank lines; one document read whole
    when ``split_txt`` is False, as evaluation and calibration read it), ``.json``/``.jsonl``,
    ``.parquet``/``.csv`` file, a directory of such files (read in sorted name order), or a hub data
    set ``name[:config]`` loaded with ``datasets.load_dataset(name, config, split=split)``
    (``config`` given apart overrides one in the name). ``split`` only applies to hub data sets: a
    local file is one split. ``datasets_cache_dir`` is where ``datasets`` keeps its Arrow copies (its
    default cache when None). Empty documents of a data set are kept (WikiText's blank lines).
    """
    source = os.fspath(source)
    if max_documents is not None and max_documents <= 0:
        raise ValueError(f"data.max_documents must be positive or unset, got {max_documents}")
    import datasets  # deferred: importing datasets costs ~1 s, and only this function needs it

    cache = str(datasets_cache_dir) if datasets_cache_dir is not None else None
    texts: list[str] = []
    if _is_local(source):
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"data source {source}: no such file or directory (check data.source)")
        for f in _local_files(path):
            if f.suffix.lower() == ".txt":
                texts.extend(_read_txt(f, split_txt))
            else:
                ds = datasets.load_dataset(
                    _BUILDERS[f.suffix.lower()], data_files=str(f), split="train", cache_dir=cache
                )
                texts.extend(_column(ds, text_field, str(f)))
            if max_documents is not None and len(texts) >= max_documents:
                break
    else:
        name, _, inline_config = source.partition(":")
        config = config or inline_config
        try:
            ds = datasets.load_dataset(name, config or None, split=split, cache_dir=cache)
        except (ConnectionError, FileNotFoundError, ValueError) as e:
            raise RuntimeError(
                f"data source {source!r} (split {split!r}): not a local file and could not be loaded from "
                f"the hub ({e}). Give a path to a {'/'.join(_SUFFIXES)} file or directory, or go online."
            ) from e
        texts = _column(ds, text_field, f"{source} (split {split})")
    return texts[:max_documents] if max_documents is not None else texts


# ------------------------------------------------------------------------------------------- samples
@dataclass
class TokenSamples:
    """The fixed training samples of a run: row ``i`` of ``tokens`` is sample id ``ids[i]`` (= i)."""

    tokens: torch.Tensor  # int64 [S, seqlen]
    ids: torch.Tensor  # int64 [S], 0..S-1 in cut order
    source_fingerprint: str  # sha256 hex of everything that decides the tokens (not S: ids are prefix-stable)

    def __len__(self) -> int:
        return self.tokens.shape[0]


def source_identity(source: str, split: str = "train") -> str:
    """What identifies the text of ``source``: file contents for local data, name and split for the hub."""
    if _is_local(source):
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"data source {source}: no such file or directory (check data.source)")
        # Names relative to the source, so copying the data elsewhere keeps the cache valid.
        parts = [f"{f.relative_to(path) if f != path else f.name}:{sha256_file(f)}" for f in _local_files(path)]
        return "local:" + ";".join(parts)
    return f"hub:{source}:{split}"


def tokenizer_identity(tokenizer) -> str:
    """Class plus a hash of the tokenizer's full definition (vocabulary, merges, normaliser), or of its
    vocabulary for slow tokenizers; falls back to ``name_or_path`` when neither is available."""
    cls = f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}"
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        body = backend.to_str()
    elif hasattr(tokenizer, "get_vocab"):
        body = json.dumps(sorted(tokenizer.get_vocab().items()))
    else:
        body = str(getattr(tokenizer, "name_or_path", ""))
    return f"{cls}:{hashlib.sha256(body.encode()).hexdigest()}"


def samples_fingerprint(
    tokenizer, source: str, *, seqlen: int, split: str, text_field: str, max_documents: int | None
) -> str:
    """sha256 of (source content or hub name+split, tokenizer, seqlen, text_field, max_documents)."""
    key = {
        "format": _SAMPLES_FORMAT,
        "source": source_identity(source, split),
        "tokenizer": tokenizer_identity(tokenizer),
        "seqlen": seqlen,
        "text_field": text_field,
        "max_documents": max_documents,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _read_cached_windows(path: Path, fingerprint: str, seqlen: int) -> torch.Tensor | None:
    """The cached windows, or None (with a warning) when the file is unreadable or not ours."""
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            windows = f.get_tensor("windows")
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        log.warning("sample cache %s is unreadable (%s); rebuilding it", path, e)
        return None
    if meta.get("fingerprint") != fingerprint or windows.dim() != 2 or windows.shape[1] != seqlen:
        log.warning("sample cache %s does not match this data/tokenizer/seqlen; rebuilding it", path)
        return None
    return windows.long()


def _tokenize_windows(tokenizer, texts: list[str], seqlen: int) -> torch.Tensor:
    # One call on the joined text, as the perplexity protocol does; verbose=False silences the
    # "longer than model_max_length" warning, which does not apply to a text cut into windows.
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False, verbose=False)["input_ids"]
    n = len(ids) // seqlen
    return torch.tensor(ids[: n * seqlen], dtype=torch.long).reshape(n, seqlen)


def build_samples(
    tokenizer,
    source: str,
    *,
    seqlen: int,
    num_samples: int | None,
    cache_dir: str | Path | None,
    split: str = "train",
    text_field: str = "text",
    max_documents: int | None = None,
    datasets_cache_dir: str | Path | None = None,
) -> TokenSamples:
    """Tokenise ``source`` once, cut it into ``seqlen`` windows and keep the first ``num_samples``.

    All windows are cached in ``<cache_dir>/samples-<fingerprint[:16]>.safetensors`` (no caching
    when ``cache_dir`` is None); a hit skips reading the texts and the tokenizer. ``num_samples=None``
    keeps every window.
    """
    if seqlen <= 0:
        raise ValueError(f"data.seqlen must be positive, got {seqlen}")
    if num_samples is not None and num_samples <= 0:
        raise ValueError(f"data.num_samples must be positive or unset, got {num_samples}")
    fp = samples_fingerprint(
        tokenizer, source, seqlen=seqlen, split=split, text_field=text_field, max_documents=max_documents
    )
    path = Path(cache_dir) / f"samples-{fp[:16]}.safetensors" if cache_dir is not None else None
    windows = _read_cached_windows(path, fp, seqlen) if path is not None and path.exists() else None
    if windows is None:
        texts = load_texts(
            source,
            split=split,
            text_field=text_field,
            max_documents=max_documents,
            datasets_cache_dir=datasets_cache_dir,
        )
        windows = _tokenize_windows(tokenizer, texts, seqlen)
        if path is not None:
            meta = {"fingerprint": fp, "format": _SAMPLES_FORMAT, "source": source, "seqlen": str(seqlen)}
            atomic_write_bytes(path, save({"windows": windows.contiguous()}, metadata=meta))
    available = windows.shape[0]
    if num_samples is not None and num_samples > available:
        raise ValueError(
            f"data source {source}: only {available} windows of {seqlen} tokens are available, but "
            f"data.num_samples = {num_samples}. Lower data.num_samples or data.seqlen, raise or unset "
            "data.max_documents, or add more text."
        )
    if available == 0:
        raise ValueError(f"data source {source}: the text is shorter than one window of data.seqlen = {seqlen} tokens")
    keep = available if num_samples is None else num_samples
    tokens = windows[:keep].clone()
    return TokenSamples(tokens=tokens, ids=torch.arange(keep, dtype=torch.long), source_fingerprint=fp)


# ------------------------------------------------------------------------------------------- batches
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def epoch_seed(seed: int, epoch: int) -> int:
    """The generator seed of ``epoch``'s permutation: a 63-bit hash of (seed, epoch), no collisions
    between nearby pairs the way ``seed * K + epoch`` would have."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (epoch & _MASK64)) >> 1


@functools.lru_cache(maxsize=8)
def epoch_permutation(seed: int, epoch: int, num_samples: int) -> torch.Tensor:
    """The sample order of one epoch (cached: a step touches one or two epochs). Do not modify it."""
    gen = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    return torch.randperm(num_samples, generator=gen)


def batch_ids(seed: int, step: int, rank: int, world_size: int, batch_size: int, num_samples: int) -> torch.Tensor:
    """Sample ids of ``rank``'s batch at ``step``: a pure function of these integers.

    Global position ``p = (step * world_size + rank) * batch_size + j``; epoch ``e = p // S``;
    sample ``perm_e[p % S]`` with ``perm_e`` a seeded ``torch.randperm(S)``. Every epoch visits each
    sample once; ranks of one step read adjacent positions, so they never share a sample when
    ``world_size * batch_size <= S`` and that product divides S. A different world size or batch size
    maps steps to other positions, but sample ids (and the baseline cache keyed by them) stay valid.
    """
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    if batch_size <= 0 or num_samples <= 0 or step < 0:
        raise ValueError(
            f"batch_ids needs step >= 0, batch_size > 0, num_samples > 0 (got {step}, {batch_size}, {num_samples})"
        )
    pos = (step * world_size + rank) * batch_size + torch.arange(batch_size, dtype=torch.long)
    epochs = pos // num_samples
    out = torch.empty(batch_size, dtype=torch.long)
    for e in torch.unique(epochs).tolist():
        sel = epochs == e
        out[sel] = epoch_permutation(seed, e, num_samples)[pos[sel] % num_samples]
    return out


@dataclass(frozen=True)
class BatchSchedule:
    """:func:`batch_ids` with the run's fixed integers bound: ``schedule.ids(step, rank)``."""

    seed: int
    world_size: int
    batch_size: int
    num_samples: int

    def ids(self, step: int, rank: int) -> torch.Tensor:
        return batch_ids(self.seed, step, rank, self.world_size, self.batch_size, self.num_samples)

    def steps_per_epoch(self) -> float:
        return self.num_samples / (self.world_size * self.batch_size)
