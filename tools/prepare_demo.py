"""Fetch and build the offline demo assets: SmolLM2-135M-Instruct and an English Wikipedia sample.

    python tools/prepare_demo.py                       # into .cache/demo
    python tools/prepare_demo.py --cache-dir /data/demo

A thin caller of ``maskpro-prepare-demo``; see docs/demo_assets.md.
"""

import sys

from maskpro_ds.cli.demo import prepare_main

if __name__ == "__main__":
    sys.exit(prepare_main())
