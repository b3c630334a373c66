"""The swap prior with its rows split over 2 real ranks (torchrun, gloo) against one in-process run.

The artifact's masks.safetensors must be byte-identical: every row chunk is searched with tensors
of the same shapes on any rank count, and every rank computes the same H.
"""

from __future__ import annotations

import json

import pytest

from maskpro_ds.formats.mask_artifact import read_mask_artifact
from maskpro_ds.priors.base import PriorSpec
from maskpro_ds.priors.make import make_prior
from maskpro_ds.priors.swap import SwapPriorOptions
from tests.distributed.launch import BIN, REPO, free_port, run
from tests.tiny import make_text, make_tiny_llama

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("calib", ["dense", "sequential"])
def test_two_ranks_write_the_same_mask_bytes_as_one_process(tmp_path, calib):
    model = make_tiny_llama(tmp_path / "model", intermediate=160)
    text = make_text(tmp_path / "calib.txt")
    options = dict(nsamples=8, seqlen=32, batch_size=3,
                   options=SwapPriorOptions(swap_calib=calib, swap_row_chunk=24, swap_sweeps=4))
    # One process, in this interpreter.
    make_prior(PriorSpec(model=str(model), method="swap", out=str(tmp_path / "one"), calib=str(text), **options))
    # Two ranks through the CLI, launched like training.
    args = ["--model", str(model), "--method", "swap", "--calib", str(text), "--out", str(tmp_path / "two"),
            "--nsamples", "8", "--seqlen", "32", "--batch-size", "3", "--swap-calib", calib,
            "--swap-row-chunk", "24", "--swap-sweeps", "4"]
    proc = run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                str(free_port()), str(REPO / "tools" / "make_prior.py"), *args], timeout=240)
    reported = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(reported) == 1 and reported[0]["method"] == "swap"  # rank 0 alone writes and reports

    one, two = read_mask_artifact(tmp_path / "one"), read_mask_artifact(tmp_path / "two")
    assert (tmp_path / "one" / "masks.safetensors").read_bytes() == (tmp_path / "two" / "masks.safetensors").read_bytes()
    assert one.meta["swap"]["ranks"] == 1 and two.meta["swap"]["ranks"] == 2
    assert one.meta["swap"]["groups_changed"] == two.meta["swap"]["groups_changed"] > 0
    assert one.meta["swap"]["inputs"] == two.meta["swap"]["inputs"]  # stats fold in chunk order on any rank count
    assert not list(tmp_path.glob(".tmp-*"))
