"""The per-sample baseline loss f(m0, ξ), keyed by sample id, never by step.

MaskPro's residual is ``f(m_t, ξ) - f(m0, ξ)`` on the same batch. The data set is fixed, so the
baseline is computed once per sample (a precompute pass) and looked up by sample id; that pairing
survives any change of batch size, world size or step numbering (pairing by position does not).

A saved cache carries a fingerprint of what the losses depend on (the samples, the prior mask, the
base model, and anything else the caller adds, e.g. the dtype), and :meth:`BaselineCache.load`
refuses a cache whose fingerprint differs: a stale baseline silently biases every residual.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from maskpro_ds import distributed
from maskpro_ds.formats.atomic import atomic_write_bytes
from maskpro_ds.train.forward import MaskedForward, num_rounds, padded_rounds
from maskpro_ds.train.mask_modes import PRIOR
from maskpro_ds.train.metrics import ProgressBar

logger = logging.getLogger(__name__)

_FORMAT = "maskpro_ds.baseline/1"


def baseline_fingerprint(samples_fingerprint: str, prior_identity: str, model_fingerprint: str, *extra: str) -> str:
    """sha256 of what f(m0, ξ) depends on: the samples, the prior mask, the model, and ``extra`` parts
    (e.g. the compute dtype)."""
    parts = [samples_fingerprint, prior_identity, model_fingerprint, *extra]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def _format_ids(ids: torch.Tensor, limit: int = 10) -> str:
    shown = ids[:limit].tolist()
    more = f" ... ({ids.numel()} in all)" if ids.numel() > limit else ""
    return f"{shown}{more}"


class BaselineCache:
    """Baseline losses for sample ids ``0..num_samples-1`` (float64), with a filled flag per id."""

    def __init__(self, num_samples: int, *, fingerprint: str = ""):
        if num_samples <= 0:
            raise ValueError(f"BaselineCache needs num_samples > 0, got {num_samples}")
        self.num_samples = num_samples
        self.fingerprint = fingerprint
        self.losses = torch.zeros(num_samples, dtype=torch.float64)
        self.filled = torch.zeros(num_samples, dtype=torch.bool)

    def _check_ids(self, ids: torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        bad = ids[(ids < 0) | (ids >= self.num_samples)]
        if bad.numel():
            raise IndexError(f"sample ids {_format_ids(bad)} are outside 0..{self.num_samples - 1}")
        return ids

    def set(self, ids: torch.Tensor, losses: torch.Tensor) -> None:
        """Record ``losses[k]`` as the baseline of sample ``ids[k]`` (overwrites)."""
        ids = self._check_ids(ids)
        losses = torch.as_tensor(losses).detach().to("cpu", torch.float64).reshape(-1)
        if losses.numel() != ids.numel():
            raise ValueError(f"BaselineCache.set: {ids.numel()} ids but {losses.numel()} losses")
        bad = ~torch.isfinite(losses)
        if bad.any():
            raise ValueError(
                f"non-finite baseline loss f(m0) for sample ids {_format_ids(ids[bad])}: the model with the "
                "prior mask gives NaN/inf on them; check those samples of data.source, model.dtype (fp16 "
                "overflows easily), the base weights and mask.prior"
            )
        self.losses[ids] = losses
        self.filled[ids] = True

    def get(self, ids: torch.Tensor) -> torch.Tensor:
        """float64 baselines of ``ids``; an error names any id that has none yet."""
        ids = self._check_ids(ids)
        missing = ids[~self.filled[ids]]
        if missing.numel():
            raise KeyError(
                f"no baseline loss for sample ids {_format_ids(torch.unique(missing))}: "
                "run the precompute pass over all samples before training"
            )
        return self.losses[ids].clone()

    @property
    def complete(self) -> bool:
        return bool(self.filled.all())

    def missing(self) -> torch.Tensor:
        """Ids without a baseline, ascending."""
        return torch.nonzero(~self.filled).reshape(-1)

    def save(self, path: str | os.PathLike, fingerprint: str | None = None) -> None:
        """Write losses, filled flags and the fingerprint to one safetensors file, atomically."""
        fp = self.fingerprint if fingerprint is None else fingerprint
        meta = {"format": _FORMAT, "fingerprint": fp, "num_samples": str(self.num_samples)}
        payload = save({"losses": self.losses.contiguous(), "filled": self.filled.contiguous()}, metadata=meta)
        atomic_write_bytes(Path(path), payload)

    @classmethod
    def load(
        cls, path: str | os.PathLike, expected_fingerprint: str, *, num_samples: int | None = None
    ) -> BaselineCache:
        """Read a cache written by :meth:`save`; refuse one computed for other samples, prior or model.

        With ``num_samples`` the cache is cut or extended to that size: ids are prefix-stable, so the
        baselines of the common ids stay valid and new ids are left missing.
        """
        path = Path(path)
        try:
            with safe_open(path, "pt") as f:
                meta = f.metadata() or {}
                losses = f.get_tensor("losses")
                filled = f.get_tensor("filled")
        except FileNotFoundError:
            raise FileNotFoundError(f"baseline cache {path} does not exist; run the precompute pass") from None
        except (SafetensorError, OSError, KeyError, ValueError) as e:
            raise ValueError(f"baseline cache {path} is unreadable ({e}); delete it and rerun the precompute pass") from e
        if meta.get("format") != _FORMAT:
            raise ValueError(f"baseline cache {path} has format {meta.get('format')!r}, expected {_FORMAT!r}")
        if meta.get("fingerprint") != expected_fingerprint:
            raise ValueError(
                f"baseline cache {path} is stale: it was computed for fingerprint {meta.get('fingerprint')!r}, "
                f"this run needs {expected_fingerprint!r} (the samples, prior mask or model changed). "
                "Delete it and rerun the precompute pass."
            )
        if losses.dtype != torch.float64 or filled.dtype != torch.bool or losses.shape != filled.shape:
            raise ValueError(f"baseline cache {path}: unexpected tensors {losses.dtype}{list(losses.shape)}, {filled.dtype}")
        n = losses.numel() if num_samples is None else num_samples
        cache = cls(n, fingerprint=expected_fingerprint)
        k = min(n, losses.numel())
        cache.losses[:k] = losses[:k]
        cache.filled[:k] = filled[:k]
        return cache


def load_or_compute(path: Path, fingerprint: str, tokens: torch.Tensor, forward: MaskedForward,
                    info: distributed.RankInfo, batch: int, progress: bool) -> BaselineCache:
    """f(m0, ξ) for every sample id (row of ``tokens``): loaded from ``path`` if it matches, else one
    collective pass over the samples (rank 0 saves it). Every rank returns the full cache. A
    non-finite loss stops the pass on every rank with an error naming the samples."""
    num = tokens.shape[0]
    if path.is_file():
        try:
            cache = BaselineCache.load(path, fingerprint, num_samples=num)
            if cache.complete:
                return cache
        except ValueError as e:
            if info.is_main:
                logger.warning("recomputing the baseline: %s", e)
    cache = BaselineCache(num, fingerprint=fingerprint)
    t0 = time.time()
    bar = ProgressBar(num_rounds(num, info.world_size, batch), 0, enabled=info.is_main and progress, desc="baseline f(m0)")
    for k, (ids, real) in enumerate(padded_rounds(num, info.world_size, info.rank, batch)):
        losses = forward.losses(tokens[ids].to(info.device), PRIOR).double()
        # A flag marks the real slots (padding repeats sample 0), so a NaN loss is never taken for padding.
        real_slot = (torch.arange(batch) < real).double()
        payload = torch.stack([ids.double(), losses.cpu(), real_slot], 1)
        every = distributed.all_gather_floats(payload.reshape(-1).to(info.device)).reshape(-1, 3).cpu()
        keep = every[:, 2] > 0
        cache.set(every[keep, 0].long(), every[keep, 1])  # raises on a non-finite loss, naming the ids
        bar.update(k + 1)
    bar.close()
    if info.is_main:
        cache.save(path)
        logger.info("baseline pass over %d samples took %.1f s", num, time.time() - t0)
    distributed.barrier()
    return cache
