"""The typed configuration tree: dataclass sections, YAML loading, dotted CLI overrides, validation.

A run is described by one :class:`Config` (sections model, data, mask, train, zero, checkpoint,
metrics). It is loaded from YAML (a safe loader), then ``--section.key=value`` overrides are
applied, each type-checked against the field. Unknown keys, wrong types and inconsistent values
raise ``ValueError`` naming the field and what is allowed. An option with a fixed set of values
declares them once, as a ``typing.Literal`` on its field, and :meth:`Config.validate` checks every
such field (one place, whatever set the value: YAML, an override or code). The resolved config is
dumped into the run directory and loads back identically. ``mask.pattern`` ("2:4") is parsed once
here into ``mask.n`` / ``mask.m``.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from maskpro_ds.formats.dtypes import DtypeName
from maskpro_ds.masks.advantages import AdvantageNorm, TrackerOrder
from maskpro_ds.masks.nm import parse_pattern

KernelMode = Literal["auto", "compiled", "plain"]
EstimatorName = Literal["residual_tracker", "residual", "vanilla", "loo", "adaptive"]  # = train/estimators ESTIMATORS
LrSchedule = Literal["constant", "cosine", "linear"]


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader without YAML 1.1's base-60 integers, which would read ``pattern: 2:4`` as 124."""


_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:int"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)


def safe_load_yaml(text: str) -> object:
    """yaml.safe_load semantics (no arbitrary objects), minus base-60 integers."""
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - _YamlLoader derives from SafeLoader


@dataclass
class ModelConfig:
    path: str = ""
    """Hugging Face causal-LM directory (config.json + safetensors). A directory holding only a
    config.json builds a randomly initialised model under zero.Init (shape tests, 70B-shaped runs)."""
    dtype: DtypeName = "bf16"
    """Dtype of the frozen base weights and the forward: bf16 | fp16 | fp32. Losses are reduced in fp32."""
    targets: str = r"\.layers\.\d+\."
    """Regex a module name must match (re.search) to be a mask target; default: every Linear in a decoder block."""
    include: list[str] = field(default_factory=list)
    """Extra regexes; when non-empty a target must also match one of them (e.g. 'mlp')."""
    exclude: list[str] = field(default_factory=lambda: [r"lm_head"])
    """Regexes of module names never masked."""
    init_seed: int = 0
    """Seed for random initialisation when the directory has no weights (config-only models)."""


@dataclass
class DataConfig:
    source: str = ""
    """Calibration text: a .txt (documents separated by blank lines), .json/.jsonl, .parquet file,
    a directory of them, or a hub dataset name 'name[:config]' (needs network)."""
    split: str = "train"
    """Dataset split of a hub dataset (a local file is one split)."""
    text_field: str = "text"
    """Column holding the text in json/parquet/hub datasets."""
    max_documents: int = 0
    """Use only the first K documents (0 = all)."""
    seqlen: int = 128
    """Tokens per training sample (the paper uses 128)."""
    num_samples: int = 512
    """Number of fixed calibration samples (the paper: 512 C4 documents)."""
    batch_size: int = 4
    """Samples per rank per step; every rank draws its own mask for its batch."""
    cache_dir: str = ""
    """Where tokenised samples are cached (keyed by source, tokenizer, seqlen and BOS policy);
    empty = <train.run_dir>/cache/data."""
    add_bos: Literal["auto", "true", "false"] = "auto"
    """BOS token at the start of every window (training, baseline, calibration, evaluation): auto = when
    the tokenizer adds one by default | true | false. See docs/data.md."""


@dataclass
class MaskConfig:
    pattern: str = "2:4"
    """N:M pattern: N kept in every group of M consecutive weights along the input dim."""
    prior: str = ""
    """Mask artifact directory (tools/make_prior.py) giving m0; empty = magnitude prior computed in place."""
    warm_start: Literal["none", "swap"] = "none"
    """Before the first step: swap = the layer-wise swap search from this prior (or magnitude) on
    warm_start_samples windows of data.source, then train from its mask (priors/warm_start.py; the
    shipped configs' choice, docs/estimators.md); none = train from the prior itself."""
    warm_start_samples: int = 128
    """Calibration windows (of data.seqlen tokens) of the warm start's search."""
    init_scale: float = 10.0
    """C in pi0 = C * m0. Controls exploration: C=10 deviates ~1.4e-4 of groups per sample, C=5 ~2e-2."""
    cache_samples: bool = True
    """Keep the forward's packed masks (d/8 bytes per rank) for the update instead of drawing them again
    (same bits either way). Turn off when memory is tight: 8.75 GB per rank at 70B."""
    kernels: KernelMode = "auto"
    """Sampling/update kernels: auto (torch.compile when it reproduces the plain kernels' bits, else plain)
    | compiled | plain. Every rank must use the same; auto decides identically on identical hardware."""

    @property
    def n(self) -> int:
        return parse_pattern(self.pattern)[0]

    @property
    def m(self) -> int:
        return parse_pattern(self.pattern)[1]


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    """Output directory: resolved config, checkpoints, metrics.jsonl, TensorBoard events, plots."""
    steps: int = 100
    """Total optimisation steps (> 0). A resumed run continues up to this step."""
    lr: float = 50.0
    """Policy-gradient step size eta (paper: 50; loss residuals are ~1e-3)."""
    alpha: float = 0.99
    """Moving-average factor of the residual tracker delta, in [0, 1). alpha = 1 would freeze delta at 0,
    which is the plain-residual ablation: choose it with train.estimator = residual instead."""
    estimator: EstimatorName = "residual_tracker"
    """residual_tracker (MaskPro) | residual (no tracker; the plain-residual ablation) | vanilla (loss alone;
    ablation) | loo (K masks on the same batch, leave-one-out baseline) | adaptive (loo + per-logit
    second-moment steps). See docs/method.md §3 and docs/estimators.md."""
    masks_per_step: int = 1
    """K: masks each rank draws per step on its batch (K forwards per step, every estimator). loo and
    adaptive use the other K-1 draws as the baseline; with K = 1 they fall back to the tracker δ."""
    loo_tracker_weight: float = 0.0
    """loo/adaptive with K >= 2: baseline = (1 - w)·mean of the other draws' residuals + w·δ (0 = pure leave-one-out)."""
    adaptive_beta: float = 0.999
    """adaptive: decay of the per-logit second moment of the update (past steps only), in [0, 1)."""
    adaptive_eps: float = 1e-2
    """adaptive: floor of the per-logit divisor sqrt(v) + eps, in update units (advantage x score)."""
    layer_credit: float = 0.0
    """λ of the layer-local credit (N = 2): logits also move by −λ·∇ of each layer's expected reconstruction
    error relative to its dense output, on the step's first sampled forward (docs/estimators.md). 0 = off."""
    layer_credit_every: int = 1
    """Layer credit on every k-th step only (its cost is elementwise over every masked weight: amortise it)."""
    lr_schedule: LrSchedule = "constant"
    """Step-size schedule over train.steps: constant | cosine | linear (decay to lr_final_ratio·lr), after warmup."""
    lr_final_ratio: float = 0.1
    """cosine/linear: lr at the last step as a fraction of train.lr."""
    lr_warmup_steps: int = 0
    """Linear warmup of the step size over the first K steps (any schedule)."""
    tracker_order: TrackerOrder = "use_then_refresh"
    """use_then_refresh: advantage r - delta_prev, then refresh (exactly unbiased);
    refresh_then_use: the reference script's order."""
    advantage_norm: AdvantageNorm = "none"
    """none: the paper's plain update | rms: divide advantages by their running RMS | clip: clip |a| to advantage_clip."""
    advantage_clip: float = 0.0
    """0 = no clip. With advantage_norm = clip: the bound on |a| in loss units (required, e.g. 0.02).
    With rms: the bound on |a / rms| (e.g. 3). With none it would do nothing, so it is refused."""
    seed: int = 0
    """Seeds the data order and the counter-based mask sampler; same seed + world size = same masks."""
    baseline: Literal["precompute", "online"] = "precompute"
    """precompute: f(m0) per sample id, cached once | online: a second forward with m0 every step."""
    max_bad_steps: int = 5
    """Consecutive non-finite-loss steps (skipped on all ranks) before the run stops with a checkpoint."""
    max_deviation: float = 0.0
    """Guard: if the fraction of groups whose sample differs from the prior mask exceeds this, halve lr
    (0 = off)."""
    max_abs_advantage: float = 0.0
    """Guard: if the advantage before conditioning, |r - delta| in loss units, exceeds this on any rank,
    halve lr from the next step on, for the rest of the run (0 = off)."""
    eval_every: int = 0
    """Held-out evaluation of the final (top-N) mask every K steps (0 = off); keeps the best checkpoint."""
    eval_source: str = ""
    """Held-out text for the periodic evaluation (same source formats as data.source)."""
    eval_tokens: int = 16384
    """Held-out tokens per periodic evaluation."""
    eval_seqlen: int = 512
    """Window length of the periodic evaluation."""
    eval_at_start: bool = False
    """With eval_every: also evaluate the prior's final mask before the first step (a curve's first point)."""


@dataclass
class ZeroConfig:
    param_persistence_threshold: int = 100_000
    """Params with fewer elements are not partitioned (DeepSpeed's stage3_param_persistence_threshold).
    Tests use 0 so tiny models are really partitioned."""
    prefetch_bucket_size: int = 50_000_000
    """stage3_prefetch_bucket_size (elements)."""
    max_live_parameters: int = 1_000_000_000
    """stage3_max_live_parameters (elements)."""
    hpz_partition_size: int = 1
    """ZeRO++ hierarchical partitioning: secondary copy of the frozen weights within groups of this many
    ranks (set to GPUs per node on multi-node runs; 1 = off)."""
    timeout_s: int = 600
    """Collective timeout: a dead rank fails the job after this many seconds."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """auto (nccl with CUDA, gloo on CPU) | nccl | gloo."""


@dataclass
class CheckpointConfig:
    every: int = 50
    """Save every K steps (and at the end, and when the run stops on a guard)."""
    keep_last: int = 3
    """Keep the last K step directories (the best one by eval is kept too)."""
    resume: bool = False
    """Continue from <run_dir>/checkpoints/latest (same as the --resume flag)."""


@dataclass
class MetricsConfig:
    tensorboard: bool = True
    """Write TensorBoard events to <run_dir>/tb (rank 0)."""
    jsonl: bool = True
    """Write one JSON line per logged step to <run_dir>/metrics.jsonl (rank 0)."""
    log_every: int = 1
    """Log metrics every K steps."""
    progress: bool = True
    """Show a tqdm progress line on rank 0."""
    mask_stats_every: int = 50
    """Every K steps also log the mean per-group mask entropy (0 = off). A full pass over the logits
    that costs about half a training step on CPU, hence not every step."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def validate(self) -> Config:
        """Cross-field checks; raises ValueError naming the field. Returns self."""
        parse_pattern(self.mask.pattern)
        for section in SECTIONS:
            obj = getattr(self, section)
            for key, annotation in _field_types(type(obj)).items():
                if typing.get_origin(annotation) is Literal:
                    _choice(f"{section}.{key}", getattr(obj, key), typing.get_args(annotation))
        _positive("data.seqlen", self.data.seqlen)
        _positive("data.num_samples", self.data.num_samples)
        _positive("data.batch_size", self.data.batch_size)
        _positive("mask.init_scale", self.mask.init_scale)
        _positive("mask.warm_start_samples", self.mask.warm_start_samples)
        _positive("checkpoint.every", self.checkpoint.every)
        _positive("checkpoint.keep_last", self.checkpoint.keep_last)
        _positive("metrics.log_every", self.metrics.log_every)
        _positive("zero.timeout_s", self.zero.timeout_s)
        _positive("zero.hpz_partition_size", self.zero.hpz_partition_size)
        if self.train.steps <= 0:
            raise ValueError(f"train.steps must be > 0 (the step to train up to), got {self.train.steps}; "
                             "to write the prior mask without training use maskpro-prior")
        if not 0.0 <= self.train.alpha < 1.0:
            raise ValueError(f"train.alpha must be in [0, 1), got {self.train.alpha}")
        if self.train.lr < 0:
            raise ValueError(f"train.lr must be >= 0, got {self.train.lr}")
        if self.train.advantage_clip < 0:
            raise ValueError(f"train.advantage_clip must be >= 0 (0 = no clip), got {self.train.advantage_clip}")
        if not 1 <= self.train.masks_per_step <= 64:
            raise ValueError(f"train.masks_per_step must be in 1..64 (forwards per rank and step), "
                             f"got {self.train.masks_per_step}")
        for name in ("loo_tracker_weight", "lr_final_ratio"):
            if not 0.0 <= getattr(self.train, name) <= 1.0:
                raise ValueError(f"train.{name} must be in [0, 1], got {getattr(self.train, name)}")
        if not 0.0 <= self.train.adaptive_beta < 1.0:
            raise ValueError(f"train.adaptive_beta must be in [0, 1), got {self.train.adaptive_beta}")
        if self.train.adaptive_eps <= 0:
            raise ValueError(f"train.adaptive_eps must be > 0 (it floors a divisor), got {self.train.adaptive_eps}")
        if self.train.layer_credit_every < 1:
            raise ValueError(f"train.layer_credit_every must be >= 1, got {self.train.layer_credit_every}")
        if self.train.layer_credit < 0 or (self.train.layer_credit > 0 and self.mask.n != 2):
            raise ValueError(f"train.layer_credit must be >= 0 and needs mask.n = 2; got {self.train.layer_credit} "
                             f"with mask.n = {self.mask.n}")
        if self.train.lr_warmup_steps < 0:
            raise ValueError(f"train.lr_warmup_steps must be >= 0, got {self.train.lr_warmup_steps}")
        if self.train.advantage_norm == "clip" and self.train.advantage_clip <= 0:
            raise ValueError("train.advantage_clip must be > 0 when train.advantage_norm = clip (the bound on |a|, "
                             "loss units, e.g. 0.02)")
        if self.train.advantage_norm == "none" and self.train.advantage_clip > 0:
            raise ValueError(f"train.advantage_clip = {self.train.advantage_clip} has no effect with "
                             "train.advantage_norm = none; remove it, or choose advantage_norm = clip (bound on |a|, "
                             "loss units) or rms (bound on |a / rms|)")
        if self.train.eval_every and not self.train.eval_source:
            raise ValueError("train.eval_every > 0 needs train.eval_source (a held-out text file)")
        if self.data.max_documents < 0:
            raise ValueError(f"data.max_documents must be >= 0, got {self.data.max_documents}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def dump_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} = {value!r} is not allowed; choose one of {', '.join(allowed)}")


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


SECTIONS = tuple(f.name for f in dataclasses.fields(Config))


def _field_types(cls: type) -> dict[str, object]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(where: str, value: object, annotation: object) -> object:
    """Check ``value`` against a field annotation; ints are accepted for floats (YAML writes 50 not 50.0)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(annotation):
            try:
                return _coerce(where, value, option)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0])
    if annotation is type(None):
        if value is None:
            return None
        raise ValueError(f"{where}: expected null, got {value!r}")
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(f"{where}[{i}]", v, item_type) for i, v in enumerate(value)]
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {type(value).__name__} {value!r}")
        return value
    if origin is Literal:  # the allowed values are checked by Config.validate, for every way a value is set
        if isinstance(value, bool) and str(value).lower() in typing.get_args(annotation):
            return str(value).lower()  # YAML reads `true`/`false` as booleans
        return _coerce(where, value, type(typing.get_args(annotation)[0]))
    if annotation is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. a path or name that YAML read as a number
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"{where}: unsupported annotation {annotation!r}")  # internal: a new field type


def _apply(config: Config, section: str, key: str, value: object) -> None:
    if section not in SECTIONS:
        raise ValueError(f"unknown config section {section!r}; sections are: {', '.join(SECTIONS)}")
    section_obj = getattr(config, section)
    types_ = _field_types(type(section_obj))
    if key not in types_:
        raise ValueError(f"unknown config key {section}.{key}; keys of {section} are: {', '.join(types_)}")
    setattr(section_obj, key, _coerce(f"{section}.{key}", value, types_[key]))


def from_dict(raw: dict | None) -> Config:
    """Build a Config from a nested dict (missing keys keep their defaults); validates."""
    config = Config()
    if raw is None:
        return config.validate()
    if not isinstance(raw, dict):
        raise ValueError(f"config must be a mapping of sections, got {type(raw).__name__}")
    for section, values in raw.items():
        if section not in SECTIONS:
            raise ValueError(f"unknown config section {section!r}; sections are: {', '.join(SECTIONS)}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ValueError(f"config section {section!r} must be a mapping, got {type(values).__name__}")
        for key, value in values.items():
            _apply(config, section, key, value)
    return config.validate()


def parse_overrides(args: list[str]) -> list[tuple[str, str, object]]:
    """``--section.key=value`` (or ``--section.key value``) -> (section, key, parsed value).

    Values are parsed with yaml.safe_load so ``--train.lr=100`` is a number and
    ``--model.exclude='[lm_head, mlp]'`` a list; strings that YAML reads otherwise stay strings.
    """
    out = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ValueError(f"config override {arg!r} must look like --section.key=value")
        if "=" in arg:
            name, text = arg[2:].split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ValueError(f"config override {arg!r} has no value")
            name, text = arg[2:], args[i + 1]
            i += 1
        section, key = name.split(".", 1)
        try:
            value = safe_load_yaml(text) if text != "" else ""
        except yaml.YAMLError:
            value = text
        out.append((section, key, value))
        i += 1
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """YAML file (optional) then overrides; overrides beat the file. Validates the result."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            raw = safe_load_yaml(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({e})") from e
    config = from_dict(raw)
    for section, key, value in parse_overrides(overrides or []):
        _apply(config, section, key, value)
    return config.validate()
