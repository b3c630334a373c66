"""The layer-wise warm start (``mask.warm_start = swap``): the swap search from ``mask.prior``, run once
per training run before the first step, whose mask the policy then starts from. The trainer calls
:func:`run_warm_start` through the function the training CLI hands it (train/ and priors/ are peers).

Why: from a one-shot prior the policy gradient buys quality slowly (docs/estimators.md: no estimator
moved validation perplexity by more than 0.1% in 300 forwards from SparseGPT), while the layer-wise
objective ‖X (W ⊙ m − W)ᵀ‖² (H = XᵀX; docs/priors_and_eval.md, "The swap prior") is minimised group
by group in minutes by priors/swap.py. Starting there, the learner spends its
forwards on what the layers cannot see alone: their interactions through the end-to-end loss.

What it does: every rank runs the swap prior (priors/make.py, method swap, start = ``mask.prior``
or magnitude) on ``mask.warm_start_samples`` windows of the run's own ``data.source``; the search is
split over the ranks and gives the same bits for any rank count (priors/swap_ranks.py). Rank 0
writes the artifact atomically to ``<run_dir>/warm_start-<key>``, the key a hash of everything the
mask depends on (prior content, text, windows, base model, pattern, dtype), so a resumed run, or
one restarted after a crash, reads the mask of the same inputs instead of searching again, and a
run with other inputs in the same directory never picks up a stale one.

Cost, counted in ``train/forwards``: every rank runs every calibration window (the forward is
duplicated so the masks do not depend on the rank count), ceil(samples / data.batch_size)
forwards per rank; the search itself is CPU/GPU time without forwards, logged as
``warm_start/seconds``. Memory: one decoder block and one H (d_in² fp32) at a time, beside the
ZeRO-3 shards; nothing per weight after it returns.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

from maskpro_ds import distributed
from maskpro_ds.config import Config
from maskpro_ds.formats.mask_artifact import MASK_MANIFEST

logger = logging.getLogger(__name__)


@dataclass
class WarmStart:
    """The warm start's artifact and what it cost (seconds None when an earlier run made it)."""

    path: Path
    forwards: int
    seconds: float | None
    groups_changed_fraction: float | None

    def metrics(self) -> dict[str, float]:
        out = {"warm_start/forwards": float(self.forwards)}
        if self.seconds is not None:
            out["warm_start/seconds"] = self.seconds
        if self.groups_changed_fraction is not None:
            out["warm_start/groups_changed"] = self.groups_changed_fraction
        return out


def prior_checksum(prior: str) -> str:
    """What identifies the starting mask: the prior artifact's recorded checksums, or 'magnitude'."""
    if not prior:
        return "magnitude"
    manifest = Path(prior) / MASK_MANIFEST
    if not manifest.is_file():
        raise ValueError(f"mask.prior {prior}: no {MASK_MANIFEST} there; point it at a mask artifact "
                         "(maskpro-prior) or leave it empty for the magnitude prior")
    return json.dumps(json.loads(manifest.read_text()).get("checksums"), sort_keys=True)


def warm_start_key(cfg: Config, source_fingerprint: str, base_fingerprint: str) -> str:
    """A short hash of every input the warm-start mask depends on."""
    d, m = cfg.data, cfg.mask
    parts = [m.warm_start, prior_checksum(m.prior), source_fingerprint, base_fingerprint, m.pattern,
             str(m.warm_start_samples), str(d.seqlen), d.add_bos, cfg.model.dtype, str(cfg.model.include),
             str(cfg.model.exclude)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def samples_forwards(samples: int, batch_size: int) -> int:
    """Forwards per rank of the calibration pass, at the training batch size."""
    return math.ceil(samples / batch_size)


def run_warm_start(cfg: Config, run_dir: Path, info, source_fingerprint: str, base_fingerprint: str,
                   resuming: bool = False) -> WarmStart:
    """Search (or find) the warm-start mask of this run's inputs; every rank returns its path. A resumed
    run must find it: a new search would change m0 under logits trained from another one."""
    from maskpro_ds.priors.base import PriorSpec
    from maskpro_ds.priors.make import make_prior
    from maskpro_ds.priors.swap import SwapPriorOptions

    target = run_dir / f"warm_start-{warm_start_key(cfg, source_fingerprint, base_fingerprint)}"
    forwards = samples_forwards(cfg.mask.warm_start_samples, cfg.data.batch_size)
    found = distributed.broadcast_object((target / MASK_MANIFEST).is_file() if info.is_main else None)
    seconds = None
    if resuming and not found:
        others = sorted(p.name for p in run_dir.glob("warm_start-*"))
        raise ValueError(
            f"mask.warm_start: the checkpoint being resumed was trained from "
            f"{'the warm start ' + ', '.join(others) if others else 'no warm start'}, and this config's inputs "
            "(mask.prior, data.source, mask.warm_start_samples, data.seqlen, data.add_bos, model.dtype, the base "
            "model or mask.pattern) would make another; resume with the run's own config.yaml, or train a new "
            "train.run_dir")
    if found:
        logger.info("warm start: reusing %s (same prior, text, windows and base)", target)
    else:
        start = cfg.mask.prior or "magnitude"
        logger.info("warm start: swap search from %s on %d x %d tokens of data.source -> %s", start,
                    cfg.mask.warm_start_samples, cfg.data.seqlen, target)
        t0 = time.perf_counter()
        spec = PriorSpec(model=cfg.model.path, method="swap", out=str(target), pattern=cfg.mask.pattern,
                         calib=cfg.data.source, calib_split=cfg.data.split, text_field=cfg.data.text_field,
                         nsamples=cfg.mask.warm_start_samples, seqlen=cfg.data.seqlen, add_bos=cfg.data.add_bos,
                         include=list(cfg.model.include), exclude=list(cfg.model.exclude), dtype=cfg.model.dtype,
                         device=str(info.device), force=True, options=SwapPriorOptions(swap_start=start))
        make_prior(spec)  # rank 0 writes (temp path, then rename); the others return once searched
        distributed.barrier()
        seconds = round(time.perf_counter() - t0, 2)
    changed = json.loads((target / MASK_MANIFEST).read_text()).get("swap", {})
    fraction = changed.get("groups_changed_fraction")
    logger.info("warm start: %s groups changed%s", f"{fraction:.1%}" if fraction is not None else "?",
                f" in {seconds:.0f} s" if seconds is not None else "")
    return WarmStart(target, forwards, seconds, fraction)
