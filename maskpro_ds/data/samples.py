"""Fixed token samples with stable ids: tokenise a source once, cut windows, cache them.

The data set of a MaskPro run is small and fixed (hundreds of windows of a few hundred tokens), so
it is tokenised once, cut into ``num_samples`` windows and cached. Sample ``i`` is the ``i``-th
non-overlapping ``seqlen`` window of the tokenised text, for a given (source, tokenizer, seqlen,
text_field, max_documents, BOS policy); the per-sample baseline loss f(m0, ξ) is keyed by this id
(:mod:`maskpro_ds.train.baseline_cache`), so it never depends on the step, the batch size or the
world size. Documents are joined with ``"\\n\\n"``, tokenised in one call and cut into windows
with the remainder dropped (the SparseGPT / Wanda perplexity protocol), each window starting with
BOS when the tokenisation policy says so (:mod:`maskpro_ds.data.windows`, docs/data.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from maskpro_ds.data.texts import is_local, load_texts, local_files
from maskpro_ds.data.windows import BosPolicy, bos_id, cut_windows, text_ids
from maskpro_ds.formats.atomic import atomic_write_bytes
from maskpro_ds.formats.hashing import sha256_file

log = logging.getLogger(__name__)

# Bump when the cut or the cache layout changes, so old cache files are never reused.
_SAMPLES_FORMAT = "maskpro_ds.samples/2"  # 2: windows may start with BOS


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
    if is_local(source):
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"data source {source}: no such file or directory (check data.source)")
        # Names relative to the source, so copying the data elsewhere keeps the cache valid.
        parts = [f"{f.relative_to(path) if f != path else f.name}:{sha256_file(f)}" for f in local_files(path)]
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
    tokenizer, source: str, *, seqlen: int, split: str, text_field: str, max_documents: int | None,
    bos: int | None = None,
) -> str:
    """sha256 of (source content or hub name+split, tokenizer, seqlen, text_field, max_documents, BOS id)."""
    key = {
        "format": _SAMPLES_FORMAT,
        "source": source_identity(source, split),
        "tokenizer": tokenizer_identity(tokenizer),
        "seqlen": seqlen,
        "text_field": text_field,
        "max_documents": max_documents,
        "bos": bos,  # the resolved policy: None = windows without BOS
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
    add_bos: BosPolicy = "auto",
) -> TokenSamples:
    """Tokenise ``source`` once, cut it into ``seqlen`` windows and keep the first ``num_samples``.

    All windows are cached in ``<cache_dir>/samples-<fingerprint[:16]>.safetensors`` (no caching
    when ``cache_dir`` is None); a hit skips reading the texts and the tokenizer. ``num_samples=None``
    keeps every window. ``add_bos`` is the tokenisation policy (:func:`maskpro_ds.data.windows.bos_id`).
    """
    if seqlen <= 0:
        raise ValueError(f"data.seqlen must be positive, got {seqlen}")
    if num_samples is not None and num_samples <= 0:
        raise ValueError(f"data.num_samples must be positive or unset, got {num_samples}")
    bos = bos_id(tokenizer, add_bos)
    fp = samples_fingerprint(
        tokenizer, source, seqlen=seqlen, split=split, text_field=text_field, max_documents=max_documents, bos=bos
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
        windows = cut_windows(text_ids(tokenizer, "\n\n".join(texts)), seqlen, bos)
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
