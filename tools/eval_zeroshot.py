"""Zero-shot multiple-choice accuracy (BIG-bench JSON tasks; lm-eval tasks when installed).

A thin caller of ``maskpro-eval-zeroshot``; see ``--help`` and docs/priors_and_eval.md.
"""

import sys

from maskpro_ds.cli.eval import zeroshot_main

if __name__ == "__main__":
    sys.exit(zeroshot_main())
