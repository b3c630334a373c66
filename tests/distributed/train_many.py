"""One rank of several training runs in one launch: the architecture matrix shares a process group.

Usage (under torchrun): ``train_many.py RUNS.json``, where RUNS.json is a list of
``{"config": path, "overrides": ["--section.key=value", ...]}``. Each run is a full
``Trainer`` (build, baseline, train, checkpoint, close) exactly as ``maskpro-train`` runs it; the
process group is set up once and reused, which saves a launch (~10 s of imports) per run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    from maskpro_ds import distributed
    from maskpro_ds.config import load_config
    from maskpro_ds.train.trainer import Trainer

    runs = json.loads(Path(sys.argv[1]).read_text())
    for run in runs:
        trainer = Trainer(load_config(run["config"], run["overrides"]))
        try:
            trainer.train()
        finally:
            trainer.close()
        distributed.barrier()
    distributed.destroy()


if __name__ == "__main__":
    main()
    from maskpro_ds import distributed

    distributed.exit_process(0)
