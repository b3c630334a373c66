"""The README's first command (``make demo``): prepare, priors, MaskPro on 2 ranks, export, evaluate.

A thin caller of ``maskpro-demo`` (maskpro_ds.cli.demo).
"""

import sys

from maskpro_ds.cli.demo import demo_main

if __name__ == "__main__":
    sys.exit(demo_main())
