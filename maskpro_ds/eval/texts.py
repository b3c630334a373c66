"""Evaluation and calibration text: :func:`maskpro_ds.data.load_texts` with the perplexity protocol.

One loader serves training, evaluation and the priors. The protocol differences live here: a
``.txt`` file is read whole (one document, blank-line runs kept, so the joined text is the file
byte for byte), and a hub data set's config is given apart (``--dataset-config``). Callers join
the documents with :func:`join_texts`.
"""

from __future__ import annotations

import os

from maskpro_ds.data import load_texts as _load_documents


def load_texts(
    source: str | os.PathLike,
    split: str = "train",
    text_field: str = "text",
    dataset_config: str | None = None,
) -> list[str]:
    """Documents of ``source`` (a path or an HF dataset name); empty documents are kept: joining
    them reproduces the reference protocol on WikiText, whose split has blank lines."""
    return _load_documents(source, split=split, text_field=text_field, config=dataset_config, split_txt=False)


def join_texts(texts: list[str]) -> str:
    """The reference protocol's join (SparseGPT, Wanda, MaskLLM)."""
    return "\n\n".join(texts)
