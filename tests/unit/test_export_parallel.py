"""The export's fused block kernel against the reference N:M helpers, and the parallel pass: the same
bytes for any worker count and either process start method.

Kernel cases: logits rounded to halves (ties everywhere), -0.0 beside +0.0, ±inf, huge values;
N = 1, 2, 3 of M = 4 (the fused path) and 4:8 (the generic path); rows whose width is not a multiple
of 8 (padded bytes); bf16, fp16 and fp32 weights holding -0.0 and NaN, whose bits must survive.
"""

from __future__ import annotations

import filecmp
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from maskpro_ds.cli.export import main
from maskpro_ds.export import export_checkpoint, workers
from maskpro_ds.export.fused import LANES, BlockKernel, NanLogits
from maskpro_ds.masks.nm import nm_violations, pack_bits, topn_mask
from tests.synthetic import write_synthetic_checkpoint
from tests.unit.test_export import ALL_FORMATS, OPTS, layer_shapes, make_base


def hard_logits(groups: int, m: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.round(torch.randn(groups, m, generator=gen) * 2) / 2  # ties
    x[::5, 1], x[::5, 3] = -0.0, 0.0
    x[::7, 0] = float("inf")
    x[::11, 2] = float("-inf")
    x[::13] = 3.0e38
    x[::17, 1:3] = torch.tensor([1e-45, -1e-45])  # subnormals
    return x


@pytest.mark.parametrize("n,m,in_f", [(1, 4, 12), (2, 4, 12), (3, 4, 12), (2, 4, 64), (4, 8, 24), (4, 8, 64)])
def test_kernel_matches_topn_where_and_pack(n, m, in_f):
    rows = 37
    kernel = BlockKernel(n, m)
    for seed in range(3):  # reused buffers: later blocks must not see earlier ones
        logits = hard_logits(rows * in_f // m, m, seed)
        keep = kernel.keep_from_logits(logits.numpy()).reshape(rows, in_f)
        want = topn_mask(logits.reshape(rows, in_f), n, m)
        assert torch.equal(torch.from_numpy(keep).view(torch.bool), want)
        assert kernel.violations(keep) == 0
        assert torch.equal(torch.from_numpy(kernel.pack(keep)), pack_bits(want))
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            w = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(seed)).to(dtype)
            w[0, :4] = torch.tensor([-0.0, 0.0, float("nan"), -1.0])
            size = w.element_size()
            lanes = w.view(torch.int16 if size == 2 else torch.int32).numpy().view(LANES[size]).reshape(-1)
            pruned = kernel.prune(lanes, keep)
            got = torch.from_numpy(pruned.view(f"i{size}")).view(dtype).view(rows, in_f)
            ref = torch.where(want, w, torch.zeros((), dtype=dtype))
            assert torch.equal(got.view(torch.int16 if size == 2 else torch.int32),
                               ref.view(torch.int16 if size == 2 else torch.int32))


def test_kernel_refuses_nan_and_counts_violations():
    kernel = BlockKernel(2, 4)
    logits = hard_logits(64, 4, 0)
    logits[40, 2] = float("nan")
    with pytest.raises(NanLogits):
        kernel.keep_from_logits(logits.numpy())
    mask = topn_mask(hard_logits(16, 4, 1).reshape(4, 16), 2, 4)
    mask[1, 4:8] = True  # one group keeps 4
    mask[3, 0:4] = False  # one keeps none
    packed = pack_bits(mask).numpy()
    keep = kernel.keep_from_packed(packed, 16)
    assert np.array_equal(keep, mask.numpy().view(np.uint8))
    assert kernel.violations(keep) == 2 == nm_violations(mask, 2, 4).numel()
    kernel8 = BlockKernel(4, 8)
    assert kernel8.violations(keep) == nm_violations(mask, 4, 8).numel()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    base = make_base(root / "base")
    step = write_synthetic_checkpoint(root / "run", layer_shapes(base), 2, 4, 2, {"path": str(base), "fingerprint": None},
                                      ties=True)
    return {"root": root, "base": base, "step": step}


def same_tree(a: Path, b: Path) -> None:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        assert filecmp.cmp(a / rel, b / rel, shallow=False), f"{rel} differs"


def test_any_worker_count_writes_the_same_bytes(world, tmp_path, monkeypatch):
    monkeypatch.setattr(workers, "TASK_BYTES", 4096)  # several tasks per weight, split mid-tensor
    outs = {}
    for count in (1, 2, 3):
        outs[count] = export_checkpoint(world["step"], world["base"], tmp_path / f"w{count}", ALL_FORMATS,
                                        workers=count, verify=True, **OPTS)
    same_tree(outs[1], outs[2])
    same_tree(outs[1], outs[3])
    # and the same as one whole-tensor task per weight with large blocks
    monkeypatch.setattr(workers, "TASK_BYTES", 1 << 30)
    big = export_checkpoint(world["step"], world["base"], tmp_path / "big", ALL_FORMATS, workers=1,
                            **{**OPTS, "chunk_elements": 1 << 20})
    same_tree(outs[1], big)
    assert json.loads((big / "export.json").read_text())["outputs"]["ct-sparse24"]["global_sparsity"] > 0


def test_spawned_workers_write_the_same_bytes(world, tmp_path, monkeypatch):
    """Where fork is unavailable workers are spawned: sinks, writers and sources re-open by path."""
    monkeypatch.setattr(workers, "TASK_BYTES", 16384)
    forked = export_checkpoint(world["step"], world["base"], tmp_path / "fork", ALL_FORMATS, workers=2, **OPTS)
    monkeypatch.setattr(workers, "_start_method", lambda: "spawn")
    spawned = export_checkpoint(world["step"], world["base"], tmp_path / "spawn", ALL_FORMATS, workers=2, **OPTS)
    same_tree(forked, spawned)


def test_striped_order_is_a_permutation_starting_in_every_stripe():
    tasks = list(range(11))  # the order only: any items
    for count in (1, 2, 3, 4):
        order = workers.striped(tasks, count)
        assert sorted(order) == tasks
        starts = [tasks[i * len(tasks) // count] for i in range(count)]
        assert order[:count] == starts  # the first task of each stripe is handed out first
    assert workers.striped(tasks, 2) == [0, 5, 1, 6, 2, 7, 3, 8, 4, 9, 10]


def test_workers_option_is_checked(world, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="--workers must be a positive integer"):
        export_checkpoint(world["step"], world["base"], out, "hf-dense", workers=0, **OPTS)
    assert main([str(world["step"]), "--base", str(world["base"]), "--out", str(out), "--workers", "0"]) == 2
    assert "--workers" in capsys.readouterr().err
    assert not out.exists()


def test_fp16_logits_refuse_overflow(world, tmp_path):
    shapes = layer_shapes(world["base"])
    step = write_synthetic_checkpoint(tmp_path / "run", shapes, 2, 4, 1, {"path": str(world["base"]), "fingerprint": None})
    shard = step / "shard-00000-of-00001.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(shard)
    tensors["model.layers.0.mlp.up_proj"][5] = torch.tensor([1e5, 0.0, -1.0, 2.0])
    save_file(tensors, shard, metadata={"format": "maskpro_ds.checkpoint"})
    manifest = json.loads((step / "manifest.json").read_text())
    manifest["shards"][0]["bytes"] = shard.stat().st_size
    manifest["shards"][0]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()  # a valid, if odd, checkpoint
    (step / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="model.layers.0.mlp.up_proj has logits beyond the fp16 range"):
        export_checkpoint(step, world["base"], tmp_path / "out", "logits", logits_dtype="fp16", workers=2, **OPTS)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("n", [1, 2, 3])
def test_one_pass_from_logits_matches_the_numpy_passes(n):
    """BlockKernel.from_logits (the compiled pass where it is usable) gives the numpy passes' bytes."""
    from maskpro_ds.export import native

    if shutil.which("cc") or shutil.which("gcc"):  # then the compiled pass is what is compared here
        assert native.status() == "native"
    rows, in_f = 29, 44  # a row's last packed byte holds one group
    kernel = BlockKernel(n, 4)
    for seed in range(3):
        logits = hard_logits(rows * in_f // 4, 4, seed).numpy()
        keep_ref = kernel.keep_from_logits(logits).reshape(rows, in_f).copy()
        packed_ref = kernel.pack(keep_ref).copy()
        for lane in (np.uint16, np.uint32):
            w = np.random.default_rng(seed).integers(0, np.iinfo(lane).max, rows * in_f, dtype=lane)
            pruned_ref = kernel.prune(w, keep_ref).copy()
            keep, packed, pruned = kernel.from_logits(logits, rows, in_f, w)
            assert np.array_equal(keep, keep_ref) and np.array_equal(packed, packed_ref)
            assert np.array_equal(pruned, pruned_ref)
        keep, packed, pruned = kernel.from_logits(logits, rows, in_f, None)
        assert pruned is None and np.array_equal(packed, packed_ref)
    logits[7, 1] = float("nan")
    with pytest.raises(NanLogits):
        kernel.from_logits(logits, rows, in_f, None)


def test_compiled_kernel_is_used_where_a_compiler_is_and_falls_back_otherwise(monkeypatch, tmp_path):
    from maskpro_ds.export import native

    monkeypatch.setenv("MASKPRO_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MASKPRO_EXPORT_KERNEL", raising=False)
    monkeypatch.setattr(native, "_loaded", None)
    if shutil.which("cc") or shutil.which("gcc"):
        assert native.status() == "native"
        assert len(list((tmp_path / "cache").glob("nm4_block-*.so"))) == 1
    else:
        assert "no C compiler" in native.status()
    # a compiler that fails: the export keeps working on the numpy kernel, or refuses when told to
    monkeypatch.setenv("MASKPRO_KERNEL_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("CC", "/bin/false")
    monkeypatch.setattr(native, "_loaded", None)
    assert native.native_kernel() is None and native.status().startswith("numpy (compiled kernel not usable")
    monkeypatch.setenv("MASKPRO_EXPORT_KERNEL", "native")
    monkeypatch.setattr(native, "_loaded", None)
    with pytest.raises(RuntimeError, match="MASKPRO_EXPORT_KERNEL=native"):
        native.native_kernel()
    monkeypatch.setenv("MASKPRO_EXPORT_KERNEL", "numpy")
    monkeypatch.setattr(native, "_loaded", None)
    assert native.native_kernel() is None and "MASKPRO_EXPORT_KERNEL=numpy" in native.status()
