"""Draw the plots of a training run from its metrics.jsonl into the run directory.

    python tools/plot_run.py runs/demo            # residuals.png, deviation.png, eval.png, loss.png
"""

from __future__ import annotations

import argparse

from maskpro_ds.plots import plot_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a training run directory (holds metrics.jsonl)")
    args = parser.parse_args(argv)
    written = plot_run(args.run_dir)
    if not written:
        print(f"{args.run_dir}: metrics.jsonl has none of the plotted keys; nothing written")
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
