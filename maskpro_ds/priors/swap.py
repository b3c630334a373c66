"""The swap prior: a layer-wise local search over strict N:M masks, weights never changed.

For each Linear it minimises the output reconstruction error of the mask alone,
‖X (W ⊙ m − W)ᵀ‖² = Σ_rows zᵀ H z with z the pruned part of a row and H = XᵀX from calibration
activations (masks/local_search.py), starting from another prior's mask.

Block by block, one decoder block resident (lazy loading, as the other calibrated priors):
1. a probe forward on the first micro-batch finds which target Linears read the same tensor
   (q/k/v share their input, gate/up theirs): one H per distinct input, in call order;
2. for each input in turn, the block runs on the held inputs until that input exists (a pre-hook
   on the first Linear reading it accumulates H and stops the forward); every Linear reading it is
   searched, and H is freed before the next one: one H in memory at a time;
3. the block's outputs become the next block's inputs.

Calibration modes (``--swap-calib``):
- ``dense``: every H comes from the dense model's activations; the last input's pass runs the
  whole dense block and its outputs feed the next block (the cheaper mode: no extra forward);
- ``sequential``: the activations of the already-masked model: earlier blocks and the earlier
  Linears of the same block run with their searched masks (W ⊙ m), and a last forward with the
  whole block masked feeds the next block. The target is the layer's own output on those inputs,
  or with ``--swap-target dense`` the dense model's output on the dense inputs (a second stream of
  activations runs beside, and the objective gains a linear term; _InputStats).

Starting masks (``--swap-start``), computed in the same pass from the same activations:
``magnitude``, ``wanda`` (|W|·‖X_j‖₂), ``sparsegpt`` (its mask, from the same H), or a path: a mask
artifact directory, or a pruned checkpoint read as ``--method from-checkpoint`` reads it.

The rows of each Linear are split over ranks when launched with several (priors/swap_ranks.py);
every rank returns all masks and rank 0 writes the artifact.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from maskpro_ds.masks.local_search import SearchConfig, SearchStats
from maskpro_ds.masks.nm import magnitude_prior, topn_mask
from maskpro_ds.models.lazy import ModelHandle
from maskpro_ds.models.targets import targets_in_block
from maskpro_ds.priors.block_inputs import Call, block_forward, record_block_inputs
from maskpro_ds.priors.calibration import ColumnSumSq, Hessian
from maskpro_ds.priors.swap_ranks import RowSplit
from maskpro_ds.priors.wanda import wanda_scores

log = logging.getLogger(__name__)

STARTS = ("magnitude", "wanda", "sparsegpt")
CALIB_MODES = ("dense", "sequential")
TARGETS = ("own", "dense")


@dataclass
class SwapOptions:
    """The swap prior's own options (CLI: --swap-start, --swap-sweeps, --swap-tol, --swap-calib,
    --swap-target, --swap-row-chunk; SparseGPT's --blocksize/--percdamp apply to a sparsegpt start)."""

    start: str = "wanda"
    calib: str = "dense"
    target: str = "own"  # own: W X on the inputs the layer sees; dense: the dense model's output (sequential)
    search: SearchConfig = field(default_factory=SearchConfig)
    sparsegpt_blocksize: int = 128
    sparsegpt_percdamp: float = 0.01

    def check(self, m: int) -> None:
        if self.start not in STARTS and not Path(self.start).is_dir():
            raise ValueError(f"--swap-start must be one of {', '.join(STARTS)} or a directory (a mask artifact or "
                             f"a pruned checkpoint); got {self.start!r}")
        if self.calib not in CALIB_MODES:
            raise ValueError(f"--swap-calib must be dense or sequential; got {self.calib!r}")
        if self.target not in TARGETS:
            raise ValueError(f"--swap-target must be own or dense; got {self.target!r}")
        if self.target == "dense" and self.calib != "sequential":
            raise ValueError("--swap-target dense needs --swap-calib sequential (with dense calibration the "
                             "layer's own output on its inputs already is the dense model's)")
        self.search.check(m)


class _Stop(Exception):
    """Raised by a pre-hook once the input it waits for has been seen: the rest of the block is not needed."""


class _InputStats:
    """H of one Linear input, plus Wanda's column sums of squares when the start needs them, plus
    D = (2/n) Σ x (x − x_dense)ᵀ when the target is the dense model's output (then the objective
    gains the linear term −2 zᵀ D w: ‖X W̃ᵀ − X_dense Wᵀ‖² = zᵀHz − 2 zᵀ D w + const, W̃ = W ⊙ m)."""

    def __init__(self, in_features: int, device, column_sums: bool, dense_target: bool):
        self.hessian = Hessian(in_features, device)
        self.column = ColumnSumSq(in_features, device) if column_sums else None
        self.cross = torch.zeros(in_features, in_features, device=device) if dense_target else None

    def add(self, x: torch.Tensor, x_dense: torch.Tensor | None = None) -> None:
        if self.cross is not None:
            x2 = x.reshape(-1, x.shape[-1]).float()
            d2 = x2 - x_dense.reshape(-1, x.shape[-1]).float()
            seen, new = self.hessian.tokens, self.hessian.tokens + x2.shape[0]
            self.cross *= seen / new  # the same running mean as H's
            self.cross.addmm_(x2.t(), d2, alpha=2.0 / new)
        self.hessian.add(x)
        if self.column is not None:
            self.column.add(x)

    def linear(self, weight: torch.Tensor) -> torch.Tensor | None:
        """B = W Dᵀ (rows b_r = D w_r), or None for the layer's own output as target."""
        return None if self.cross is None else weight @ self.cross.T


def input_groups(block: nn.Module, linears: dict[str, nn.Linear], first: tuple[torch.Tensor, Call]) -> list[list[str]]:
    """Target Linears grouped by the tensor they read, groups and members in call order."""
    seen: list[tuple[str, torch.Tensor]] = []
    hooks = [lin.register_forward_pre_hook(lambda _m, args, name=name: seen.append((name, args[0])))
             for name, lin in linears.items()]
    try:
        block_forward(block, *first)
    finally:
        for hook in hooks:
            hook.remove()
    groups: list[list[str]] = []
    inputs: list[torch.Tensor] = []
    for name, x in seen:
        if any(name in g for g in groups):
            continue  # a Linear called twice keeps its first input
        for g, x0 in zip(groups, inputs, strict=True):
            if x is x0:
                g.append(name)
                break
        else:
            groups.append([name])
            inputs.append(x)
    missing = sorted(set(linears) - {name for g in groups for name in g})
    if missing:
        raise ValueError(f"{missing[0]}: this Linear is never called by its block's forward, so it has no "
                         "calibration inputs; exclude it (--exclude)")
    return groups


def _leader_input(block: nn.Module, leader: nn.Linear, hidden: torch.Tensor, call: Call,
                  whole: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the block on one micro-batch: ``leader``'s input, and the block's output when ``whole``
    (otherwise the forward stops at ``leader``: the rest of the block is not needed)."""
    seen: list[torch.Tensor] = []

    def hook(_module, args):
        seen.append(args[0])
        if not whole:
            raise _Stop

    handle = leader.register_forward_pre_hook(hook)
    try:
        out = block_forward(block, hidden, call)
    except _Stop:
        out = None
    finally:
        handle.remove()
    return seen[0], out


def _set_weights(linears: dict[str, nn.Linear], weights: dict[str, torch.Tensor]) -> None:
    for name, weight in weights.items():
        linears[name].weight.data = weight


class _Starts:
    """The starting mask of each Linear, from the statistics of its input (or from a file)."""

    def __init__(self, options: SwapOptions, n: int, m: int, shapes: dict[str, tuple[int, int]]):
        self.options, self.n, self.m = options, n, m
        self.given: dict[str, torch.Tensor] | None = None
        self.source_info: dict | None = None
        if options.start not in STARTS:
            self.given, self.source_info = _masks_from_path(Path(options.start), shapes, n, m)

    @property
    def needs_column_sums(self) -> bool:
        return self.options.start == "wanda"

    def mask(self, name: str, weight: torch.Tensor, stats: _InputStats) -> torch.Tensor:
        start = self.options.start
        if self.given is not None:
            return self.given[name].to(weight.device)
        if start == "magnitude":
            return magnitude_prior(weight, self.n, self.m)
        if start == "wanda":
            return topn_mask(wanda_scores(weight, stats.column.sumsq), self.n, self.m)
        from maskpro_ds.priors.sparsegpt import sparsegpt_prune

        mask, _ = sparsegpt_prune(weight, stats.hessian.h, self.n, self.m, self.options.sparsegpt_blocksize,
                                  self.options.sparsegpt_percdamp, name=name)
        return mask


def _search_weight(handle: ModelHandle, name: str, loaded: torch.Tensor) -> torch.Tensor:
    """The weight the search scores masks against, fp32: the ORIGINAL one the mask will be applied to.

    Lazy mode reads it from the files, so a bf16 forward (``--dtype bf16``, ~3.5x faster on CPU)
    still searches against the full-precision weights; eager mode has only the loaded copy."""
    if handle.files is not None and name + ".weight" in handle.files:
        return handle.files.get(name + ".weight").to(device=loaded.device, dtype=torch.float32)
    return loaded.float()


def _masks_from_path(path: Path, shapes: dict[str, tuple[int, int]], n: int, m: int) -> tuple[dict, dict]:
    """Starting masks from a mask artifact directory or a pruned checkpoint directory."""
    from maskpro_ds.formats.mask_artifact import MASK_MANIFEST, read_mask_artifact

    if (path / MASK_MANIFEST).is_file():
        art = read_mask_artifact(path)
        if (art.n, art.m) != (n, m):
            raise ValueError(f"--swap-start {path}: the artifact is {art.pattern}, the run is {n}:{m}")
        missing = [name for name in shapes if name not in art.shapes]
        if missing:
            raise ValueError(f"--swap-start {path}: no mask for {missing[0]} ({len(missing)} targets missing); "
                             "make the start with the same --include/--exclude")
        masks = {}
        for name, shape in shapes.items():
            if tuple(art.shapes[name]) != tuple(shape):
                raise ValueError(f"--swap-start {path}: {name} is {list(art.shapes[name])} there, {list(shape)} here")
            masks[name] = art.layer_mask(name)
        return masks, {"artifact": str(path), "method": art.meta.get("method"),
                       "base_fingerprint": art.base_fingerprint}
    from maskpro_ds.priors.from_checkpoint import masks_from_checkpoint

    masks, info = masks_from_checkpoint(path, shapes, n, m)
    return masks, {"checkpoint": info}


def swap_masks(
    handle: ModelHandle,
    tokens: torch.Tensor,
    targets: list[str],
    n: int,
    m: int,
    options: SwapOptions,
    split: RowSplit | None = None,
    batch_size: int = 8,
) -> tuple[dict[str, torch.Tensor], dict]:
    """name -> bool [out, in] mask for every target, and what the search did (for the manifest)."""
    options.check(m)
    split = split or RowSplit()
    shapes = {t: tuple(handle.model.get_submodule(t).weight.shape) for t in targets}
    starts = _Starts(options, n, m, shapes)
    masks: dict[str, torch.Tensor] = {}
    input_stats: dict[str, SearchStats] = {}  # per distinct input, named by the Linears reading it
    timing = {"forward_s": 0.0, "start_s": 0.0, "search_s": 0.0}
    sequential, dense_target = options.calib == "sequential", options.target == "dense"
    with torch.no_grad():
        t0 = time.perf_counter()
        inputs = record_block_inputs(handle, tokens, batch_size)  # each block's own call arguments
        states = inputs.hidden
        # With dense targets a second stream of activations runs beside: the dense model's.
        dense_states = list(states) if dense_target else None
        timing["forward_s"] += time.perf_counter() - t0
        for index in range(len(handle.layers)):
            t_block = time.perf_counter()
            block = handle.materialize_block(index)
            names = targets_in_block(targets, f"{handle.layers_prefix}.{index}")
            calls = inputs.calls[index]
            linears = {name: handle.model.get_submodule(name) for name in names}
            originals = {name: lin.weight.data for name, lin in linears.items()}
            masked: dict[str, torch.Tensor] = {}  # W ⊙ m of the Linears of this block searched so far
            outputs: list[torch.Tensor] = []
            t0 = time.perf_counter()
            groups = input_groups(block, linears, (states[0], calls[0])) if names else []
            timing["forward_s"] += time.perf_counter() - t0
            for gi, group in enumerate(groups):
                # Dense calibration: the last input's pass runs the whole dense block, whose outputs
                # feed the next block.
                whole = not sequential and gi == len(groups) - 1
                t0 = time.perf_counter()
                leader = linears[group[0]]
                stats = _InputStats(leader.in_features, originals[group[0]].device, starts.needs_column_sums,
                                    dense_target)
                for k, (hidden, call) in enumerate(zip(states, calls, strict=True)):
                    x, out = _leader_input(block, leader, hidden, call, whole)
                    x_dense = None
                    if dense_target:
                        _set_weights(linears, originals)
                        x_dense, _ = _leader_input(block, leader, dense_states[k], call, whole=False)
                        _set_weights(linears, masked)
                    stats.add(x, x_dense)
                    if out is not None:
                        outputs.append(out)
                t1 = time.perf_counter()
                layers = {}
                for name in group:
                    weight = _search_weight(handle, name, originals[name])
                    layers[name] = (weight, starts.mask(name, weight, stats), stats.linear(weight))
                t2 = time.perf_counter()
                found, input_stats["+".join(group)] = split.search(layers, stats.hessian.h, n, m, options.search)
                timing["forward_s"] += t1 - t0
                timing["start_s"] += t2 - t1
                timing["search_s"] += time.perf_counter() - t2
                del stats, layers  # one H at a time
                for name, mask in found.items():
                    masks[name] = mask.cpu()
                    if sequential:  # later inputs of this block see the searched mask
                        masked[name] = torch.where(mask, originals[name], 0)
                _set_weights(linears, masked)
            t0 = time.perf_counter()
            if index + 1 < len(handle.layers):
                if not outputs:  # sequential mode, or a block without targets
                    outputs = [block_forward(block, hidden, call) for hidden, call in zip(states, calls, strict=True)]
                states = outputs
                if dense_target:
                    _set_weights(linears, originals)
                    dense_states = [block_forward(block, h, call) for h, call in zip(dense_states, calls, strict=True)]
            inputs.calls[index] = []  # this block's arguments are no longer needed
            timing["forward_s"] += time.perf_counter() - t0
            _set_weights(linears, originals)
            handle.release_block(index)
            block_stats = [input_stats["+".join(group)] for group in groups]
            changed = sum(st.groups_changed for st in block_stats)
            total = sum(st.groups for st in block_stats)
            log.info("block %d/%d: %d layers, %d input(s), %.1f%% groups changed, %.1fs", index + 1,
                     len(handle.layers), len(names), len(groups), 100.0 * changed / max(total, 1),
                     time.perf_counter() - t_block)
    missing = [t for t in targets if t not in masks]
    assert not missing, f"targets outside the decoder blocks were not visited: {missing[:4]}"
    return masks, _summary(options, input_stats, timing, split, starts)


def _summary(options: SwapOptions, input_stats: dict[str, SearchStats], timing: dict, split: RowSplit,
             starts: _Starts) -> dict:
    groups = sum(s.groups for s in input_stats.values())
    changed = sum(s.groups_changed for s in input_stats.values())
    sweeps = [k for s in input_stats.values() for k in s.chunk_sweeps]
    return {
        "start": options.start,
        "start_source": starts.source_info,
        "calib_mode": options.calib,
        "target": options.target,
        "max_sweeps": options.search.max_sweeps,
        "tol": options.search.tol,
        "row_chunk": options.search.row_chunk,
        "blocksize": options.search.blocksize,
        "exhaustive_limit": options.search.exhaustive_limit,
        "ranks": split.world,
        "groups": groups,
        "groups_changed": changed,
        "groups_changed_fraction": round(changed / max(groups, 1), 6),
        "sweeps_max": max(sweeps, default=0),
        "sweeps_mean": round(sum(sweeps) / max(len(sweeps), 1), 3),
        "timing_s": {k: round(v, 3) for k, v in timing.items()},
        # Per distinct input (the Linears reading it, joined by "+"): the summed objective before the
        # first sweep and after each sweep (H is the per-token mean of 2xxᵀ), groups changed per sweep.
        "inputs": {name: {"objective": s.objective, "changed_per_sweep": s.changed, "groups": s.groups,
                          "groups_changed": s.groups_changed} for name, s in input_stats.items()},
    }


@dataclass
class SwapPriorOptions:
    """``maskpro-prior --method swap`` flags (one per field); :class:`SwapOptions` is what the search reads."""

    swap_start: str = field(default="wanda", metadata={
        "help": "starting mask: magnitude | wanda | sparsegpt | a mask artifact or pruned checkpoint dir"})
    swap_sweeps: int = field(default=5, metadata={"help": "most sweeps over every group"})
    swap_tol: float = field(default=1e-3, metadata={
        "help": "stop when a sweep lowers the objective by less than this fraction"})
    swap_calib: str = field(default="dense", metadata={
        "help": "dense: activations of the dense model; sequential: of the already-masked one"})
    swap_target: str = field(default="own", metadata={
        "help": "own: each layer's output on its inputs; dense (with sequential): the dense model's output"})
    swap_row_chunk: int = field(default=1024, metadata={
        "help": "rows searched together, the unit of the split over ranks"})

    def search_options(self) -> SwapOptions:
        return SwapOptions(start=self.swap_start, calib=self.swap_calib, target=self.swap_target,
                           search=SearchConfig(max_sweeps=self.swap_sweeps, tol=self.swap_tol,
                                               row_chunk=self.swap_row_chunk))


class SwapPrior:
    """The registered ``swap`` method: rows split over the launcher's ranks, rank 0 writes the artifact."""

    name = "swap"
    needs_calibration = True
    Options = SwapPriorOptions
    multi_rank = True  # make.py lets only rank 0 write; the CLI ends every rank like training does

    def masks(self, inputs, options: SwapPriorOptions) -> tuple[dict, dict]:
        search = options.search_options()
        search.check(inputs.m)  # before joining a process group: a bad option fails every rank alike, at once
        split = RowSplit.from_launcher()
        try:
            masks, meta = swap_masks(inputs.handle, inputs.tokens, inputs.targets, inputs.n, inputs.m, search, split,
                                     batch_size=inputs.batch_size)
        finally:
            split.close()
        return masks, {"swap": meta}
