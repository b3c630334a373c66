"""The sharded logit store's fast N = 2 path: the same bits as the plain reference functions.

Two in-process stores stand for the two ranks of a world of 2 (no communication: ``forward_send``
is the part of the forward that runs on the owner). Everything is compared bit for bit with the
whole-layer reference path of tests/reference.py: sample_masks + apply_update_ + final_mask.
"""

import pytest
import torch

from maskpro_ds.masks import nm, policy, sampling
from maskpro_ds.masks.policy import (
    apply_update_,
    apply_update_codes_,
    final_mask,
    top2_codes,
    update_final_block,
)
from maskpro_ds.masks.sampling import (
    codes_to_masks,
    codes_to_packed,
    key_scalar,
    masks_to_codes,
    packed_to_codes,
    pair_code_block,
    sample_codes,
    sample_masks,
)
from maskpro_ds.train import logit_store as logits_mod
from maskpro_ds.train.logit_store import LogitStore, select_kernels
from maskpro_ds.train.mask_modes import FINAL, PRIOR, SampleMode

SHAPES = [(6, 40), (10, 24), (3, 4)]  # 60, 60 and 3 groups of 4: odd sizes, a 3-group layer


def _hard_logits(g: int, m: int, seed: int) -> torch.Tensor:
    """Mixed scales, near-prior groups, ties and a dominant logit: the cases rounding could split."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.tensor([0.1, 1.0, 3.0, 30.0])[torch.arange(g) % 4]
    x = torch.randn(g, m, generator=gen) * scales[:, None]
    x[::5] = 10.0 * (torch.arange(m) % 2 == 0) + 0.01 * torch.randn(len(range(0, g, 5)), m, generator=gen)
    x[::9] = 2.5
    x[::13, 1] = 1e4
    return x


def _stores(cache: bool, kernels: str, c: float = 3.0) -> list[LogitStore]:
    names = [f"l{i}" for i in range(len(SHAPES))]
    stores = [LogitStore(names, SHAPES, 2, 4, rank, 2, seed=5, cache_samples=cache, kernels=kernels) for rank in range(2)]
    for layer, (out_f, in_f) in enumerate(SHAPES):
        prior = nm.magnitude_prior(_hard_logits(out_f, in_f, layer), 2, 4).view(-1, 4)
        for store in stores:
            g0, g1 = store.local_range(layer)
            store.init_from_prior(layer, prior[g0:g1], c)
    return stores


def _reference(stores: list[LogitStore], steps: int, advantages: list[list[float]], lr: float):
    """Whole-layer logits updated the way tests/reference.py does."""
    full = [torch.cat([s.logits[li] for s in stores]).clone() for li in range(len(SHAPES))]
    for t in range(steps):
        for li, lg in enumerate(full):
            masks = [sample_masks(lg, 2, key_scalar(5, t, r, li)) for r in range(2)]
            apply_update_(lg, masks, advantages[t], lr, 2)
    return full


@pytest.mark.parametrize("cache", [True, False])
def test_store_update_matches_whole_layer_reference_bit_for_bit(cache):
    stores = _stores(cache, "plain")
    advantages = [[0.3, -0.5], [-0.2, 0.9], [0.0, 0.0], [1.5, -0.1]]
    want = _reference(stores, len(advantages), advantages, lr=2.0)
    for t, adv in enumerate(advantages):
        for store in stores:
            for layer in range(len(SHAPES)):
                send, sizes = store.forward_send(layer, SampleMode(t))
                g0, _ = store.local_range(layer)
                # the send buffer is the packed sample of every rank on this slice
                for r in range(2):
                    mask = sample_masks(store.logits[layer], 2, store.key(t, r, layer), group_offset=g0)
                    assert torch.equal(send[sum(sizes[:r]):sum(sizes[:r + 1])], nm.pack_bits(mask.reshape(-1)))
            for layer in range(len(SHAPES)):
                counts = store.apply_update(layer, t, adv, 2.0)
                prior = store.prior_slice(layer)
                final = final_mask(store.logits[layer], 2, 4)
                assert counts["changed"] == int((final != prior).any(dim=1).sum())
    for li in range(len(SHAPES)):
        got = torch.cat([s.logits[li] for s in stores])
        assert torch.equal(got.view(torch.int32), want[li].view(torch.int32))
    assert any(not torch.equal(w.view(-1, 4) > 0, final_mask(w, 2, 4)) for w in want)  # something moved


def test_cached_and_redrawn_masks_give_the_same_counts():
    runs = []
    for cache in (True, False):
        stores = _stores(cache, "plain", c=1.0)
        counts = []
        for t in range(3):
            for store in stores:
                for layer in range(len(SHAPES)):
                    store.forward_send(layer, SampleMode(t))
                counts.append([store.apply_update(layer, t, [0.4, -0.7], 3.0) for layer in range(len(SHAPES))])
        assert not stores[0]._sample_cache  # the update consumed what the forward kept
        runs.append((counts, [s.logits for s in stores]))
    assert runs[0][0] == runs[1][0]
    assert sum(c["deviating"] for step in runs[0][0] for c in step) > 0
    for a, b in zip(runs[0][1], runs[1][1], strict=True):
        assert all(torch.equal(x.view(torch.int32), y.view(torch.int32)) for x, y in zip(a, b, strict=True))


def test_update_raises_on_non_finite_logits():
    store = _stores(True, "plain")[0]
    store.logits[1][3, 2] = float("nan")
    with pytest.raises(ValueError, match="group 3 hold NaN or inf"):
        store.apply_update(1, 0, [1.0, -1.0], 1.0)


@pytest.mark.parametrize("m", [3, 4, 5, 8])
def test_codes_round_trip_through_masks_and_packed_bits(m):
    for g in (1, 2, 7, 64):
        x = _hard_logits(g, m, g)
        masks = sample_masks(x, 2, key_scalar(1, 2, 3, 4))
        codes = masks_to_codes(masks)
        assert torch.equal(codes_to_masks(codes, m), masks)
        packed = codes_to_packed(codes, m)
        assert torch.equal(packed, nm.pack_bits(masks.reshape(-1)))
        assert torch.equal(packed_to_codes(packed, g, m), codes)


def test_top2_codes_follow_topn_tie_rule():
    x = _hard_logits(500, 4, 0)
    x[:50] = torch.randint(0, 3, (50, 4)).float()  # many exact ties
    x[50] = torch.tensor([-0.0, 0.0, 0.0, -0.0])
    x[51] = torch.tensor([float("inf"), 1.0, float("inf"), float("inf")])
    assert torch.equal(codes_to_masks(top2_codes(x), 4), final_mask(x, 2, 4))


def test_sample_codes_rows_are_sample_masks_and_layout_free():
    x = _hard_logits(301, 4, 3)
    keys = [key_scalar(0, 9, r, 2) for r in range(3)]
    codes = sample_codes(x, keys, group_offset=40)
    for r, key in enumerate(keys):
        assert torch.equal(codes_to_masks(codes[r], 4), sample_masks(x, 2, key, group_offset=40))
    part = sample_codes(x[100:171], keys, group_offset=140, chunk=16)
    assert torch.equal(part, codes[:, 100:171])


def test_apply_update_codes_equals_apply_update():
    x = _hard_logits(777, 4, 4)
    keys = [key_scalar(0, 1, r, 0) for r in range(2)]
    codes = sample_codes(x, keys)
    want = x.clone()
    apply_update_(want, [codes_to_masks(c, 4) for c in codes], [0.8, -0.3], 5.0)
    got = x.clone()
    final = apply_update_codes_(got, codes, [0.8, -0.3], 5.0, chunk=100)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    assert torch.equal(codes_to_masks(final, 4), final_mask(want, 2, 4))


def test_compiled_kernels_give_the_plain_bits():
    """The compiled kernels (the store's default) against plain torch, on sizes that leave vector tails."""
    sample_kernel, update_kernel, name = select_kernels("auto")
    if name != "compiled":
        pytest.skip(f"torch.compile unavailable here: {name}")
    for g in (2, 3, 17, 1001, 4097):  # chunks of 1000: last chunks of 1 and 97 groups
        x = _hard_logits(g, 4, g)
        keys = [key_scalar(3, g, r, 1) for r in range(2)]
        codes = sample_codes(x, keys, group_offset=11)
        assert torch.equal(sample_codes(x, keys, group_offset=11, kernel=sample_kernel, chunk=1000), codes)
        want, got = x.clone(), x.clone()
        final = apply_update_codes_(want, codes, [0.6, -1.1], 4.0)
        final_c = apply_update_codes_(got, codes, [0.6, -1.1], 4.0, kernel=update_kernel, chunk=1000)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))
        assert torch.equal(final, final_c)


def test_kernel_modes_and_errors():
    assert select_kernels("plain")[:2] == (pair_code_block, update_final_block)
    with pytest.raises(ValueError, match="kernels must be one of"):
        select_kernels("fast")
    with pytest.raises(ValueError, match="kernels must be one of"):
        LogitStore(["a"], [(2, 8)], 2, 4, 0, 1, seed=0, kernels="fast")
    assert logits_mod.KERNEL_MODES == ("auto", "compiled", "plain")
    assert policy.code_dtype(4) == sampling.code_dtype(8) == torch.uint8


def test_masked_weight_from_packed_bits_equals_where():
    from maskpro_ds.train.zero_model import masked_weight

    gen = torch.Generator().manual_seed(6)
    for shape in ((6, 40), (12, 8), (5, 4)):
        w = torch.randn(shape, generator=gen)
        w[0, :4] = torch.tensor([-0.0, 0.0, -1.0, float("nan")])
        mask = torch.rand(shape, generator=gen) < 0.5
        want = torch.where(mask, w, torch.zeros(()))
        got = masked_weight(w, nm.pack_bits(mask.reshape(-1)))
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))
        assert torch.equal(masked_weight(w, mask).view(torch.int32), want.view(torch.int32))
        assert got[~mask].view(torch.int32).eq(0).all()  # +0.0 exactly where pruned
        for dtype, raw in ((torch.bfloat16, torch.int16), (torch.float16, torch.int16), (torch.float64, torch.int64)):
            wd = w.to(dtype)
            want_d = torch.where(mask, wd, torch.zeros((), dtype=dtype))
            assert torch.equal(masked_weight(wd, nm.pack_bits(mask.reshape(-1))).view(raw), want_d.view(raw))
    with pytest.raises(ValueError, match="mask bytes"):
        masked_weight(torch.zeros(4, 8), torch.zeros(3, dtype=torch.uint8))


def test_prior_and_final_send_buffers():
    for store in _stores(True, "plain"):
        for layer in range(len(SHAPES)):
            send, sizes = store.forward_send(layer, PRIOR)
            assert torch.equal(send, nm.pack_bits(store.prior_slice(layer).reshape(-1)).repeat(2))
            assert sizes == [send.numel() // 2] * 2
            send, _ = store.forward_send(layer, FINAL)
            final = final_mask(store.logits[layer], 2, 4)
            assert torch.equal(send, nm.pack_bits(final.reshape(-1)).repeat(2))
        assert not store._sample_cache
