"""The README's first command (``make demo``): prepare, priors, MaskPro on 2 ranks, export, evaluate."""

import sys

from maskpro_ds.demo import main

if __name__ == "__main__":
    sys.exit(main())
