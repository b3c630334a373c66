"""π0 = C·m0 on this rank's slice of every layer: m0 from a prior artifact (checked against the
base and the pattern) or from the magnitude of the weights, computed in place."""

from __future__ import annotations

from maskpro_ds import distributed
from maskpro_ds.config import Config
from maskpro_ds.formats.mask_artifact import read_mask_artifact
from maskpro_ds.masks.nm import magnitude_prior
from maskpro_ds.train.zero_utils import gathered


def init_from_prior(cfg: Config, store, targets, prior: str, info, base_fingerprint: str) -> str:
    """π0 = C·m0 on every slice, m0 from the prior artifact or the magnitude of the weights; returns the
    prior's identity (part of the f(m0) cache's fingerprint)."""
    if prior:
        artifact = read_mask_artifact(prior)
        problem = None
        if info.is_main:  # one rank hashes it; all learn the outcome
            try:
                artifact.verify()
            except ValueError as e:
                problem = f"mask.prior: {e}"
        problem = distributed.broadcast_object(problem)
        if problem:
            raise ValueError(problem)
        if (artifact.n, artifact.m) != (cfg.mask.n, cfg.mask.m):
            raise ValueError(f"mask.prior {prior} is {artifact.pattern}, but mask.pattern is {cfg.mask.pattern}")
        artifact.check_base(base_fingerprint)
    for index, target in enumerate(targets):
        g0, g1 = store.local_range(index)
        if prior:
            if target.name not in artifact.shapes:
                raise ValueError(f"mask.prior {prior} has no mask for layer {target.name}; it was made "
                                 "for another model or another target set")
            if artifact.shapes[target.name] != target.shape:
                raise ValueError(f"mask.prior {prior}: layer {target.name} has shape "
                                 f"{list(artifact.shapes[target.name])}, the model has {list(target.shape)}; "
                                 "the prior was made for another model")
            mine = artifact.layer_mask(target.name).reshape(-1, cfg.mask.m)[g0:g1]
        else:
            with gathered([target.module.weight]):  # one layer; only this rank's groups are ranked
                mine = magnitude_prior(target.module.weight.detach().reshape(-1, cfg.mask.m)[g0:g1].cpu(),
                                       cfg.mask.n, cfg.mask.m)
        store.init_from_prior(index, mine, cfg.mask.init_scale)
    return f"artifact:{artifact.path.resolve()}:{artifact.base_fingerprint}" if prior else "magnitude"

