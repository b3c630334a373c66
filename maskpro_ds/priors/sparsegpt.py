"""The SparseGPT prior (Frantar & Alistarh, 2023) for N:M: OBS pruning with weight reconstruction.

For one Linear with weight W [rows, cols] and calibration inputs X, the layer-wise objective
||WX − ŴX||² has the same Hessian for every row, H = 2 X Xᵀ (here the per-token mean, with 1 % of
its mean diagonal added as dampening). Columns are visited left to right. Removing weight w_j while
the columns F = {j, j+1, ...} are still free costs w_j² / [H_F⁻¹]_jj and is best compensated by
moving the free weights of the row by −(w_j / [H_F⁻¹]_jj) · [H_F⁻¹]_{j,F}. Every row of the
successive inverses H_F⁻¹ is, up to a scale, a row of the upper Cholesky factor U of H⁻¹
([H_F⁻¹]_{j,F} = U_jj · U_{j,F}), so one factorisation serves all columns: err = w_j / U_jj,
W_{:,F} −= err ⊗ U_{j,F}. At the first column of each group of M the N kept weights are the ones
with the largest w² / U_kk² (= w² / [H⁻¹]_kk, ties to the lower column), taken from the weights as
updated so far. Updates are applied lazily in column blocks of 128: inside a block column by
column, to the rest of the matrix once per block (E · U_{block, rest}).

Only the mask is kept as the prior; MaskPro applies it to the original weights (docs/method.md §2). The
updated weights are used for the sequential calibration of later blocks, as the reference does, and
``--save-weights DIR`` also writes them (one safetensors file per decoder block, streamed, plus
``weights.json``): the one-shot baseline "SparseGPT with its weight update" that users compare
against, loaded with :func:`maskpro_ds.eval.masked_model.apply_weight_files`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from maskpro_ds.formats.atomic import atomic_directory
from maskpro_ds.formats.hashing import model_fingerprint
from maskpro_ds.formats.mask_artifact import read_mask_artifact
from maskpro_ds.masks.nm import topn_mask
from maskpro_ds.models.lazy import ModelHandle
from maskpro_ds.priors.base import PriorInputs
from maskpro_ds.priors.calibration import BlockResult, Hessian, run_blockwise


def _inverse_cholesky_upper(h: torch.Tensor, name: str) -> torch.Tensor:
    """Upper Cholesky factor U of H⁻¹ (H⁻¹ = Uᵀ U)."""
    lower, info = torch.linalg.cholesky_ex(h)
    if info.item() != 0:
        raise ValueError(
            f"{name}: the calibration Hessian is not positive definite even after dampening; "
            "raise --percdamp or --nsamples"
        )
    h_inv = torch.cholesky_inverse(lower)
    return torch.linalg.cholesky(h_inv, upper=True)


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    n: int,
    m: int,
    blocksize: int = 128,
    percdamp: float = 0.01,
    name: str = "layer",
    fixed_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` [rows, cols] to N:M with SparseGPT; returns (bool mask, updated weight).

    The updated weight has zeros exactly where the mask is False and is in ``weight``'s dtype. With
    ``fixed_mask`` (bool [rows, cols], strict N:M) the mask is not chosen but given: the same OBS
    update then reconstructs the kept weights for that mask (e.g. a learned one).
    """
    if blocksize % m != 0:
        raise ValueError(f"--blocksize {blocksize} must be a multiple of M={m} so no group straddles two blocks")
    rows, cols = weight.shape
    if cols % m != 0 or tuple(hessian.shape) != (cols, cols):
        raise ValueError(f"{name}: weight {tuple(weight.shape)} and Hessian {tuple(hessian.shape)} do not fit N:M={n}:{m}")
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    # Inputs that are always zero carry no information: pin their Hessian entry, drop their weight.
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += percdamp * torch.mean(torch.diag(h)) * torch.eye(cols, dtype=h.dtype, device=h.device)
    u = _inverse_cholesky_upper(h, name)

    mask = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)
    if fixed_mask is not None and tuple(fixed_mask.shape) != (rows, cols):
        raise ValueError(f"{name}: the given mask is {list(fixed_mask.shape)}, the weight {[rows, cols]}")
    for b0 in range(0, cols, blocksize):
        b1 = min(b0 + blocksize, cols)
        w_blk = w[:, b0:b1].clone()
        u_blk = u[b0:b1, b0:b1]
        u_diag = torch.diag(u_blk)
        err_blk = torch.zeros_like(w_blk)
        for i in range(b1 - b0):
            if i % m == 0 and fixed_mask is not None:
                mask[:, b0 + i : b0 + i + m] = fixed_mask[:, b0 + i : b0 + i + m].to(w.device)
            elif i % m == 0:
                score = w_blk[:, i : i + m].square() / u_diag[i : i + m].square().unsqueeze(0)
                mask[:, b0 + i : b0 + i + m] = topn_mask(score, n, m)
            col = w_blk[:, i]
            err = torch.where(mask[:, b0 + i], 0.0, col) / u_blk[i, i]
            w_blk[:, i:] -= err.unsqueeze(1) * u_blk[i, i:].unsqueeze(0)
            err_blk[:, i] = err
        w[:, b0:b1] = w_blk
        w[:, b1:] -= err_blk @ u[b0:b1, b1:]
    # The update leaves pruned slots at ~0 up to rounding; make them exactly +0.0.
    w = torch.where(mask, w, 0.0)
    return mask, w.to(weight.dtype)


def sparsegpt_masks(
    handle: ModelHandle,
    tokens: torch.Tensor,
    targets: list[str],
    n: int,
    m: int,
    blocksize: int = 128,
    percdamp: float = 0.01,
    batch_size: int = 8,
    save_weights: str | Path = "",
    fixed_masks: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """name -> bool [out, in] SparseGPT N:M mask for every target, computed block by block; with
    ``save_weights`` the reconstructed weights go to that directory too (written whole or not at all)."""

    def make_stat(lin: nn.Linear) -> Hessian:
        return Hessian(lin.in_features, lin.weight.device)

    def prune(name: str, lin: nn.Linear, stat: Hessian) -> BlockResult:
        fixed = None
        if fixed_masks is not None:
            if name not in fixed_masks:
                raise ValueError(f"--fixed-mask: no mask for layer {name}; use an artifact made for the same targets")
            fixed = fixed_masks[name]
        mask, updated = sparsegpt_prune(lin.weight.data, stat.h, n, m, blocksize, percdamp, name=name, fixed_mask=fixed)
        return BlockResult(mask=mask, pruned_weight=updated)

    if not save_weights:
        return run_blockwise(handle, tokens, targets, make_stat, prune, batch_size=batch_size)
    with atomic_directory(save_weights) as tmp:
        files: dict[str, str] = {}

        def write_block(index: int, weights: dict[str, torch.Tensor]) -> None:
            name = f"block-{index:05d}.safetensors"
            save_file({k: w.detach().contiguous().cpu() for k, w in weights.items()}, str(tmp / name),
                      metadata={"format": WEIGHTS_FORMAT})
            files.update({k: name for k in weights})

        masks = run_blockwise(handle, tokens, targets, make_stat, prune, batch_size=batch_size, on_block=write_block)
        (tmp / WEIGHTS_INDEX).write_text(json.dumps(
            {"format": WEIGHTS_FORMAT, "method": "sparsegpt", "pattern": f"{n}:{m}", "weight_map": files}, indent=1) + "\n")
    return masks


WEIGHTS_FORMAT = "maskpro_ds.pruned_weights"
WEIGHTS_INDEX = "weights.json"


@dataclass
class SparseGPTOptions:
    blocksize: int = field(default=128, metadata={"help": "SparseGPT column block size"})
    percdamp: float = field(default=0.01, metadata={"help": "SparseGPT dampening, fraction of mean diag(H)"})
    save_weights: str = field(default="", metadata={
        "help": "also write SparseGPT's reconstructed (pruned and updated) weights to this new directory, "
                "one safetensors file per block: the one-shot baseline with weights changed"})
    fixed_mask: str = field(default="", metadata={
        "help": "a mask artifact (e.g. an exported MaskPro mask) to use instead of choosing one: SparseGPT "
                "then only reconstructs the kept weights for it (with --save-weights)"})


def _fixed_masks(path: str, inputs: PriorInputs) -> dict[str, torch.Tensor] | None:
    """The masks of ``--fixed-mask`` by layer, checked against the pattern and the targets."""
    if not path:
        return None
    artifact = read_mask_artifact(path)
    artifact.verify()
    artifact.check_base(model_fingerprint(inputs.handle.model_dir))  # a mask made for this very model
    if (artifact.n, artifact.m) != (inputs.n, inputs.m):
        raise ValueError(f"--fixed-mask {path} is {artifact.n}:{artifact.m}, --pattern is {inputs.n}:{inputs.m}")
    missing = sorted(set(inputs.targets) - set(artifact.shapes))
    if missing:
        raise ValueError(f"--fixed-mask {path} has no mask for {missing[0]} (and {len(missing) - 1} more targets); "
                         "use an artifact made for the same model and targets")
    return {name: artifact.layer_mask(name) for name in inputs.targets}


class SparseGPTPrior:
    name = "sparsegpt"
    needs_calibration = True
    Options = SparseGPTOptions

    def masks(self, inputs: PriorInputs, options: SparseGPTOptions) -> tuple[dict[str, torch.Tensor], dict]:
        masks = sparsegpt_masks(inputs.handle, inputs.tokens, inputs.targets, inputs.n, inputs.m,
                                blocksize=options.blocksize, percdamp=options.percdamp, batch_size=inputs.batch_size,
                                save_weights=options.save_weights, fixed_masks=_fixed_masks(options.fixed_mask, inputs))
        return masks, {"sparsegpt": asdict(options)}
