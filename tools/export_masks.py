"""Export learned masks: `tools/export_masks.py CHECKPOINT --base MODEL --out DIR --format hf-dense,mask`.

`tools/export_masks.py apply --mask MASK_DIR --base MODEL --out DIR` applies a mask artifact instead.
See docs/export.md; the work is done by maskpro_ds.export.
"""

import sys

from maskpro_ds.export.cli import main

if __name__ == "__main__":
    sys.exit(main())
