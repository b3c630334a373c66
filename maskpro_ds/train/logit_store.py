"""The sharded logit store: who owns which groups, init from the prior, masks for every rank, update.

Every masked layer's ``G = out·in/M`` groups are cut into R contiguous, byte-aligned ranges
(checkpoint_format.split_groups); rank r owns range r of EVERY layer, as fp32 logits ``[g, M]`` (stored position-major, ``[M, g]``:
see :class:`ColumnLogits`). Only the owner reads or writes its logits.

Masks reach the ranks as bits. In the forward of layer l at step t, the owner draws, on its slice,
the mask of every rank r (counter-based sampler keyed by (seed, t, slot, l) at the groups' global
indices), packs each to 1 bit per weight, and one ``all_to_all`` gives every rank the R slices of
its own mask: R·d/(8R) bytes received per layer, against 2·d bytes for ZeRO-3's bf16 weight gather.
With K draws per rank and step (several masks on the same batch, ``draws``), forward d of rank r
uses slot r·K + d; K = 1 gives slot = rank, the keys of a one-draw run.

The update applies π ← π − η/(RK) Σ_s a_s ∇log P(m_s) to the slice over the R·K slots (rank-major).
It needs the masks drawn in the forwards: with ``cache_samples`` (default) each forward's packed
send buffer is kept until the update (K·d/8 bytes per rank over all layers: 13 MB per draw for a
106M-weight model, 8.75 GB per draw at 70B); without it they are drawn again (a pure function of
the same keys and the unchanged logits, so the bits are the same). No logit-sized tensor ever
crosses the network. An estimator with per-logit state passes an update ``rule`` (e.g.
masks/second_moment.py) that replaces the plain kernel.

For N = 2 the per-chunk work runs in two elementwise kernels (sampling.pair_code_block,
policy.update_final_block); ``kernels="auto"`` compiles them with torch.compile and keeps the
compiled ones only if they give the plain kernels' bits on a probe (see :func:`select_kernels`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import typing
from collections.abc import Iterator

import torch

from maskpro_ds import distributed
from maskpro_ds.config import KernelMode
from maskpro_ds.formats.checkpoint_format import split_groups
from maskpro_ds.masks.nm import pack_bits, unpack_bits
from maskpro_ds.masks.policy import (
    apply_update_,
    apply_update_codes_,
    final_mask,
    init_logits,
    top2_codes,
    update_final_block,
)
from maskpro_ds.masks.sampling import (
    codes_to_packed,
    key_scalar,
    packed_to_codes,
    pair_code_block,
    sample_codes,
    sample_masks,
)
from maskpro_ds.train.mask_modes import FinalMode, MaskMode, PriorMode, SampleMode

logger = logging.getLogger(__name__)

KERNEL_MODES = typing.get_args(KernelMode)
COMPILED_CHUNK_GROUPS = 1 << 16  # groups per compiled-kernel call (a 1 MB transposed copy); speed only
_compiled: dict[str, tuple] = {}  # device type -> (sample kernel, update kernel, name), once per process


@torch.no_grad()
def _probe_matches(sample_kernel, update_kernel, device: torch.device, slots: int, update_slots: int | None = None) -> bool:
    """True if the kernels give exactly the plain kernels' bits on a probe with hard cases.

    ``slots``: keys per sampling call; ``update_slots``: masks per update (default: ``slots``)."""
    update_slots = update_slots or slots
    gen = torch.Generator().manual_seed(1234)
    scales = torch.tensor([0.1, 1.0, 3.0, 30.0, 300.0]).repeat_interleave(820)[:4099]
    x = torch.randn(4099, 4, generator=gen) * scales[:, None]
    x[::7] = torch.tensor([10.0, 0.0, 10.0, 0.0]) + 0.01 * torch.randn(586, 4, generator=gen)
    x[::11] = 5.0  # ties
    x[::13, 2] = 1e4  # one dominant logit
    x = x.to(device)
    for g in (4099, 17, 2):
        xt = x[:g].t().contiguous()
        first = torch.tensor(77, dtype=torch.int64, device=device)
        # as many draws as the run makes (a kernel is specialised on that count)
        k_lo = torch.tensor([0xFFFFFFFF - 7 * s for s in range(slots)], dtype=torch.int64, device=device)
        k_hi = torch.tensor([0x12345678 ^ s for s in range(slots)], dtype=torch.int64, device=device)
        codes = pair_code_block(xt, first, k_lo, k_hi)
        if not torch.equal(sample_kernel(xt, first, k_lo, k_hi), codes):
            return False
        if update_slots != slots:  # the update's mask count (R·K), drawn with the plain kernel
            codes = torch.cat([codes] * -(-update_slots // slots))[:update_slots]
        w = torch.linspace(0.7, -1.3, update_slots, dtype=torch.float32, device=device)
        new, final = update_final_block(xt, codes, w)
        new_c, final_c = update_kernel(xt, codes, w)
        if not (torch.equal(new.view(torch.int32), new_c.view(torch.int32)) and torch.equal(final, final_c)):
            return False
    return True


def select_kernels(mode: str, device: torch.device | str = "cpu", slots: int | tuple[int, int] = 2) -> tuple:
    """(sample kernel, update kernel, "compiled" or "plain") for the N = 2 store.

    ``"plain"``: the eager torch kernels. ``"compiled"``: torch.compile'd copies, which must give
    the plain kernels' bits on a probe (else an error). ``"auto"``: compiled when that works, else
    plain with a warning. Either way every rank computes the same bits, so ranks, resumed runs and
    the in-process reference agree. Compiling takes ~15 s once per process (inductor's on-disk
    cache makes later processes faster); shapes are dynamic, so the smaller last chunk of a layer
    does not recompile. ``slots``: draws per sampling call (the world size) used by the probe, or
    (draws per sampling call, masks per update) when they differ (K masks per rank: R and R·K).
    """
    if mode not in KERNEL_MODES:
        raise ValueError(f"LogitStore kernels must be one of {KERNEL_MODES}, got {mode!r}")
    device = torch.device(device)
    if mode == "plain":
        return pair_code_block, update_final_block, "plain"
    if device.type not in _compiled:
        t0 = time.perf_counter()
        try:
            sample_kernel = torch.compile(pair_code_block, dynamic=True)
            update_kernel = torch.compile(update_final_block, dynamic=True)
            sample_slots, update_slots = (slots, slots) if isinstance(slots, int) else slots
            same = _probe_matches(sample_kernel, update_kernel, device, sample_slots, update_slots)
            problem = None if same else "compiled kernels differ from the plain ones in the last bit"
        except Exception as exc:  # noqa: BLE001 - any compiler/toolchain failure means: use plain kernels
            problem = f"torch.compile failed ({type(exc).__name__}: {exc})"
        if problem is None:
            logger.info("compiled the sampling and update kernels in %.1f s", time.perf_counter() - t0)
            _compiled[device.type] = (sample_kernel, update_kernel, "compiled")
        else:
            _compiled[device.type] = (pair_code_block, update_final_block, f"plain ({problem})")
    chosen = _compiled[device.type]
    if chosen[2] != "compiled":
        if mode == "compiled":
            raise RuntimeError(f"LogitStore kernels='compiled': {chosen[2]}; use kernels='plain' or 'auto'")
        logger.warning("using the plain sampling/update kernels: %s", chosen[2])
    return chosen


class ColumnLogits:
    """Every layer's logit slice as a ``[g, M]`` view of ``[M, g]`` storage (position-major).

    The N = 2 kernels take a chunk as M rows of g logits; with row-major ``[g, M]`` storage every
    chunk needed a transposing copy on the way in and again on the way out, about half the time of
    sampling and update on CPU. Stored position-major, a chunk is M contiguous runs (a plain copy).
    Callers index ``[g, M]`` as before; assigning a ``[g, M]`` tensor stores its transpose.
    """

    def __init__(self, columns: list[torch.Tensor]):
        self.columns = columns

    def __getitem__(self, layer: int) -> torch.Tensor:
        return self.columns[layer].t()

    def __setitem__(self, layer: int, rows: torch.Tensor) -> None:
        self.columns[layer] = rows.t().contiguous()

    def __len__(self) -> int:
        return len(self.columns)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (c.t() for c in self.columns)


class LogitStore:
    """This rank's logit slices of every masked layer, and the mask exchange built on them."""

    def __init__(self, names: list[str], shapes: list[tuple[int, int]], n: int, m: int, rank: int, world_size: int,
                 seed: int, device: torch.device | str = "cpu", *, cache_samples: bool = True, kernels: str = "auto",
                 draws: int = 1):
        self.names, self.shapes = list(names), [tuple(s) for s in shapes]
        self.n, self.m = n, m
        self.rank, self.world_size, self.seed = rank, world_size, seed
        if int(draws) < 1:
            raise ValueError(f"LogitStore draws (masks per rank and step) must be >= 1, got {draws}")
        self.draws = int(draws)
        self.device = torch.device(device)
        # Range boundaries on whole bytes of packed bits: a slice of g groups is g·M bits.
        self.align = 8 // math.gcd(8, m)
        self.ranges = [split_groups(out_f * in_f // m, world_size, self.align) for out_f, in_f in self.shapes]
        self.logits = ColumnLogits([
            torch.zeros((m, r[rank][1] - r[rank][0]), dtype=torch.float32, device=self.device) for r in self.ranges
        ])
        self.prior_bits: list[torch.Tensor | None] = [None] * len(names)
        self._active: MaskMode | None = None  # the mode of the forward running now (see drawing())
        if kernels not in KERNEL_MODES:
            raise ValueError(f"LogitStore kernels must be one of {KERNEL_MODES}, got {kernels!r}")
        self.kernel_mode = kernels
        self._kernels: tuple | None = None  # resolved at the first draw
        self.cache_samples = bool(cache_samples)
        self._sample_cache: dict[tuple[int, int], tuple[int, torch.Tensor]] = {}  # (layer, draw) -> (step, send buffer)

    # ------------------------------------------------------------------ layout
    def local_range(self, layer: int) -> tuple[int, int]:
        return self.ranges[layer][self.rank]

    @property
    def num_groups_total(self) -> int:
        """Groups of all masked layers together (every rank's slices)."""
        return sum(r[-1][1] for r in self.ranges)

    def num_local_groups(self) -> int:
        return sum(t.shape[0] for t in self.logits)

    def local_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.logits)

    def _slice_bytes(self, layer: int, rank: int) -> int:
        g0, g1 = self.ranges[layer][rank]
        return ((g1 - g0) * self.m + 7) // 8

    def kernels(self) -> tuple:
        """(sample kernel, update kernel, name) in use for N = 2 (see :func:`select_kernels`)."""
        if self._kernels is None:
            # draws use R keys per call, the update R·K masks: the probe checks both counts
            self._kernels = select_kernels(self.kernel_mode, self.device, (self.world_size, self.world_size * self.draws))
        return self._kernels

    @staticmethod
    def _chunking(kernel_name: str) -> dict:
        """A compiled kernel is one fused loop with no temporaries: bigger chunks, fewer calls."""
        return {"chunk": COMPILED_CHUNK_GROUPS} if kernel_name == "compiled" else {}

    # ------------------------------------------------------------------ init
    def init_from_prior(self, layer: int, prior_slice: torch.Tensor, c: float) -> None:
        """Set π0 = C·m0 on this rank's slice; ``prior_slice`` is bool ``[g, M]`` for its range."""
        g0, g1 = self.local_range(layer)
        if tuple(prior_slice.shape) != (g1 - g0, self.m):
            raise ValueError(f"prior slice of {self.names[layer]} has shape {tuple(prior_slice.shape)}, expected {(g1 - g0, self.m)}")
        self.prior_bits[layer] = pack_bits(prior_slice.reshape(-1).to(torch.bool))
        self.logits[layer] = init_logits(prior_slice.to(self.device), c, self.m).to(torch.float32).reshape(g1 - g0, self.m)

    def prior_slice(self, layer: int) -> torch.Tensor:
        g0, g1 = self.local_range(layer)
        return unpack_bits(self.prior_bits[layer], (g1 - g0) * self.m).reshape(g1 - g0, self.m)

    # ------------------------------------------------------------------ masks
    def key(self, step: int, slot: int, layer: int) -> int:
        return key_scalar(self.seed, step, slot, layer)

    def slot(self, rank: int, draw: int) -> int:
        """The sample slot of draw ``draw`` of ``rank`` (rank-major; = rank when K = 1)."""
        return rank * self.draws + draw

    @torch.no_grad()
    def _sample_codes(self, layer: int, step: int, draw: int = 0) -> torch.Tensor:
        """Draw ``draw`` of the R ranks at ``step`` on this slice as codes ``[R, g]`` (N = 2)."""
        keys = [self.key(step, self.slot(r, draw), layer) for r in range(self.world_size)]
        kernel, _, name = self.kernels()
        return sample_codes(self.logits[layer], keys, self.local_range(layer)[0], kernel=kernel,
                            **self._chunking(name))

    def slice_mask(self, layer: int, mode: MaskMode, rank: int) -> torch.Tensor:
        """Bool ``[g, M]`` on this rank's slice: ``rank``'s sample, the prior, or the final mask."""
        g0, _ = self.local_range(layer)
        match mode:
            case SampleMode(step=step, draw=draw):
                return sample_masks(self.logits[layer], self.n, self.key(step, self.slot(rank, draw), layer),
                                    group_offset=g0)
            case PriorMode():
                return self.prior_slice(layer)
            case FinalMode():
                return final_mask(self.logits[layer], self.n, self.m)
        raise TypeError(f"not a mask mode: {mode!r}")

    def forward_send(self, layer: int, mode: MaskMode) -> tuple[torch.Tensor, list[int]]:
        """This rank's send buffer for ``layer`` under ``mode`` (the R slices, concatenated) and the
        byte count per destination; a sample's buffer is kept for the update when ``cache_samples``
        is on. No communication."""
        world = self.world_size
        match mode:
            case SampleMode(step=step, draw=draw) if self.n == 2:
                codes = self._sample_codes(layer, step, draw)
                chunks = [codes_to_packed(codes[s], self.m) for s in range(world)]
            case SampleMode():
                chunks = [pack_bits(self.slice_mask(layer, mode, s).reshape(-1)) for s in range(world)]
            case FinalMode() if self.n == 2:  # the same mask for every rank: pack once
                chunks = [codes_to_packed(top2_codes(self.logits[layer]), self.m)] * world
            case PriorMode():  # kept packed since init
                chunks = [self.prior_bits[layer]] * world
            case _:
                chunks = [pack_bits(self.slice_mask(layer, mode, 0).reshape(-1))] * world
        send = torch.cat(chunks) if world > 1 else chunks[0]
        if isinstance(mode, SampleMode) and self.cache_samples:
            self._sample_cache[(layer, mode.draw)] = (mode.step, send)
        return send, [c.numel() for c in chunks]

    @property
    def active_mode(self) -> MaskMode | None:
        """The mode of the forward running now (None between forwards)."""
        return self._active

    @contextlib.contextmanager
    def drawing(self, mode: MaskMode) -> Iterator[None]:
        """Make ``mode`` the one the masked Linears use for the forward run inside the block."""
        if self._active is not None:
            raise RuntimeError(f"LogitStore.drawing({mode}) inside drawing({self._active}): one forward at a time")
        self._active = mode
        try:
            yield
        finally:
            self._active = None

    def mask_for_forward(self, layer: int) -> torch.Tensor:
        """This rank's full ``[out, in]`` mask of ``layer`` under the active mode, as nm.pack_bits
        bytes (collective); zero_model.masked_weight applies them without unpacking to bool."""
        if self._active is None:
            raise RuntimeError("a masked forward ran outside LogitStore.drawing(mode); say which mask it uses")
        send, send_sizes = self.forward_send(layer, self._active)
        recv_sizes = [self._slice_bytes(layer, s) for s in range(self.world_size)]
        return distributed.all_to_all_bytes(send, send_sizes, recv_sizes)

    # ------------------------------------------------------------------ update
    def _draw_codes(self, layer: int, step: int, draw: int) -> torch.Tensor:
        """Draw ``draw`` of the R ranks on this slice as codes ``[R, g]``: cached from the forward, or drawn again."""
        cached = self._sample_cache.pop((layer, draw), None)
        if cached is None or cached[0] != step:
            return self._sample_codes(layer, step, draw)
        g0, g1 = self.local_range(layer)
        nbytes = self._slice_bytes(layer, self.rank)
        send = cached[1]
        return torch.stack([packed_to_codes(send[s * nbytes:(s + 1) * nbytes], g1 - g0, self.m)
                            for s in range(self.world_size)])

    def _step_codes(self, layer: int, step: int) -> torch.Tensor:
        """The R·K masks of ``step`` on this slice as codes ``[R·K, g]``, row = slot (rank-major)."""
        if self.draws == 1:
            return self._draw_codes(layer, step, 0)
        per_draw = torch.stack([self._draw_codes(layer, step, d) for d in range(self.draws)])  # [K, R, g]
        return per_draw.transpose(0, 1).reshape(self.world_size * self.draws, -1)

    @torch.no_grad()
    def apply_update(self, layer: int, step: int, advantages: list[float], lr: float, rule=None) -> dict[str, float]:
        """π ← π − lr/(RK) Σ_s a_s ∇log P(m_s) on this slice, with the R·K masks of ``step`` (one
        advantage per slot, rank-major).

        ``rule``: an estimator's update with per-logit state (``apply_codes`` for N = 2,
        ``apply_masks`` otherwise, e.g. masks/second_moment.py), applied every step so its state
        moves in step with the logits; None = the plain kernel. Returns local counts for
        monitoring: groups whose samples deviate from the prior (summed over the R·K samples) and
        groups whose final mask differs from the prior. Raises if the updated logits hold NaN or inf.
        """
        if len(advantages) != self.world_size * self.draws:
            raise ValueError(f"apply_update: need {self.world_size * self.draws} advantages (R·K), got {len(advantages)}")
        if self.n != 2:
            return self._apply_update_general(layer, step, advantages, lr, rule)
        g0, g1 = self.local_range(layer)
        prior = packed_to_codes(self.prior_bits[layer], g1 - g0, self.m)
        codes = self._step_codes(layer, step)
        deviating = int((codes != prior).sum())
        if rule is not None:
            final = rule.apply_codes(self.logits[layer], codes, advantages, lr)
        elif lr != 0.0 and any(a != 0.0 for a in advantages):
            _, kernel, name = self.kernels()
            final = apply_update_codes_(self.logits[layer], codes, advantages, lr, kernel=kernel, **self._chunking(name))
        else:
            final = top2_codes(self.logits[layer])
        return {"deviating": deviating, "changed": int((final != prior).sum())}

    def _apply_update_general(self, layer: int, step: int, advantages: list[float], lr: float, rule) -> dict[str, float]:
        for d in range(self.draws):
            self._sample_cache.pop((layer, d), None)
        masks = [self.slice_mask(layer, SampleMode(step, d), r) for r in range(self.world_size) for d in range(self.draws)]
        prior = self.prior_slice(layer)
        deviating = sum(int((mk != prior).any(dim=1).sum()) for mk in masks)
        if rule is not None:
            rule.apply_masks(self.logits[layer], masks, advantages, lr, self.n)
        elif lr != 0.0 and any(a != 0.0 for a in advantages):
            apply_update_(self.logits[layer], masks, advantages, lr, self.n)
        changed = int((final_mask(self.logits[layer], self.n, self.m) != prior).any(dim=1).sum())
        return {"deviating": deviating, "changed": changed}

    # ------------------------------------------------------------------ state
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {name: t for name, t in zip(self.names, self.logits, strict=True)}

    def group_ranges(self) -> dict[str, tuple[int, int]]:
        return {name: self.local_range(i) for i, name in enumerate(self.names)}
