"""Token perplexity of an HF model (optionally with a mask artifact applied on the fly).

A thin caller of ``maskpro-eval-ppl``; see ``--help`` and docs/priors_and_eval.md.
"""

import sys

from maskpro_ds.cli.eval import ppl_main

if __name__ == "__main__":
    sys.exit(ppl_main())
