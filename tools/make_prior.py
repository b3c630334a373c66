"""Write a prior N:M mask artifact (magnitude, Wanda, SparseGPT, or a pruned checkpoint's pattern).

A thin caller of ``maskpro-prior``; see ``--help`` and docs/priors_and_eval.md.
"""

import sys

from maskpro_ds.cli.prior import main

if __name__ == "__main__":
    sys.exit(main())
