"""Export learned masks: `tools/export_masks.py CHECKPOINT --base MODEL --out DIR --format hf-dense,mask`.

`tools/export_masks.py apply --mask MASK_DIR --base MODEL --out DIR` applies a mask artifact instead.
A thin caller of ``maskpro-export``; see docs/export.md.
"""

import sys

from maskpro_ds.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
