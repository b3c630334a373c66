"""Token perplexity of an HF model (optionally with a mask artifact applied on the fly).

See ``python tools/eval_ppl.py --help`` and docs/priors_and_eval.md.
"""

import sys

from maskpro_ds.eval.cli import ppl_main

if __name__ == "__main__":
    sys.exit(ppl_main())
