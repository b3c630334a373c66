"""Text sources: read the documents of a local file, a directory, or a hub data set, in order.

One loader serves training, evaluation and the priors. A ``.txt`` file is a sequence of documents
separated by blank lines; evaluation and calibration read it whole instead (``split_txt=False``), so
joining with :func:`join_texts` gives the file back byte for byte. Other local files and hub data sets
are read with the ``datasets`` library.
"""

from __future__ import annotations

import os
from pathlib import Path

# File kinds a local source may hold, and the `datasets` builder that reads each (.txt is read directly).
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
_SUFFIXES = (".txt", *_BUILDERS)


def is_local(source: str) -> bool:
    """A source is a local path if it exists, or if it clearly names a file (so a typo is reported as
    a missing file rather than as an unreachable hub data set)."""
    if os.path.exists(source):
        return True
    return source.startswith(("/", ".", "~")) or source.lower().endswith(_SUFFIXES)


def local_files(path: Path) -> list[Path]:
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
    try:
        text = path.read_text(encoding="utf-8")  # text mode turns \r\n into \n
    except UnicodeDecodeError as e:
        raise ValueError(f"data source {path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                         "a .txt source must be UTF-8 text, documents separated by blank lines. Convert it, or "
                         "use a .json/.jsonl/.parquet/.csv file") from None
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
    if is_local(source):
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"data source {source}: no such file or directory (check data.source)")
        for f in local_files(path):
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


def join_texts(texts: list[str]) -> str:
    """The perplexity protocol's join (SparseGPT, Wanda, MaskLLM): documents separated by a blank line."""
    return "\n\n".join(texts)
