"""Build a prior mask artifact: open the base, pick targets, run one method, write the artifact.

This is the one orchestration of ``tools/make_prior.py``; the methods themselves live in
magnitude.py, wanda.py, sparsegpt.py and from_checkpoint.py. The artifact (maskpro_ds.artifacts)
is validated strict N:M before it is written and carries the base model's fingerprint, so training
and evaluation refuse a base it was not made from.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from maskpro_ds.artifacts import model_fingerprint, write_mask_artifact
from maskpro_ds.masks.nm import parse_pattern
from maskpro_ds.priors.calibration import calibration_tokens
from maskpro_ds.priors.from_checkpoint import masks_from_checkpoint
from maskpro_ds.priors.magnitude import magnitude_masks
from maskpro_ds.priors.model_io import open_causal_lm
from maskpro_ds.priors.sparsegpt import sparsegpt_masks
from maskpro_ds.priors.targets import DEFAULT_EXCLUDE, parse_dtype, select_targets
from maskpro_ds.priors.wanda import wanda_masks

log = logging.getLogger(__name__)

METHODS = ("magnitude", "wanda", "sparsegpt", "from-checkpoint", "swap")


@dataclass
class PriorSpec:
    """Everything that defines a prior; the CLI fills it from its options."""

    model: str
    method: str
    out: str
    pattern: str = "2:4"
    calib: str | None = None
    calib_split: str = "train"
    text_field: str = "text"
    nsamples: int = 32
    seqlen: int = 128
    source: str | None = None
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDE))
    dtype: str = "fp32"
    load: str = "lazy"
    device: str = "cpu"
    batch_size: int = 8
    blocksize: int = 128
    percdamp: float = 0.01
    force: bool = False
    # swap (priors/swap.py): starting mask, sweeps, tolerance, calibration mode, rows per search chunk
    swap_start: str = "wanda"
    swap_sweeps: int = 5
    swap_tol: float = 1e-3
    swap_calib: str = "dense"
    swap_target: str = "own"
    swap_row_chunk: int = 1024


def _calibration(spec: PriorSpec, tokenizer) -> tuple[torch.Tensor, dict]:
    from maskpro_ds.eval.texts import join_texts, load_texts

    if not spec.calib:
        raise ValueError(f"--method {spec.method} needs --calib (a text/json/parquet file or a dataset name)")
    text = join_texts(load_texts(spec.calib, split=spec.calib_split, text_field=spec.text_field))
    tokens = calibration_tokens(tokenizer, text, spec.nsamples, spec.seqlen)
    info = {
        "source": str(spec.calib),
        "sha256": hashlib.sha256(text.encode()).hexdigest(),
        "nsamples": spec.nsamples,
        "seqlen": spec.seqlen,
        "tokens": int(tokens.numel()),
        "windows": "evenly spaced, non-overlapping, no special tokens",
    }
    return tokens, info


def compute_prior(spec: PriorSpec) -> tuple[dict[str, torch.Tensor], dict]:
    """Run the method of ``spec``; returns (masks name -> bool [out, in], meta for the artifact)."""
    if spec.method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}; got {spec.method!r}")
    if spec.load not in ("lazy", "eager"):
        raise ValueError(f"--load must be lazy or eager; got {spec.load!r}")
    n, m = parse_pattern(spec.pattern)
    dtype = parse_dtype(spec.dtype)
    t0 = time.perf_counter()
    handle = open_causal_lm(spec.model, dtype=dtype, lazy=spec.load == "lazy", device=spec.device)
    targets = select_targets(handle.model, m, include=spec.include, exclude=spec.exclude)
    meta: dict = {"method": spec.method, "dtype": spec.dtype, "load": spec.load, "calib": None}
    t_method = time.perf_counter()
    try:
        if spec.method == "magnitude":
            masks = magnitude_masks(handle, targets, n, m)
        elif spec.method == "from-checkpoint":
            if not spec.source:
                raise ValueError("--method from-checkpoint needs --source (the pruned checkpoint directory)")
            shapes = {t: tuple(handle.model.get_submodule(t).weight.shape) for t in targets}
            masks, meta["from_checkpoint"] = masks_from_checkpoint(spec.source, shapes, n, m)
        else:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(spec.model)
            tokens, meta["calib"] = _calibration(spec, tokenizer)
            if spec.method == "wanda":
                masks = wanda_masks(handle, tokens, targets, n, m, batch_size=spec.batch_size)
            elif spec.method == "swap":
                from maskpro_ds.priors.swap import run_swap

                masks, meta["swap"] = run_swap(handle, tokens, targets, n, m, spec)
            else:
                masks = sparsegpt_masks(
                    handle, tokens, targets, n, m, blocksize=spec.blocksize, percdamp=spec.percdamp,
                    batch_size=spec.batch_size,
                )
                meta["sparsegpt"] = {"blocksize": spec.blocksize, "percdamp": spec.percdamp}
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

