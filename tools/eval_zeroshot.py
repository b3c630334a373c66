"""Zero-shot multiple-choice accuracy (BIG-bench JSON tasks; lm-eval tasks when installed).

See ``python tools/eval_zeroshot.py --help`` and docs/priors_and_eval.md.
"""

import sys

from maskpro_ds.eval.cli import zeroshot_main

if __name__ == "__main__":
    sys.exit(zeroshot_main())
