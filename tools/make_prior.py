"""Write a prior N:M mask artifact (magnitude, Wanda, SparseGPT, or a pruned checkpoint's pattern).

See ``python tools/make_prior.py --help`` and docs/priors_and_eval.md.
"""

import sys

from maskpro_ds.priors.cli import main

if __name__ == "__main__":
    sys.exit(main())
