"""An in-process, single-process MaskPro reference for the distributed tests.

It holds every layer's full logits in one tensor, loads the model plainly (no DeepSpeed), and for
each step and each simulated rank r draws rank r's mask with the same counter-based keys, runs the
masked forward on rank r's batch, and applies the same update. It shares only the pure pieces with
the trainer (sampler, policy, batch schedule, advantage scaler), never the sharded store, the
exchange or ZeRO-3. ``lr`` may be changed between steps (to follow a guard's halvings); each step
keeps its raw (loss-unit) and conditioned advantages for the tests to read.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from maskpro_ds.data.schedule import batch_ids
from maskpro_ds.masks.advantages import AdvantageScaler, ResidualTracker
from maskpro_ds.masks.nm import magnitude_prior
from maskpro_ds.masks.policy import apply_update_, final_mask, init_logits
from maskpro_ds.masks.sampling import key_scalar, sample_masks


class ReferenceMaskPro:
    def __init__(self, model_dir, tokens: torch.Tensor, *, n=2, m=4, c=3.0, lr=20.0, alpha=0.99, seed=0,
                 batch_size=2, targets=r"\.layers\.\d+\.", order="use_then_refresh", norm="none",
                 exclude=("lm_head",), prior: dict[str, torch.Tensor] | None = None):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        self.tokens, self.n, self.m, self.lr, self.seed, self.batch_size = tokens, n, m, lr, seed, batch_size
        self.layers = [(name, mod) for name, mod in self.model.named_modules()
                       if isinstance(mod, torch.nn.Linear) and re.search(targets, name)
                       and not any(re.search(e, name) for e in exclude)]
        # m0: a prior artifact's masks ([out, in] bool by layer name), else the magnitude prior
        self.prior = [prior[name] if prior is not None else magnitude_prior(mod.weight, n, m)
                      for name, mod in self.layers]
        self.logits = [init_logits(p, c, m) for p in self.prior]
        self.tracker = ResidualTracker(alpha=alpha, order=order)
        self.scaler = AdvantageScaler(mode=norm)
        self.raw_advantages: list[list[float]] = []
        self.advantages: list[list[float]] = []
        self.weights = [mod.weight.detach().clone() for _, mod in self.layers]
        self.baseline = self._losses(torch.arange(tokens.shape[0]), self.prior)
        self.step_index = 0

    @torch.no_grad()
    def _losses(self, ids: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
        for (_, mod), weight, mask in zip(self.layers, self.weights, masks, strict=True):
            mod.weight.data = torch.where(mask.reshape(weight.shape), weight, 0.0)
        tokens = self.tokens[ids]
        logits = self.model(input_ids=tokens).logits[:, :-1].float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="none")
        return loss.view(tokens.shape[0], -1).mean(dim=1).double()

    def step(self, world_size: int) -> None:
        t = self.step_index
        masks_per_rank, residuals = [], []
        for r in range(world_size):
            masks = [sample_masks(lg, self.n, key_scalar(self.seed, t, r, li)) for li, lg in enumerate(self.logits)]
            ids = batch_ids(self.seed, t, r, world_size, self.batch_size, self.tokens.shape[0])
            loss = self._losses(ids, masks).mean()
            residuals.append(float(loss - self.baseline[ids].mean()))
            masks_per_rank.append(masks)
        raw = self.tracker.advantages(residuals)
        advantages = self.scaler.scale(raw)
        self.raw_advantages.append(raw)
        self.advantages.append(advantages)
        for li in range(len(self.logits)):
            apply_update_(self.logits[li], [mk[li] for mk in masks_per_rank], advantages, self.lr, self.n)
        self.tracker.update(residuals)
        self.step_index += 1

    def final_masks(self) -> list[torch.Tensor]:
        return [final_mask(lg, self.n, self.m) for lg in self.logits]
