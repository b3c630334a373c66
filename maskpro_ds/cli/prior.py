"""``maskpro-prior`` (``tools/make_prior.py``): write a prior N:M mask artifact.

Examples::

    maskpro-prior --model runs/demo/model --method wanda --pattern 2:4 \\
        --calib runs/demo/calib.txt --nsamples 32 --seqlen 128 --out runs/demo/prior-wanda
    maskpro-prior --model M --method from-checkpoint --source PRUNED_DIR --out OUT
    maskpro-prior --model M --method swap --swap-start wanda --calib C --nsamples 128 --out OUT
    torchrun --nproc_per_node 2 -m maskpro_ds.cli.prior --model M --method swap ...   # rows split over ranks

A method's own options (e.g. SparseGPT's ``--blocksize``) come from its ``Options`` dataclass.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys

from maskpro_ds.data.windows import BOS_POLICIES
from maskpro_ds.formats.mask_artifact import read_mask_artifact
from maskpro_ds.models.targets import DEFAULT_EXCLUDE
from maskpro_ds.priors.base import PriorSpec
from maskpro_ds.priors.make import make_prior
from maskpro_ds.priors.registry import METHODS, PRIOR_METHODS


def _method_flags(p: argparse.ArgumentParser) -> None:
    """One ``--flag`` per field of every method's Options dataclass."""
    for name, cls in PRIOR_METHODS.items():
        for f in dataclasses.fields(cls.Options):
            kind = type(f.default) if f.default not in (None, dataclasses.MISSING) else str
            p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=None,
                           help=f"{f.metadata.get('help', f.name)} (--method {name}; default {f.default})")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="maskpro-prior", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="base HF model directory (config.json + safetensors)")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--pattern", default="2:4", help="N:M pattern (default 2:4)")
    p.add_argument("--out", required=True, help="mask artifact directory to write")
    p.add_argument("--calib", help="calibration text: .txt/.json/.jsonl/.parquet file or HF dataset name")
    p.add_argument("--calib-split", default="train", help="dataset split when --calib is a dataset name")
    p.add_argument("--text-field", default="text", help="text column of a json/parquet/dataset --calib")
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--seqlen", type=int, default=128, help="tokens per calibration window (default 128)")
    p.add_argument("--add-bos", default="auto", choices=BOS_POLICIES,
                   help="BOS at the start of every calibration window: auto (when the tokenizer adds one by "
                        "default, as training does; default), true, false")
    p.add_argument("--include", action="append", default=[], help="regex; only matching Linears (repeatable)")
    p.add_argument("--exclude", action="append", default=None,
                   help=f"regex of Linears to leave dense (repeatable; default {list(DEFAULT_EXCLUDE)})")
    p.add_argument("--dtype", default="fp32", help="weights and forward dtype: fp32 | bf16 | fp16")
    p.add_argument("--load", default="lazy", choices=("lazy", "eager"),
                   help="lazy: one decoder block in memory at a time (default); eager: from_pretrained")
    p.add_argument("--device", default="cpu", help="torch device for blocks and statistics")
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per block forward")
    _method_flags(p)
    p.add_argument("--force", action="store_true", help="overwrite --out")
    return p


def _options(args: argparse.Namespace):
    """The chosen method's Options from its flags; a flag of another method is a usage error."""
    chosen = PRIOR_METHODS[args.method].Options
    mine = {f.name for f in dataclasses.fields(chosen)}
    for name, cls in PRIOR_METHODS.items():
        for f in dataclasses.fields(cls.Options):
            if f.name not in mine and getattr(args, f.name) is not None:
                raise ValueError(f"--{f.name.replace('_', '-')} applies to --method {name}, not {args.method}")
    return chosen(**{k: getattr(args, k) for k in mine if getattr(args, k) is not None})


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
    try:
        spec = PriorSpec(
            model=args.model, method=args.method, out=args.out, pattern=args.pattern, calib=args.calib,
            calib_split=args.calib_split, text_field=args.text_field, nsamples=args.nsamples, seqlen=args.seqlen,
            add_bos=args.add_bos,
            include=args.include, exclude=args.exclude if args.exclude is not None else list(DEFAULT_EXCLUDE),
            dtype=args.dtype, load=args.load, device=args.device, batch_size=args.batch_size, force=args.force,
            options=_options(args),
        )
        out = make_prior(spec)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"maskpro-prior: error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) != 0:  # a multi-rank swap run: rank 0 wrote and reports the artifact
        return 0
    art = read_mask_artifact(out)
    print(json.dumps({"out": str(out), "pattern": art.pattern, "layers": len(art.shapes),
                      "method": art.meta.get("method"), "time_s": art.meta.get("time_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
