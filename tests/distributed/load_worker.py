"""One rank of a loading run: ``load_partitioned_model``, then a sha256 of every full parameter.

Usage (under torchrun): ``load_worker.py MODEL_DIR OUT_DIR [DTYPE]``. Rank 0 writes
``OUT_DIR/hashes.json``: {name: sha256 of the gathered tensor's bytes}, the dtype, and each rank's
peak-RSS growth (/proc/self/status VmHWM) across ``load_partitioned_model`` and, separately, across
``weights_loader.load_weights`` alone on a second model built the same way (partitions allocated
beforehand, so it shows what reading the files costs). Parameters are gathered one at a time.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch


def vm_hwm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def tensor_sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def measure_fill(model_dir: Path, ds_config: dict, dtype: torch.dtype) -> int:
    """VmHWM growth across load_weights into a freshly built partitioned model."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from maskpro_ds.train.weights_loader import load_weights

    keep_alive = HfDeepSpeedConfig(ds_config)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(model_dir)), dtype=dtype)
    before = vm_hwm_bytes()
    load_weights(model, model_dir)
    del keep_alive
    return vm_hwm_bytes() - before


def main() -> None:
    from maskpro_ds import distributed
    from maskpro_ds.config import load_config
    from maskpro_ds.train.zero_model import build_ds_config, load_partitioned_model
    from maskpro_ds.train.zero_utils import gathered

    model_dir, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    dtype = sys.argv[3] if len(sys.argv) > 3 else "fp32"
    cfg = load_config(None, [f"--model.path={model_dir}", f"--model.dtype={dtype}", "--zero.backend=gloo"])
    info = distributed.init_distributed(cfg.zero.backend, cfg.zero.timeout_s)
    ds_config = build_ds_config(cfg, info.world_size)
    before = vm_hwm_bytes()
    _, model = load_partitioned_model(cfg, ds_config)
    growth = vm_hwm_bytes() - before
    fill_growth = measure_fill(model_dir, ds_config, model.dtype)
    hashes = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        with gathered([param]):
            hashes[name] = tensor_sha256(param.data)
    growths = distributed.all_gather_floats(torch.tensor([growth, fill_growth], dtype=torch.float64))
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        record = {"hashes": hashes, "dtype": str(next(model.parameters()).dtype),
                  "peak_rss_growth": growths[:, 0].tolist(), "fill_peak_rss_growth": growths[:, 1].tolist()}
        (out_dir / "hashes.json").write_text(json.dumps(record, indent=1))
    distributed.barrier()
    distributed.destroy()


if __name__ == "__main__":
    main()
    from maskpro_ds import distributed

    distributed.exit_process(0)
