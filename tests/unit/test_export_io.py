"""The exporter's raw safetensors writer and the streaming mask writer, against the reference library.

Files written by ShardedWriter must read back through ``safetensors`` unchanged and match
``safetensors.torch.save_file`` byte for byte (where the reference is deterministic); the streamed
mask artifact must equal ``artifacts.write_mask_artifact``'s output (same header, same data).
"""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from maskpro_ds.formats.mask_artifact import (
    MASK_FILE,
    MASK_MANIFEST,
    MaskArtifactWriter,
    read_mask_artifact,
    write_mask_artifact,
)
from maskpro_ds.formats.safetensors_io import (
    PlannedTensor,
    Reader,
    ShardedWriter,
    parse_size,
    plan_shards,
    read_header,
    tensor_bytes,
)
from maskpro_ds.masks.nm import topn_mask


def split_file(path):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return n, json.loads(raw[8 : 8 + n]), raw[8 + n :]


def test_writer_matches_reference_bytes(tmp_path):
    # all names sorted and one dtype: the reference orders by (dtype, name), so the files must be identical
    tensors = {"a.weight": torch.randn(7, 5).bfloat16(), "b": torch.randn(3).bfloat16(), "c.x": torch.randn(2, 2, 2).bfloat16()}
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    planned = [PlannedTensor(k, "BF16", tuple(v.shape)) for k, v in tensors.items()]
    writer = ShardedWriter(tmp_path, {"mine.safetensors": planned}, {"format": "pt"})
    for name in reversed(list(tensors)):  # any write order
        data = tensor_bytes(tensors[name])
        writer.write(name, len(data) // 2, data[len(data) // 2 :])
        writer.write(name, 0, data[: len(data) // 2])
    writer.close()
    assert (tmp_path / "mine.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_writer_mixed_dtypes_read_back(tmp_path):
    tensors = {"w": torch.randn(4, 8), "h": torch.randn(3, 4).half(), "i": torch.arange(6, dtype=torch.int64).reshape(2, 3),
               "m": torch.tensor([1, 2, 255], dtype=torch.uint8), "s": torch.tensor(3.5)}
    planned = [PlannedTensor(k, {torch.float32: "F32", torch.float16: "F16", torch.int64: "I64", torch.uint8: "U8"}[v.dtype],
                             tuple(v.shape)) for k, v in tensors.items()]
    writer = ShardedWriter(tmp_path, {"x.safetensors": planned}, {"k": "v", "a": "b"})
    for name, t in tensors.items():
        writer.write(name, 0, tensor_bytes(t))
    writer.close()
    back = load_file(tmp_path / "x.safetensors")
    assert set(back) == set(tensors) and all(torch.equal(back[k], v) for k, v in tensors.items())
    n, header, _ = split_file(tmp_path / "x.safetensors")
    assert n % 8 == 0 and list(header)[0] == "__metadata__" and list(header["__metadata__"]) == ["a", "k"]
    infos, meta = read_header(tmp_path / "x.safetensors")
    reader = Reader()
    assert torch.equal(reader.read_rows(infos["w"], 1, 3), tensors["w"][1:3]) and meta == {"a": "b", "k": "v"}
    reader.close()


def test_incomplete_tensor_is_an_error(tmp_path):
    writer = ShardedWriter(tmp_path, {"x.safetensors": [PlannedTensor("w", "F32", (2, 2))]}, None)
    writer.write("w", 0, tensor_bytes(torch.zeros(1, 2)))
    with pytest.raises(AssertionError, match="wrote 8 of 16"):
        writer.close()


def test_writer_refuses_a_file_system_without_room(tmp_path):
    import os

    st = os.statvfs(tmp_path)
    too_big = st.f_bavail * st.f_frsize + (1 << 30)
    with pytest.raises(OSError, match="GB to write but .* GB free"):
        ShardedWriter(tmp_path, {"x.safetensors": [PlannedTensor("w", "U8", (too_big,))]}, None)
    assert list(tmp_path.iterdir()) == []  # refused before a file was created


def test_plan_shards_and_sizes():
    ts = [PlannedTensor(str(i), "F32", (10,)) for i in range(5)]  # 40 bytes each
    assert [len(s) for s in plan_shards(ts, 100)] == [2, 2, 1]
    assert [len(s) for s in plan_shards(ts, 10)] == [1, 1, 1, 1, 1]  # oversize tensors get a file each
    assert [len(s) for s in plan_shards(ts, None)] == [5]
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 << 30 and parse_size("20KB") == 20_000
    assert parse_size(" 1.5 mb") == 1_500_000 and parse_size(123) == 123
    with pytest.raises(ValueError, match="--max-shard-size"):
        parse_size("lots")


def test_streamed_mask_equals_write_mask_artifact(tmp_path):
    gen = torch.Generator().manual_seed(0)
    shapes = {"z.up": (6, 16), "a.q": (4, 24), "m.k": (3, 8)}
    masks = {k: topn_mask(torch.randn(s, generator=gen), 2, 4) for k, s in shapes.items()}
    meta = {"run_id": "r1", "step": 7}
    write_mask_artifact(tmp_path / "ref", masks, 2, 4, "f" * 64, meta)
    writer = MaskArtifactWriter(tmp_path / "mine", shapes, 2, 4, "f" * 64, meta)
    for name, mask in masks.items():  # two row blocks per layer, second one first
        half = mask.shape[0] // 2
        writer.write_rows(name, half, mask[half:])
        writer.write_rows(name, 0, mask[:half])
    writer.finish()
    assert (tmp_path / "mine" / MASK_MANIFEST).read_bytes() == (tmp_path / "ref" / MASK_MANIFEST).read_bytes()
    n_ref, h_ref, d_ref = split_file(tmp_path / "ref" / MASK_FILE)
    n_mine, h_mine, d_mine = split_file(tmp_path / "mine" / MASK_FILE)
    # the reference writer orders metadata keys at random from run to run; everything else is identical
    assert n_mine == n_ref and h_mine == h_ref and list(h_mine)[1:] == list(h_ref)[1:] and d_mine == d_ref
    art = read_mask_artifact(tmp_path / "mine")
    assert all(torch.equal(art.layer_mask(k), v) for k, v in masks.items())
