"""Verify an export (or summarise a training checkpoint): `tools/inspect_checkpoint.py DIR [--base MODEL]`.

Exit status 0 when every check passes, 1 when one fails, 2 on a usage error. A thin caller of
``maskpro-inspect``; see docs/export.md.
"""

import sys

from maskpro_ds.cli.export import inspect_main

if __name__ == "__main__":
    sys.exit(inspect_main())
