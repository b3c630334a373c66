"""A 70B-class export in a subprocess: peak memory stays a few tensors, whatever the model size.

Base: 2 Llama-70B-shaped layers in bf16 (hidden 8192, intermediate 28672, k/v 1024 rows; q, k, v, o,
gate, up, down + norms = 3.42 GB), written straight to safetensors in 2 GB shards; a 2-rank fp32
checkpoint (6.8 GB of logits). The export (hf-dense + mask + ct-sparse24) runs in a fresh process
whose peak RSS (VmHWM) must stay under the peak of the same process importing everything and
exporting nothing, plus 3x the largest single tensor (down/gate/up: 235M weights = 470 MB). Block
processing keeps the real margin far larger; the test prints the runtime and the measured ratio.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from maskpro_ds.export.base_model import BaseModel
from maskpro_ds.formats.safetensors_io import Reader
from maskpro_ds.masks.nm import topn_mask, unpack_bits
from tests.synthetic import synthetic_logits, write_random_base, write_synthetic_checkpoint

HIDDEN, INTERMEDIATE, KV, LAYERS = 8192, 28672, 1024, 2

CHILD = """
import json, sys, time
import torch

def peak_rss():  # VmHWM: this process image only (ru_maxrss would carry the parent's peak across exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

from maskpro_ds.export import export_checkpoint
torch.set_num_threads(1)
step, base, out, formats = sys.argv[1:5]
t0 = time.perf_counter()
if formats != "none":
    export_checkpoint(step, base, out, formats, progress=False)
print(json.dumps({"seconds": time.perf_counter() - t0,
                  "peak_rss": peak_rss()}))
"""


def run_child(*args: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, env=env, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_70b_class_export_memory(tmp_path):
    tensors, shapes = [], {}
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        for name, shape in ((f"{p}.self_attn.q_proj", (HIDDEN, HIDDEN)), (f"{p}.self_attn.k_proj", (KV, HIDDEN)),
                            (f"{p}.self_attn.v_proj", (KV, HIDDEN)), (f"{p}.self_attn.o_proj", (HIDDEN, HIDDEN)),
                            (f"{p}.mlp.gate_proj", (INTERMEDIATE, HIDDEN)), (f"{p}.mlp.up_proj", (INTERMEDIATE, HIDDEN)),
                            (f"{p}.mlp.down_proj", (HIDDEN, INTERMEDIATE))):
            tensors.append((f"{name}.weight", shape, torch.bfloat16))
            shapes[name] = shape
        tensors.append((f"{p}.input_layernorm.weight", (HIDDEN,), torch.bfloat16))
    base = write_random_base(tmp_path / "base", tensors, {"model_type": "llama", "hidden_size": HIDDEN},
                             max_shard_bytes=2 * 10**9)
    from maskpro_ds.formats.hashing import model_fingerprint

    step = write_synthetic_checkpoint(tmp_path / "run", shapes, 2, 4, 2,
                                      {"path": str(base), "fingerprint": model_fingerprint(base)})
    weights = sum(s[0] * s[1] for s in shapes.values()) * 2
    largest = max(s[0] * s[1] for s in shapes.values()) * 2
    assert weights >= 3 * 10**9 and largest == INTERMEDIATE * HIDDEN * 2

    idle = run_child(str(step), str(base), str(tmp_path / "none"), "none")
    run = run_child(str(step), str(base), str(tmp_path / "out"), "hf-dense,mask,ct-sparse24")
    above = run["peak_rss"] - idle["peak_rss"]
    print(f"\n70B-class export: {weights / 1e9:.2f} GB of weights in {run['seconds']:.0f} s "
          f"({weights / 1e9 / run['seconds']:.3f} GB/s, fingerprint check included); peak RSS {run['peak_rss'] / 1e9:.2f} GB, "
          f"{above / 1e6:.0f} MB above the {idle['peak_rss'] / 1e6:.0f} MB baseline = {above / largest:.2f}x the largest tensor")
    assert run["peak_rss"] < idle["peak_rss"] + 3 * largest

    # spot check: first and last rows of the largest layer, against an independent recomputation
    name = f"model.layers.{LAYERS - 1}.mlp.down_proj"
    out_f, in_f = shapes[name]
    out = BaseModel(tmp_path / "out" / "hf-dense")
    src = BaseModel(base)
    from maskpro_ds.formats.safetensors_io import read_header

    packed, _ = read_header(tmp_path / "out" / "mask" / "masks.safetensors")
    reader = Reader()
    for r0, r1 in ((0, 4), (out_f - 4, out_f)):
        per_row = in_f // 4
        mask = topn_mask(synthetic_logits(name, r0 * per_row, r1 * per_row, 4).reshape(r1 - r0, in_f), 2, 4)
        assert torch.equal(unpack_bits(reader.read_rows(packed[name], r0, r1), in_f), mask)
        w = reader.read_rows(src.tensors[f"{name}.weight"], r0, r1)
        got = reader.read_rows(out.tensors[f"{name}.weight"], r0, r1)
        assert torch.equal(got.view(torch.int16), torch.where(mask, w, 0).view(torch.int16))
    reader.close()
    assert (Path(tmp_path / "out" / "export.json")).is_file()
