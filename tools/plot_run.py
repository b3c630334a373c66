"""Draw the plots of a training run from its metrics.jsonl into the run directory.

    python tools/plot_run.py runs/demo            # residuals.png, deviation.png, eval.png, loss.png

A thin caller of ``maskpro-plot-run``.
"""

import sys

from maskpro_ds.cli.demo import plot_main

if __name__ == "__main__":
    sys.exit(plot_main())
