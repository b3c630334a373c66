"""An in-process, single-process MaskPro reference for the distributed tests.

It holds every layer's full logits in one tensor, loads the model plainly (no DeepSpeed), and for
each step and each simulated rank r draws rank r's K masks with the same counter-based keys (slot
r·K + d), runs the masked forwards on rank r's batch, and applies the same update. It shares only
the pure pieces with the trainer (sampler, policy, the second-moment kernel, batch schedule, lr
schedule, advantage scaler, the layer-credit gradient of a slice), never the sharded store, the
exchange, ZeRO-3 or the estimator classes: the advantages (tracker, leave-one-out) and which rows
a rank's slice covers are written out here again. ``lr`` may be changed between
steps (to follow a guard's halvings); each step keeps its raw (loss-unit) and conditioned advantages
for the tests to read.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F

from maskpro_ds.data.schedule import batch_ids
from maskpro_ds.formats.checkpoint_format import split_groups
from maskpro_ds.masks.advantages import AdvantageScaler, ResidualTracker
from maskpro_ds.masks.nm import magnitude_prior
from maskpro_ds.masks.policy import apply_update_, final_mask, init_logits
from maskpro_ds.masks.sampling import key_scalar, sample_masks
from maskpro_ds.masks.second_moment import SecondMomentRule
from maskpro_ds.train.layer_credit import gram, row_gradient


class ReferenceMaskPro:
    def __init__(self, model_dir, tokens: torch.Tensor, *, n=2, m=4, c=3.0, lr=20.0, alpha=0.99, seed=0,
                 batch_size=2, targets=r"\.layers\.\d+\.", order="use_then_refresh", norm="none",
                 exclude=("lm_head",), prior: dict[str, torch.Tensor] | None = None,
                 estimator="residual_tracker", k=1, beta=0.999, eps=1e-3, lr_factor=lambda step: 1.0,
                 layer_credit=0.0, layer_credit_every=1):
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
        if estimator not in ("residual_tracker", "loo", "adaptive"):
            raise ValueError(f"the reference implements residual_tracker, loo and adaptive, not {estimator}")
        self.estimator, self.k, self.beta, self.eps, self.lr_factor = estimator, k, beta, eps, lr_factor
        self.layer_credit, self.layer_credit_every = layer_credit, layer_credit_every
        self.second = [torch.zeros_like(lg) for lg in self.logits]  # adaptive: per-logit second moment
        self.updates = 0
        self.weights = [mod.weight.detach().clone() for _, mod in self.layers]
        self.baseline = self._losses(torch.arange(tokens.shape[0]), self.prior)
        self.step_index = 0

    def _credit(self, world_size: int, rank: int, inputs: list[torch.Tensor], masks: list[torch.Tensor]) -> list:
        """Layer credit of ``rank``'s slices from its draw-0 forward: [(layer, g0, g1, λ·G)]."""
        out = []
        for li, (weight, lg) in enumerate(zip(self.weights, self.logits, strict=True)):
            per_row = weight.shape[1] // self.m
            g0, g1 = split_groups(lg.shape[0], world_size, 8 // math.gcd(8, self.m))[rank]
            if g1 == g0:
                continue
            r0, r1 = g0 // per_row, -(-g1 // per_row)
            kept = masks[li].reshape(-1, self.m)[r0 * per_row:r1 * per_row].reshape(-1)
            grad = row_gradient(weight[r0:r1], gram(inputs[li]), lg[g0:g1].contiguous(), kept, g0 - r0 * per_row, self.m)
            out.append((li, g0, g1, self.layer_credit * grad))
        return out

    @torch.no_grad()
    def _losses(self, ids: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
        for (_, mod), weight, mask in zip(self.layers, self.weights, masks, strict=True):
            mod.weight.data = torch.where(mask.reshape(weight.shape), weight, 0.0)
        tokens = self.tokens[ids]
        logits = self.model(input_ids=tokens).logits[:, :-1].float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="none")
        return loss.view(tokens.shape[0], -1).mean(dim=1).double()

    def _advantages(self, residuals: list[float]) -> list[float]:
        if self.estimator == "residual_tracker" or self.k == 1:
            return self.tracker.advantages(residuals)
        out = []
        for start in range(0, len(residuals), self.k):  # leave-one-out within each rank's K draws
            block = residuals[start:start + self.k]
            out += [block[i] - sum(block[j] for j in range(self.k) if j != i) / (self.k - 1) for i in range(self.k)]
        return out

    def step(self, world_size: int) -> None:
        t = self.step_index
        masks_per_draw, residuals, credits = [], [], []
        for r in range(world_size):
            ids = batch_ids(self.seed, t, r, world_size, self.batch_size, self.tokens.shape[0])
            for d in range(self.k):
                slot = r * self.k + d
                masks = [sample_masks(lg, self.n, key_scalar(self.seed, t, slot, li)) for li, lg in enumerate(self.logits)]
                inputs = [None] * len(self.layers)
                hooks = [mod.register_forward_pre_hook(lambda _m, args, li=li, seen=inputs: seen.__setitem__(li, args[0]))
                         for li, (_, mod) in enumerate(self.layers)] if (self.layer_credit and d == 0
                                                                 and t % self.layer_credit_every == 0) else []
                loss = self._losses(ids, masks).mean()
                for hook in hooks:
                    hook.remove()
                if hooks:
                    credits += self._credit(world_size, r, inputs, masks)
                residuals.append(float(loss - self.baseline[ids].mean()))
                masks_per_draw.append(masks)
        raw = self._advantages(residuals)
        advantages = self.scaler.scale(raw)
        self.raw_advantages.append(raw)
        self.advantages.append(advantages)
        lr = self.lr * self.lr_factor(t)
        for li in range(len(self.logits)):
            masks = [mk[li] for mk in masks_per_draw]
            if self.estimator == "adaptive":
                SecondMomentRule(self.second[li], self.beta, self.eps, self.updates).apply_masks(
                    self.logits[li], masks, advantages, lr, self.n)
            else:
                apply_update_(self.logits[li], masks, advantages, lr, self.n)
        for li, g0, g1, step in credits:  # computed at the old logits, applied after the policy update
            self.logits[li][g0:g1].sub_(step)
        self.tracker.update(residuals)
        self.updates += 1
        self.step_index += 1

    def final_masks(self) -> list[torch.Tensor]:
        return [final_mask(lg, self.n, self.m) for lg in self.logits]
