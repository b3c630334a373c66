"""Load evaluation or calibration text: a plain text file, or a dataset through ``datasets``.

A ``.txt`` file is read whole (one document). A ``.json``/``.jsonl``/``.parquet``/``.csv`` file, or
an HF dataset name (``wikitext`` with ``--dataset-config wikitext-2-raw-v1``, ``allenai/c4``...),
goes through ``datasets.load_dataset``: local files with the builder named by their suffix, names
from the hub when online. Both return a list of documents; callers join them with ``"\\n\\n"``.
"""

from __future__ import annotations

import os
from pathlib import Path

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_texts(
    source: str | os.PathLike,
    split: str = "train",
    text_field: str = "text",
    dataset_config: str | None = None,
) -> list[str]:
    """Documents of ``source`` (a path or an HF dataset name). Empty documents are kept: joining
    them reproduces the reference protocol on WikiText, whose split has blank lines."""
    path = Path(source)
    if path.is_file() and path.suffix not in _BUILDERS:
        return [path.read_text(encoding="utf-8")]
    import datasets

    if path.is_file():
        ds = datasets.load_dataset(_BUILDERS[path.suffix], data_files=str(path), split="train")
    elif path.suffix in _BUILDERS or path.suffix == ".txt":
        raise FileNotFoundError(f"{source}: no such file")
    else:
        ds = datasets.load_dataset(str(source), dataset_config, split=split)
    if text_field not in ds.column_names:
        raise ValueError(
            f"{source}: no column {text_field!r} (columns: {ds.column_names}); pass --text-field"
        )
    return [str(t) for t in ds[text_field]]


def join_texts(texts: list[str]) -> str:
    """The reference protocol's join (SparseGPT, Wanda, MaskLLM)."""
    return "\n\n".join(texts)
