"""train/layer_credit.py in process: a rank's slice that starts and ends inside rows gets the autograd
gradient of the rows' relative expected error, with the other groups of those rows held at this
forward's mask; only the first sampled forward of a step is seen; the update is −λ·G."""

import pytest
import torch

from maskpro_ds.config import Config
from maskpro_ds.masks.layer_error import expected_row_error
from maskpro_ds.masks.nm import pack_bits
from maskpro_ds.train.layer_credit import LayerCredit, owned_rows, rows_of_packed
from maskpro_ds.train.logit_store import LogitStore
from maskpro_ds.train.mask_modes import PRIOR, SampleMode

OUT, IN, M = 5, 12, 4  # 15 groups, 3 per row: 2-rank slices start and end inside rows


def _store(rank: int) -> LogitStore:
    store = LogitStore(["layer"], [(OUT, IN)], 2, M, rank, 2, seed=0, kernels="plain")
    g0, g1 = store.local_range(0)
    prior = torch.zeros(g1 - g0, M, dtype=torch.bool)
    prior[:, :2] = True
    store.init_from_prior(0, prior, 3.0)
    store.logits[0] = torch.randn(g1 - g0, M, generator=torch.Generator().manual_seed(rank))
    return store


def test_rows_of_packed_reads_any_row_range():
    mask = torch.rand(OUT, IN, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = pack_bits(mask.reshape(-1))
    for r0, r1 in ((0, 1), (1, 3), (2, 5), (4, 5)):
        assert torch.equal(rows_of_packed(packed, IN, r0, r1), mask[r0:r1].reshape(-1))


@pytest.mark.parametrize("rank", [0, 1])
def test_slice_gradient_equals_autograd_of_relative_row_error(rank):
    store = _store(rank)
    gen = torch.Generator().manual_seed(11)
    weight = torch.randn(OUT, IN, generator=gen)
    x = torch.randn(2, 7, IN, generator=gen)
    mask = torch.zeros(OUT * IN // M, M, dtype=torch.bool)
    for g in range(mask.shape[0]):  # any strict 2:4 mask stands for this forward's
        mask[g, torch.randperm(M, generator=gen)[:2]] = True
    credit = LayerCredit(store, weight=0.5)
    with store.drawing(SampleMode(step=3, draw=0)):
        credit.collect(0, weight, x, pack_bits(mask.reshape(-1)))
    got = credit._grads[0]

    # independent: the rows' error as a function of the slice's logits, the other groups of the rows
    # made point masses at this mask (logits ±1e3), differentiated by autograd, in float64
    r0, r1, offset = owned_rows(store, 0)
    assert offset != 0 or r1 * IN // M != store.local_range(0)[1]  # the slice does cut a row
    g = store.logits[0].shape[0]
    h = (x.reshape(-1, IN).double().t() @ x.reshape(-1, IN).double())
    w = weight[r0:r1].double()
    point = torch.where(mask, 1e3, -1e3).double()[r0 * IN // M:r1 * IN // M]
    leaf = store.logits[0].double().clone().requires_grad_(True)
    full = torch.cat([point[:offset], leaf, point[offset + g:]])
    error = expected_row_error(w, full, h) / ((w @ h) * w).sum(dim=1)
    (want,) = torch.autograd.grad(error.sum(), leaf)
    assert float(want.abs().max()) > 1e-3
    assert torch.allclose(got.double(), want, rtol=1e-3, atol=1e-5), float((got.double() - want).abs().max())

    before = store.logits[0].clone()
    credit.apply(0)
    assert torch.equal(store.logits[0], before - 0.5 * got)
    credit.apply(0)  # applied once: nothing left for this layer
    assert torch.equal(store.logits[0], before - 0.5 * got)


def test_only_the_first_sampled_forward_of_a_step_is_seen():
    store = _store(0)
    credit = LayerCredit(store, weight=1.0)
    weight, x = torch.randn(OUT, IN), torch.randn(1, 4, IN)
    packed = pack_bits(torch.ones(OUT * IN, dtype=torch.bool))
    for mode in (SampleMode(step=0, draw=1), PRIOR):
        with store.drawing(mode):
            credit.collect(0, weight, x, packed)
    assert credit._grads == {}


def test_config_refuses_layer_credit_without_pairs():
    cfg = Config()
    cfg.train.layer_credit = 1.0
    cfg.mask.pattern = "1:4"
    with pytest.raises(ValueError, match="layer_credit"):
        cfg.validate()
    cfg.train.layer_credit = -1.0
    cfg.mask.pattern = "2:4"
    with pytest.raises(ValueError, match="layer_credit"):
        cfg.validate()
