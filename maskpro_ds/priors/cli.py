"""``maskpro-prior`` / ``tools/make_prior.py``: write a prior N:M mask artifact.

Examples::

    python tools/make_prior.py --model runs/demo/model --method wanda --pattern 2:4 \\
        --calib runs/demo/calib.txt --nsamples 32 --seqlen 128 --out runs/demo/prior-wanda
    python tools/make_prior.py --model M --method from-checkpoint --source PRUNED_DIR --out OUT
    python tools/make_prior.py --model M --method swap --swap-start wanda --calib C --nsamples 128 --out OUT
    torchrun --nproc_per_node 2 tools/make_prior.py --model M --method swap ...   # rows split over ranks
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from maskpro_ds.priors.make import METHODS, PriorSpec, make_prior
from maskpro_ds.priors.targets import DEFAULT_EXCLUDE


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="make_prior", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="base HF model directory (config.json + safetensors)")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--pattern", default="2:4", help="N:M pattern (default 2:4)")
    p.add_argument("--out", required=True, help="mask artifact directory to write")
    p.add_argument("--calib", help="calibration text: .txt/.json/.jsonl/.parquet file or HF dataset name")
    p.add_argument("--calib-split", default="train", help="dataset split when --calib is a dataset name")
    p.add_argument("--text-field", default="text", help="text column of a json/parquet/dataset --calib")
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--seqlen", type=int, default=128, help="tokens per calibration window (default 128)")
    p.add_argument("--source", help="pruned checkpoint directory for --method from-checkpoint")
    p.add_argument("--include", action="append", default=[], help="regex; only matching Linears (repeatable)")
    p.add_argument("--exclude", action="append", default=None,
                   help=f"regex of Linears to leave dense (repeatable; default {list(DEFAULT_EXCLUDE)})")
    p.add_argument("--dtype", default="fp32", help="weights and forward dtype: fp32 | bf16 | fp16")
    p.add_argument("--load", default="lazy", choices=("lazy", "eager"),
                   help="lazy: one decoder block in memory at a time (default); eager: from_pretrained")
    p.add_argument("--device", default="cpu", help="torch device for blocks and statistics")
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per block forward")
    p.add_argument("--blocksize", type=int, default=128, help="SparseGPT column block size")
    p.add_argument("--percdamp", type=float, default=0.01, help="SparseGPT dampening, fraction of mean diag(H)")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    p.add_argument("--swap-start", default="wanda",
                   help="swap: starting mask: magnitude | wanda | sparsegpt | a mask artifact or pruned checkpoint dir")
    p.add_argument("--swap-sweeps", type=int, default=5, help="swap: most sweeps over every group (default 5)")
    p.add_argument("--swap-tol", type=float, default=1e-3,
                   help="swap: stop when a sweep lowers the objective by less than this fraction (default 1e-3)")
    p.add_argument("--swap-calib", default="dense", choices=("dense", "sequential"),
                   help="swap: activations of the dense model (default) or of the already-masked one")
    p.add_argument("--swap-target", default="own", choices=("own", "dense"),
                   help="swap: reconstruct each layer's own output on its inputs (default), or with "
                        "--swap-calib sequential the dense model's output")
    p.add_argument("--swap-row-chunk", type=int, default=1024,
                   help="swap: rows searched together, the unit of the split over ranks (default 1024)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from maskpro_ds.priors.swap_ranks import launched_world_size

    code = _make(args)
    if launched_world_size() > 1:  # ranks of a launcher end like training's (distributed.exit_process)
        from maskpro_ds.distributed import exit_process

        exit_process(code)
    return code


def _make(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = PriorSpec(
        model=args.model, method=args.method, out=args.out, pattern=args.pattern, calib=args.calib,
        calib_split=args.calib_split, text_field=args.text_field, nsamples=args.nsamples, seqlen=args.seqlen,
        source=args.source, include=args.include,
        exclude=args.exclude if args.exclude is not None else list(DEFAULT_EXCLUDE),
        dtype=args.dtype, load=args.load, device=args.device, batch_size=args.batch_size,
        blocksize=args.blocksize, percdamp=args.percdamp, force=args.force, swap_start=args.swap_start,
        swap_sweeps=args.swap_sweeps, swap_tol=args.swap_tol, swap_calib=args.swap_calib,
        swap_target=args.swap_target, swap_row_chunk=args.swap_row_chunk,
    )
    try:
        out = make_prior(spec)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"make_prior: error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) != 0:  # a multi-rank swap run: rank 0 wrote and reports the artifact
        return 0
    from maskpro_ds.artifacts import read_mask_artifact

    art = read_mask_artifact(out)
    print(json.dumps({"out": str(out), "pattern": art.pattern, "layers": len(art.shapes),
                      "method": art.meta.get("method"), "time_s": art.meta.get("time_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
