"""The MaskPro trainer: builds the run in ``__init__``, then ``step``/``train``/``close``.

One step on rank r of R (design in docs/architecture.md), read top to bottom in :meth:`Trainer.step`:
  ids   = schedule.ids(step, r)                     # sample ids; f(m0) looked up by id
  loss  = forward.losses(tokens, SampleMode(t, d))  # d = 0..K-1: rank r's K sampled masks, same batch
  every = all_gather(losses, f0)                    # R·K losses and R baselines, identical on every rank
  adv   = estimator.advantages(every)               # the registry in train/estimators/ (pure)
  store.apply_update(adv, lr · schedule(t), rule)   # owners regenerate the R·K masks on their slices
  estimator.commit(every)                           # running state moves once the update is applied
  guard.check_advantages(raw), check_deviation      # may halve lr from the next step (train/lr_guard.py)
Non-finite losses skip the step everywhere (logits and estimator state untouched); a non-finite
baseline stops the run with a checkpoint, naming the samples. Every training forward is counted per
rank (``train/forwards``): K per step, one more per step with the online baseline, and the
precomputed f(m0) pass once.

Before anything else rank 0 locks the run directory (train/run_lock.py); a resume is checked
against the checkpoint (train/resume_checks.py) before the model is loaded; config.yaml and the
fingerprint cache are written, and leftovers of killed runs removed, only once every check passed.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import time
import uuid
from pathlib import Path

import torch

from maskpro_ds import distributed
from maskpro_ds.config import Config
from maskpro_ds.data.samples import build_samples
from maskpro_ds.data.schedule import BatchSchedule
from maskpro_ds.formats.atomic import atomic_write_text
from maskpro_ds.formats.hashing import model_fingerprint, save_fingerprint_cache
from maskpro_ds.masks.policy import mask_entropy
from maskpro_ds.models.hf_dir import check_model_dir
from maskpro_ds.models.targets import select_targets
from maskpro_ds.train import baseline_cache, checkpoint, fault_injection, preemption
from maskpro_ds.train.estimators import StepLosses, make_estimator
from maskpro_ds.train.forward import MaskedForward, num_rounds
from maskpro_ds.train.layer_credit import LayerCredit
from maskpro_ds.train.logit_store import LogitStore
from maskpro_ds.train.lr_guard import GuardStop, LrGuard
from maskpro_ds.train.mask_modes import PRIOR, SampleMode
from maskpro_ds.train.metrics import MetricsLogger, ProgressBar
from maskpro_ds.train.periodic_eval import heldout_windows, masked_perplexity
from maskpro_ds.train.prior_init import init_from_prior
from maskpro_ds.train.resume_checks import RunIdentity, check_resume
from maskpro_ds.train.run_lock import lock_run_dir
from maskpro_ds.train.step_size import lr_factor
from maskpro_ds.train.zero_model import build_ds_config, install_masked_forward, load_partitioned_model
from maskpro_ds.train.zero_utils import full_numel, is_released, local_numel, zero_partition

logger = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """Raised when a guard stops the run; a checkpoint has been written first."""


class NothingToTrain(Exception):
    """``--resume`` found the run at or past ``train.steps``; nothing was loaded or changed."""


class Trainer:
    def __init__(self, cfg: Config, resume: bool = False, allow_mismatch: frozenset[str] = frozenset(),
                 warm_start=None):
        """``warm_start``: runs mask.warm_start (cli/train.py passes priors/warm_start.py's run_warm_start;
        train/ does not import priors/, its peer)."""
        self.cfg, self.run_warm_start = cfg, warm_start
        self.info = distributed.init_distributed(cfg.zero.backend, cfg.zero.timeout_s)
        self.run_dir = Path(cfg.train.run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.stop_reason: str | None = None
        # First of all, the run directory must be ours: a refused run reads and writes nothing there.
        self.lock = lock_run_dir(self.run_dir, self.info.is_main)
        try:
            self._setup(resume or cfg.checkpoint.resume, allow_mismatch)
        except BaseException:
            self._release_lock()
            raise

    def _setup(self, resume: bool, allow_mismatch: frozenset[str]) -> None:
        cfg = self.cfg
        model_dir = check_model_dir(cfg.model.path, "model.path")
        fingerprint_cache = self.run_dir / "base_fingerprint.json"
        self.base_fingerprint = distributed.broadcast_object(
            model_fingerprint(model_dir, fingerprint_cache, write_cache=False) if self.info.is_main else None)

        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.samples = self._build_samples(cfg.data.source, cfg.data.seqlen, cfg.data.num_samples)
        self.schedule = BatchSchedule(cfg.train.seed, self.info.world_size, cfg.data.batch_size, len(self.samples.ids))
        self.identity = RunIdentity(cfg.train.seed, self.samples.source_fingerprint, len(self.samples), cfg.mask.n,
                                    cfg.mask.m, self.base_fingerprint)
        manifest = self._checkpoint_to_resume(allow_mismatch) if resume else None

        self.ds_config = build_ds_config(cfg, self.info.world_size)
        self.engine, self.model = load_partitioned_model(cfg, self.ds_config)
        self.targets = select_targets(self.model, cfg.mask.m, cfg.model.targets, cfg.model.include, cfg.model.exclude)
        self.estimator = make_estimator(cfg.train)
        self.store = LogitStore([t.name for t in self.targets], [t.shape for t in self.targets], cfg.mask.n, cfg.mask.m,
                                self.info.rank, self.info.world_size, cfg.train.seed, device=self.info.device,
                                cache_samples=cfg.mask.cache_samples, kernels=cfg.mask.kernels,
                                draws=self.estimator.draws_per_rank)
        self.warm = None  # the layer-wise warm start (priors/warm_start.py): its mask replaces mask.prior
        if cfg.mask.warm_start != "none":
            if self.run_warm_start is None:
                raise ValueError(f"mask.warm_start = {cfg.mask.warm_start} runs only through the training CLI "
                                 "(launchers/train.py, maskpro-train); set it to none here")
            self.warm = self.run_warm_start(cfg, self.run_dir, self.info, self.samples.source_fingerprint,
                                            self.base_fingerprint, resuming=manifest is not None)
        self.prior_path = str(self.warm.path) if self.warm else cfg.mask.prior
        self.prior_identity = init_from_prior(cfg, self.store, self.targets, self.prior_path, self.info,
                                              self.base_fingerprint)
        self.credit = LayerCredit.from_config(self.store, cfg.train)
        install_masked_forward(self.targets, self.store.mask_for_forward, self.credit)
        self.forward = MaskedForward(self.engine, self.store)
        self.estimator.bind(self.store.group_ranges())
        # The f(m0) pass costs num_rounds forwards per rank, once (a cache reused from disk included).
        precompute = cfg.train.baseline == "precompute"
        self.forwards = num_rounds(len(self.samples.ids), self.info.world_size, cfg.data.batch_size) if precompute else 0
        self.forwards += self.warm.forwards if self.warm else 0
        self.guard = LrGuard(cfg.train.lr, cfg.train.max_abs_advantage, cfg.train.max_deviation)
        self.step_index = 0
        self.bad_steps = 0
        self.skipped_steps = 0
        self.best_eval = math.inf
        self.run_id = distributed.broadcast_object(uuid.uuid4().hex[:12] if self.info.is_main else None)
        self.resumed = manifest is not None
        if manifest is not None:
            self._resume(manifest)
        if self.info.is_main:  # every check passed: from here on the run directory is this run's
            self._claim_run_dir(model_dir, fingerprint_cache)
        self.baseline = self._baseline() if cfg.train.baseline == "precompute" else None
        self.eval_windows = None
        if cfg.train.eval_every:
            self.eval_windows = heldout_windows(self.tokenizer, cfg.train.eval_source, cfg.train.eval_seqlen,
                                                cfg.train.eval_tokens, add_bos=cfg.data.add_bos)
        self.metrics = MetricsLogger(self.run_dir, enabled=self.info.is_main, tensorboard=cfg.metrics.tensorboard,
                                     jsonl=cfg.metrics.jsonl)
        self.metrics.truncate_after(self.step_index)
        if self.warm and not self.resumed:
            self.metrics.log(0, self.warm.metrics())
        self.weight_digest_at_start = self._weight_digest()

    # ------------------------------------------------------------------ setup helpers
    def _checkpoint_to_resume(self, allow_mismatch: frozenset[str]):
        """The checkpoint a resume continues from, checked against this run before the model is loaded."""
        manifest = checkpoint.find_resumable(self.ckpt_root, self.info.rank, self.info.world_size)
        if manifest is None:
            raise FileNotFoundError(f"--resume: no usable checkpoint under {self.ckpt_root}")
        for warning in check_resume(manifest, self.identity, allow_mismatch):
            if self.info.is_main:
                logger.warning("%s", warning)
        if manifest.step >= self.cfg.train.steps:
            raise NothingToTrain(f"nothing to train: {manifest.path} is at step {manifest.step} and train.steps = "
                                 f"{self.cfg.train.steps}; nothing was changed. Raise --train.steps to continue")
        return manifest

    def _claim_run_dir(self, model_dir: Path, fingerprint_cache: Path) -> None:
        """Rank 0, once every check passed: remove what killed runs left, record the config and fingerprint."""
        removed = checkpoint.clean_temporaries(self.run_dir)
        if removed:
            logger.warning("removed %d temporary file(s) left by an interrupted run: %s", len(removed),
                           ", ".join(str(p.relative_to(self.run_dir)) for p in removed[:5]))
        atomic_write_text(self.run_dir / "config.yaml", self.cfg.dump_yaml())
        save_fingerprint_cache(model_dir, fingerprint_cache, self.base_fingerprint)

    def _build_samples(self, source: str, seqlen: int, num_samples: int):
        d = self.cfg.data
        # The sample cache lives in the run directory unless data.cache_dir names another place.
        cache_dir = d.cache_dir or self.run_dir / "cache" / "data"
        kwargs = dict(seqlen=seqlen, num_samples=num_samples, cache_dir=cache_dir, split=d.split,
                      text_field=d.text_field, max_documents=d.max_documents or None, add_bos=d.add_bos)
        if not source:
            raise ValueError("data.source is empty; point it at a text/json/parquet file or a dataset name")
        # Rank 0 tokenises and fills the cache; the others read it.
        if self.info.is_main:
            samples = build_samples(self.tokenizer, source, **kwargs)
        distributed.barrier()
        if not self.info.is_main:
            samples = build_samples(self.tokenizer, source, **kwargs)
        return samples

    def _tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.samples.tokens[ids].to(self.info.device)

    def _baseline(self) -> baseline_cache.BaselineCache:
        """f(m0, ξ) for every sample id: loaded from the run dir if it matches, else one pass over the data."""
        m = self.cfg.model
        fp = baseline_cache.baseline_fingerprint(self.samples.source_fingerprint, self.prior_identity,
                                                 self.base_fingerprint, m.dtype, str(m.targets), str(m.include),
                                                 str(m.exclude))
        return baseline_cache.load_or_compute(self.run_dir / "baseline.safetensors", fp, self.samples.tokens,
                                              self.forward, self.info, self.cfg.data.batch_size,
                                              self.cfg.metrics.progress)

    # ------------------------------------------------------------------ the step
    def step(self) -> dict[str, float]:
        cfg, store, world = self.cfg, self.store, self.info.world_size
        t0 = time.time()
        ids = self.schedule.ids(self.step_index, self.info.rank)
        tokens = self._tokens(ids)
        k = self.estimator.draws_per_rank
        loss = torch.stack([self.forward.losses(tokens, SampleMode(self.step_index, d)).double().mean().cpu()
                            for d in range(k)])
        if fault_injection.nan_loss(self.step_index, self.info.rank):
            loss = torch.full((k,), float("nan"), dtype=torch.float64)
        if self.baseline is not None:
            f0_each = self.baseline.get(ids)
        else:
            f0_each = self.forward.losses(tokens, PRIOR).double().cpu()
        # a layer-credit step is charged one forward (its measured cost: docs/estimators.md)
        self.forwards += k + (self.baseline is None) + (self.credit is not None and self.credit.active(self.step_index))
        every = distributed.all_gather_floats(torch.cat([loss, f0_each.mean().reshape(1)]).to(self.info.device)).cpu()
        if not bool(torch.isfinite(every[:, k]).all()):
            self._stop_on_baseline(ids[~torch.isfinite(f0_each)].tolist())
        # draw index rank·K + d, each draw paired with its rank's baseline
        losses = StepLosses(losses=every[:, :k].reshape(-1).tolist(),
                            baselines=every[:, k:].expand(-1, k).reshape(-1).tolist())
        values = {"train/loss": float(every[:, :k].mean()), "train/baseline_loss": float(every[:, k].mean()),
                  "train/forwards": self.forwards}
        if not bool(torch.isfinite(every[:, :k]).all()):
            return self._skip_step(values, t0)
        self.bad_steps = 0

        raw = self.estimator.raw_advantages(losses)  # loss units: what the guard bounds
        advantages = self.estimator.advantages(losses)  # what the update uses
        lr = self.guard.lr * lr_factor(cfg.train, self.step_index)
        counts = torch.zeros(2, dtype=torch.float64)
        for layer, name in enumerate(store.names):
            c = store.apply_update(layer, self.step_index, advantages, lr, self.estimator.update_rule(name))
            if self.credit is not None:
                self.credit.apply(layer)
            counts += torch.tensor([c["deviating"], c["changed"]], dtype=torch.float64)
        counts = distributed.all_gather_floats(counts.to(self.info.device)).sum(0).cpu()
        total_groups = store.num_groups_total
        deviating = float(counts[0]) / (total_groups * world * k)
        self.estimator.commit(losses)
        self.step_index += 1
        # The step is complete; a trip halves lr from the next step on, and a stop saves this state.
        try:
            self.guard.check_advantages(raw, self.step_index)
            self.guard.check_deviation(deviating, self.step_index)
        except GuardStop as e:
            self.stop_reason = str(e)

        res = torch.tensor(losses.residuals, dtype=torch.float64)
        elapsed = time.time() - t0
        values.update({
            "train/residual_mean": float(res.mean()),
            "train/residual_std": float(res.std()) if res.numel() > 1 else 0.0,
            **self.estimator.metrics(),
            "train/advantage_mean": sum(advantages) / len(advantages),
            "train/advantage_abs_max": max(abs(a) for a in advantages),
            "train/raw_advantage_abs_max": max(abs(a) for a in raw),
            "train/deviating_groups_frac": deviating,
            "train/changed_groups_frac": float(counts[1]) / total_groups,
            "train/lr": lr,
            "train/step_time_s": elapsed,
            "train/tokens_per_s": world * k * tokens.numel() / max(elapsed, 1e-9),
            "train/peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "train/skipped_steps": self.skipped_steps,
        })
        if torch.cuda.is_available():
            values["train/peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        every_k = cfg.metrics.mask_stats_every
        if every_k and self.step_index % every_k == 0 and store.n == 2:
            values["train/mask_entropy"] = self._mask_entropy()
        return values

    def _stop_on_baseline(self, mine: list[int]) -> None:
        """A non-finite f(m0) (online baseline) will not get better by skipping: name the samples of
        every rank, save the state (nothing of this step was applied) and stop."""
        bad = sorted(i for ids in distributed.all_gather_objects(mine) for i in ids)
        self.save()
        raise TrainingStopped(
            f"step {self.step_index}: the baseline loss f(m0) is not finite for sample ids {bad} "
            "(train.baseline = online): the model with the prior mask gives NaN/inf on them; check those samples "
            "of data.source, model.dtype (fp16 overflows easily), the base weights and mask.prior. Checkpoint "
            f"saved at step {self.step_index} (nothing of this step was applied); resume with --resume after "
            "fixing it")

    def _mask_entropy(self) -> float:
        """Mean entropy (nats) of the per-group distributions over kept sets, across all ranks' slices."""
        local = sum(mask_entropy(t, self.store.n) * t.shape[0] for t in self.store.logits if t.shape[0])
        totals = distributed.all_gather_floats(torch.tensor([local, self.store.num_local_groups()],
                                                            dtype=torch.float64, device=self.info.device))
        totals = totals.sum(0).cpu()
        return float(totals[0] / totals[1])

    def _skip_step(self, values: dict, t0: float) -> dict[str, float]:
        self.bad_steps += 1
        self.skipped_steps += 1
        self.step_index += 1
        logger.warning("step %d: non-finite loss on some rank; step skipped on all ranks (%d in a row)",
                       self.step_index - 1, self.bad_steps)
        if self.bad_steps >= self.cfg.train.max_bad_steps:
            self.save()
            raise TrainingStopped(
                f"{self.bad_steps} consecutive steps had a non-finite loss (limit train.max_bad_steps="
                f"{self.cfg.train.max_bad_steps}); checkpoint saved at step {self.step_index}. Check model.dtype "
                "(fp16 overflows easily) and the data; resume with --resume after fixing it"
            )
        values.update({"train/skipped_steps": self.skipped_steps, "train/step_time_s": time.time() - t0})
        return values

    # ------------------------------------------------------------------ loop
    def train(self) -> None:
        cfg = self.cfg
        progress = ProgressBar(cfg.train.steps, self.step_index, enabled=self.info.is_main and cfg.metrics.progress,
                               desc="maskpro")
        try:
            if cfg.train.eval_every and cfg.train.eval_at_start and self.step_index == 0 and not self.resumed:
                self.metrics.log(0, {**self.evaluate(), "train/forwards": self.forwards})
            while self.step_index < cfg.train.steps:
                values = self.step()
                fault_injection.kill_rank(self.step_index, self.info.rank)
                if cfg.train.eval_every and self.step_index % cfg.train.eval_every == 0:
                    values.update(self.evaluate())
                if self.step_index % cfg.metrics.log_every == 0:
                    self.metrics.log(self.step_index, values)
                progress.update(self.step_index, {"loss": values.get("train/loss"), "res": values.get("train/residual_mean"),
                                                  "dev": values.get("train/deviating_groups_frac")})
                saved = self.step_index % cfg.checkpoint.every == 0 or self.step_index == cfg.train.steps
                if saved:
                    self.save()
                if self.stop_reason:  # a guard gave up after this step: stop with a checkpoint of it
                    if not saved:
                        self.save()
                    raise TrainingStopped(f"{self.stop_reason}; checkpoint saved at step {self.step_index}")
                # SIGTERM/SIGUSR1 on any rank: all stop after this step with a checkpoint of it (collective).
                why = self.step_index < cfg.train.steps and preemption.stop_agreed(self.info.device)
                if why:
                    if not saved:
                        self.save()
                    raise preemption.Preempted(self.step_index, why)
        finally:
            progress.close()
        if self.step_index == cfg.train.steps and not (self.ckpt_root / checkpoint.step_dir_name(self.step_index)).exists():
            self.save()

    def evaluate(self) -> dict[str, float]:
        """Held-out perplexity of the current final (top-N) mask; marks the best checkpoint."""
        ppl = masked_perplexity(self.forward, self.eval_windows, self.info)
        values = {"eval/ppl": ppl}
        if ppl < self.best_eval:
            self.best_eval = ppl
            self.save()
            if self.info.is_main:
                checkpoint.mark_best(self.ckpt_root, self.step_index)
        values["eval/best_ppl"] = self.best_eval
        return values

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"step": self.step_index, **self.guard.state_dict(), "bad_steps": self.bad_steps,
                "skipped_steps": self.skipped_steps, "best_eval": float(self.best_eval).hex(),
                "estimator": self.estimator.state_dict(), **self.identity.state(), "forwards": self.forwards,
                "world_size": self.info.world_size}

    def load_state_dict(self, state: dict) -> None:
        self.step_index = int(state["step"])
        self.guard.load_state_dict(state)  # lr possibly halved by a guard
        self.bad_steps = int(state["bad_steps"])
        self.skipped_steps = int(state["skipped_steps"])
        self.best_eval = float.fromhex(state["best_eval"])
        self.forwards = int(state.get("forwards", self.forwards))  # absent in checkpoints older than the count
        # Checkpoints written before the estimator registry kept its state at the top level.
        self.estimator.load_state_dict(state.get("estimator", state))

    def save(self) -> Path:
        return checkpoint.save_checkpoint(
            self.ckpt_root, self.store, step=self.step_index, state=self.state_dict(), config=self.cfg.to_dict(),
            base_model={"path": str(self.cfg.model.path), "fingerprint": self.base_fingerprint},
            run_id=self.run_id, keep_last=self.cfg.checkpoint.keep_last, extra=self.estimator.slice_state())

    def _resume(self, manifest) -> None:
        checkpoint.check_compatible(manifest, self.store)
        checkpoint.load_logits_into(manifest, self.store)
        self.estimator.load_slice_state(checkpoint.load_extra_slices(manifest, self.store))
        self.load_state_dict(manifest.state)
        self.run_id = manifest.run_id
        if self.info.is_main:
            logger.info("resumed from %s (step %d, written by %d ranks)", manifest.path, manifest.step, manifest.world_size)

    def _weight_digest(self) -> list[float]:
        """float64 sum and sum of squares of this rank's ZeRO-3 partitions (no gather): a cheap witness
        that the frozen base never changes, and, summed over ranks, that the partitions are the model."""
        total, squares = 0.0, 0.0
        for param in self.model.parameters():
            part = zero_partition(param).double()
            total += float(part.sum())
            squares += float((part * part).sum())
        return [total, squares]

    def rank_report(self) -> dict:
        """Per-rank facts for tests and the memory bench, written to <run_dir>/ranks/rank-XXXXX.json."""
        params = list(self.model.parameters())
        return {
            "rank": self.info.rank, "world_size": self.info.world_size, "step": self.step_index,
            "param_local_numel": sum(local_numel(p) for p in params),
            "param_full_numel": sum(full_numel(p) for p in params),
            "params_released": sum(is_released(p) for p in params), "params_total": len(params),
            "logit_local_bytes": self.store.local_bytes(), "logit_local_groups": self.store.num_local_groups(),
            "weight_digest_start": self.weight_digest_at_start, "weight_digest_end": self._weight_digest(),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }

    def close(self) -> None:
        metrics = getattr(self, "metrics", None)
        if metrics is not None:
            metrics.close()
        if hasattr(self, "weight_digest_at_start"):
            out = self.run_dir / "ranks" / f"rank-{self.info.rank:05d}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out, json.dumps(self.rank_report(), indent=1) + "\n")
        self._release_lock()

    def _release_lock(self) -> None:
        lock = getattr(self, "lock", None)
        if lock is not None:
            lock.release()
