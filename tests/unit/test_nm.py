"""N:M layout helpers: pattern parsing, top-N tie-break, validation report, bit packing."""

import numpy as np
import pytest
import torch

from maskpro_ds.masks import nm


def test_parse_pattern_accepts_and_rejects():
    assert nm.parse_pattern("2:4") == (2, 4)
    assert nm.parse_pattern(" 8:16 ") == (8, 16)
    for bad in ["2-4", "4:2", "0:4", "2:2", "a:b", "2:4:8", "", "-2:4"]:
        with pytest.raises(ValueError, match="mask.pattern"):
            nm.parse_pattern(bad)


def test_check_divisible_names_the_layer():
    nm.check_divisible((3, 8), 4)
    with pytest.raises(ValueError, match="proj.*not divisible by M=4"):
        nm.check_divisible((3, 6), 4, name="proj")


def test_topn_mask_ties_go_to_lower_index():
    scores = torch.tensor([[1.0, 2.0, 2.0, 2.0, 5.0, 5.0, 5.0, 5.0]])
    mask = nm.topn_mask(scores, 2, 4)
    # group 0: 2.0 at columns 1,2,3 -> keep 1 and 2; group 1: all equal -> keep 4 and 5
    assert mask.tolist() == [[False, True, True, False, True, True, False, False]]
    with pytest.raises(ValueError, match="NaN"):
        nm.topn_mask(torch.tensor([[float("nan"), 0.0, 1.0, 2.0]]), 2, 4)


def test_topn_mask_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 3, (64, 16), generator=gen).float()  # many ties
    mask = nm.topn_mask(scores, 2, 4).view(-1, 4)
    for g, row in zip(scores.view(-1, 4).tolist(), mask.tolist(), strict=True):
        keep = sorted(range(4), key=lambda j: (-g[j], j))[:2]
        assert [j in keep for j in range(4)] == row


def test_magnitude_prior_uses_absolute_value():
    w = torch.tensor([[-3.0, 1.0, 2.0, -0.5]], dtype=torch.bfloat16)
    assert nm.magnitude_prior(w, 2, 4).tolist() == [[True, False, True, False]]


def test_validate_nm_reports_offending_groups():
    good = nm.topn_mask(torch.randn(4, 8), 2, 4)
    bad = good.clone()
    bad[1, 4] = ~bad[1, 4]  # group 3 (row 1, second group) now keeps 1 or 3
    bad[3, 0:4] = True  # group 6 keeps 4
    report = nm.validate_nm({"a": good, "b": bad}, 2, 4)
    assert not report.ok
    assert report.layers_checked == 2
    assert report.offending == {"b": [3, 6]}
    assert report.offending_counts == {"b": 2}
    assert "b: 2 groups, first [3, 6]" in report.summary()
    assert nm.validate_nm({"a": good}, 2, 4).ok
    assert nm.nm_violations(good, 2, 4).numel() == 0


@pytest.mark.parametrize("k", [1, 7, 8, 13, 64, 100])
def test_pack_bits_matches_numpy_and_round_trips(k):
    gen = torch.Generator().manual_seed(k)
    mask = torch.rand(3, 5, k, generator=gen) < 0.5
    packed = nm.pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, (k + 7) // 8)
    expected = np.packbits(mask.numpy(), axis=-1, bitorder="little")
    assert packed.numpy().tobytes() == expected.tobytes()
    assert torch.equal(nm.unpack_bits(packed, k), mask)


def test_unpack_bits_rejects_wrong_input():
    with pytest.raises(ValueError, match="uint8"):
        nm.unpack_bits(torch.zeros(2, dtype=torch.int32), 16)
    with pytest.raises(ValueError, match="does not hold"):
        nm.unpack_bits(torch.zeros(2, dtype=torch.uint8), 17)


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (3, 4), (4, 8), (2, 8), (3, 8), (5, 16)])
def test_topn_matches_a_stable_sort_with_heavy_ties(n, m):
    torch.manual_seed(n * 100 + m)
    scores = torch.randint(-3, 4, (257, 4 * m)).float()  # 7 distinct values: ties everywhere
    scores[0] = 0.0
    scores[1, :m] = torch.tensor([-0.0, 0.0] * (m // 2))  # signed zeros tie
    scores[2, :m] = float("inf")
    groups = scores.reshape(-1, m)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices[:, :n]
    want = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, order, True).reshape(scores.shape)
    assert torch.equal(nm.topn_mask(scores, n, m), want)
