"""Build a prior mask artifact: open the base, pick targets, run one registered method, write the artifact.

This is the one orchestration behind ``maskpro-prior``; the methods live in their own files and are
found through ``registry.PRIOR_METHODS``. The artifact (maskpro_ds.formats.mask_artifact) is
validated strict N:M before it is written and carries the base model's fingerprint, so training and
evaluation refuse a base it was not made from.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import torch

from maskpro_ds.data.texts import join_texts, load_texts
from maskpro_ds.data.windows import bos_id
from maskpro_ds.formats.dtypes import parse_dtype
from maskpro_ds.formats.hashing import model_fingerprint
from maskpro_ds.formats.mask_artifact import write_mask_artifact
from maskpro_ds.masks.nm import parse_pattern
from maskpro_ds.models.lazy import open_causal_lm
from maskpro_ds.models.targets import select_targets
from maskpro_ds.priors.base import PriorInputs, PriorSpec
from maskpro_ds.priors.calibration import calibration_tokens
from maskpro_ds.priors.registry import METHODS, PRIOR_METHODS

log = logging.getLogger(__name__)


def _calibration(spec: PriorSpec, tokenizer) -> tuple[torch.Tensor, dict]:
    if not spec.calib:
        raise ValueError(f"--method {spec.method} needs --calib (a text/json/parquet file or a dataset name)")
    # A .txt file is read whole, so the joined text is the file byte for byte.
    text = join_texts(load_texts(spec.calib, split=spec.calib_split, text_field=spec.text_field, split_txt=False))
    tokens = calibration_tokens(tokenizer, text, spec.nsamples, spec.seqlen, spec.add_bos)
    bos = bos_id(tokenizer, spec.add_bos, "--add-bos")
    info = {
        "source": str(spec.calib),
        "sha256": hashlib.sha256(text.encode()).hexdigest(),
        "nsamples": spec.nsamples,
        "seqlen": spec.seqlen,
        "tokens": int(tokens.numel()),
        "windows": "evenly spaced, non-overlapping, " + ("BOS first" if bos is not None else "no special tokens"),
        "add_bos": spec.add_bos,
        "bos": bos,
    }
    return tokens, info


def compute_prior(spec: PriorSpec) -> tuple[dict[str, torch.Tensor], dict]:
    """Run the method of ``spec``; returns (masks name -> bool [out, in], meta for the artifact)."""
    if spec.method not in PRIOR_METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}; got {spec.method!r}")
    method = PRIOR_METHODS[spec.method]()
    options = spec.options if spec.options is not None else method.Options()
    if not isinstance(options, method.Options):
        raise ValueError(f"--method {spec.method} takes {method.Options.__name__}, got {type(options).__name__}")
    if spec.load not in ("lazy", "eager"):
        raise ValueError(f"--load must be lazy or eager; got {spec.load!r}")
    n, m = parse_pattern(spec.pattern)
    dtype = parse_dtype(spec.dtype)
    t0 = time.perf_counter()
    handle = open_causal_lm(spec.model, dtype=dtype, lazy=spec.load == "lazy", device=spec.device)
    targets = [t.name for t in select_targets(handle.model, m, include=spec.include, exclude=spec.exclude)]
    meta: dict = {"method": spec.method, "dtype": spec.dtype, "load": spec.load, "calib": None}
    t_method = time.perf_counter()
    try:
        tokens = None
        if method.needs_calibration:
            from transformers import AutoTokenizer

            tokens, meta["calib"] = _calibration(spec, AutoTokenizer.from_pretrained(spec.model))
        masks, extra = method.masks(PriorInputs(handle, targets, n, m, tokens, spec.batch_size), options)
        meta.update(extra)
    finally:
        handle.close()
    meta["method_time_s"] = round(time.perf_counter() - t_method, 3)  # the method alone (incl. calibration)
    meta["time_s"] = round(time.perf_counter() - t0, 3)  # including opening the model
    meta["num_layers"] = len(masks)
    return masks, meta


def make_prior(spec: PriorSpec) -> Path:
    """Compute the prior and write the artifact to ``spec.out``; returns the artifact path."""
    out = Path(spec.out)
    if out.exists() and not spec.force:  # fail before minutes of work, not after
        raise FileExistsError(f"--out {out} already exists; pass --force to overwrite it")
    n, m = parse_pattern(spec.pattern)
    masks, meta = compute_prior(spec)
    if int(os.environ.get("RANK", "0")) != 0:  # a multi-rank swap run: every rank holds the masks, rank 0 writes
        return out
    fingerprint = model_fingerprint(spec.model)
    return write_mask_artifact(out, masks, n, m, fingerprint, meta=meta, force=spec.force)
