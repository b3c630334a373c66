"""A Hugging Face model directory: the checks and the tensor-to-file map every loader shares.

The ZeRO-3 partition loader (train/weights_loader.py), the lazy block-by-block loader of the priors
(models/lazy.py), the evaluation loader (models/dense.py) and the prior from a pruned checkpoint all
start here. Weights are read from safetensors only: pickle checkpoints are refused, since
unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def check_model_dir(path: str | os.PathLike, option: str) -> Path:
    """``path`` as a directory holding a config.json; errors name ``option`` (e.g. ``model.path``, ``--model``)."""
    if not str(path):
        raise ValueError(f"{option} is empty; point it at a Hugging Face model directory (config.json + safetensors)")
    model_dir = Path(path)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{option} {model_dir} does not exist or is not a directory; fix the path "
                                "(tools/prepare_demo.py fetches the demo model)")
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{option} {model_dir} has no config.json; pass a Hugging Face model directory")
    return model_dir


def has_weights(model_dir: Path) -> bool:
    return any(model_dir.glob("*.safetensors")) or any(model_dir.glob("*.bin"))


def weight_map(model_dir: str | os.PathLike) -> dict[str, Path]:
    """Tensor name -> safetensors file holding it: the shard index when there is one, else every
    ``*.safetensors`` file of the directory (usually the one ``model.safetensors``)."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            mapping = json.loads(index.read_text()).get("weight_map")
        except json.JSONDecodeError as e:
            raise ValueError(f"{index}: not valid JSON ({e}); the download is incomplete") from e
        if not isinstance(mapping, dict) or not mapping:
            raise ValueError(f"{index} has no 'weight_map'; it is not a safetensors shard index")
        files = {name: model_dir / shard for name, shard in mapping.items()}
        for path in sorted(set(files.values())):
            if not path.is_file():
                raise FileNotFoundError(f"{index} names shard {path.name}, which is missing from {model_dir}")
        return files
    files: dict[str, Path] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                if name in files:
                    raise ValueError(f"{path}: tensor {name} is also in {files[name].name}; the directory is inconsistent")
                files[name] = path
    if files:
        return files
    pickles = sorted(p.name for p in model_dir.glob("*.bin"))
    if pickles:
        raise ValueError(f"{model_dir} holds only PyTorch pickle weights ({', '.join(pickles[:3])}); convert them to "
                         f"safetensors (e.g. load once and save_pretrained(..., safe_serialization=True)): pickle "
                         f"files are never loaded, since unpickling runs arbitrary code")
    raise FileNotFoundError(f"{model_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}")
