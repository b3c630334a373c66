"""``maskpro-eval-ppl`` and ``maskpro-eval-zeroshot`` (tools/eval_ppl.py, tools/eval_zeroshot.py).

Evaluate a model, optionally with a mask artifact applied on the fly. Examples::

    maskpro-eval-ppl runs/demo/model --data runs/demo/heldout.txt --seqlen 512 --max-tokens 40960
    maskpro-eval-ppl runs/demo/model --data runs/demo/heldout.txt --mask runs/demo/prior-wanda
    maskpro-eval-ppl MODEL --data wikitext --dataset-config wikitext-2-raw-v1 --split test --seqlen 2048
    maskpro-eval-zeroshot runs/demo/model --bigbench goal_inference/task.json --mask MASK

Each prints one JSON object (also written to --json-out when given).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from maskpro_ds.data.windows import BOS_POLICIES
from maskpro_ds.formats.atomic import atomic_write_text


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="HF model directory (a base, or an hf-dense export)")
    p.add_argument("--mask", help="mask artifact to apply on the fly to the loaded model")
    p.add_argument("--no-fingerprint-check", action="store_true",
                   help="apply --mask even if the base fingerprint differs (re-written base files)")
    p.add_argument("--dtype", default="fp32", help="fp32 | bf16 | fp16 (default fp32)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--add-bos", default="auto", choices=BOS_POLICIES,
                   help="BOS at the start of every window / prompt: auto (when the tokenizer adds one by default, "
                        "as training does), true, false")
    p.add_argument("--json-out", help="also write the result JSON here")


def _load(args):
    from maskpro_ds.eval.masked_model import apply_mask_artifact
    from maskpro_ds.models.dense import load_causal_lm

    model, tokenizer = load_causal_lm(args.model, dtype=args.dtype, device=args.device)
    applied = None
    if args.mask:
        applied = apply_mask_artifact(model, args.mask, model_dir=args.model,
                                      check_fingerprint=not args.no_fingerprint_check).__dict__
    return model, tokenizer, applied


def _emit(result: dict, json_out: str | None) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if json_out:
        atomic_write_text(Path(json_out), text + "\n")


def ppl_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="maskpro-eval-ppl", description="token perplexity (SparseGPT/Wanda protocol)")
    _common(p)
    p.add_argument("--data", required=True, help="text/json/jsonl/parquet file or HF dataset name")
    p.add_argument("--dataset-config", help="HF dataset config (e.g. wikitext-2-raw-v1)")
    p.add_argument("--split", default="test", help="dataset split for a dataset name (default test)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--max-tokens", type=int, help="use only the first K tokens of the joined text")
    args = p.parse_args(argv)
    from maskpro_ds.data.texts import join_texts, load_texts
    from maskpro_ds.eval.perplexity import perplexity

    try:
        # A .txt file is read whole, so the joined text is the file byte for byte (the protocol).
        texts = load_texts(args.data, split=args.split, text_field=args.text_field,
                           config=args.dataset_config, split_txt=False)
        model, tokenizer, applied = _load(args)
        result = perplexity(model, tokenizer, join_texts(texts), args.seqlen, args.max_tokens, args.batch_size,
                            add_bos=args.add_bos)
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # RuntimeError: unreachable hub data set
        print(f"maskpro-eval-ppl: error: {e}", file=sys.stderr)
        return 2
    _emit({"model": args.model, "data": args.data, "mask": applied, **result.to_dict()}, args.json_out)
    return 0


def zeroshot_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="maskpro-eval-zeroshot", description="zero-shot multiple choice accuracy")
    _common(p)
    p.add_argument("--bigbench", action="append", default=[], help="BIG-bench task.json (repeatable)")
    p.add_argument("--limit", type=int, help="first K examples of each task")
    p.add_argument("--max-length", type=int, help="truncate prompts from the left to this many tokens")
    p.add_argument("--lm-eval-tasks", help="comma-separated lm-eval task names (needs lm-eval installed)")
    p.add_argument("--lm-eval-include", help="directory of local lm-eval YAML tasks")
    args = p.parse_args(argv)
    if not args.bigbench and not args.lm_eval_tasks:
        p.error("give at least one --bigbench task.json or --lm-eval-tasks")
    from maskpro_ds.eval.zeroshot import (
        evaluate_multiple_choice,
        lm_eval_missing,
        load_bigbench_task,
        run_lm_eval,
    )

    if args.lm_eval_tasks and (why := lm_eval_missing()):
        print(f"maskpro-eval-zeroshot: error: {why}", file=sys.stderr)  # before minutes of model loading
        return 2
    try:
        model, tokenizer, applied = _load(args)
        out: dict = {"model": args.model, "mask": applied, "dtype": args.dtype, "tasks": {}}
        for path in args.bigbench:
            name, examples = load_bigbench_task(path, args.limit)
            out["tasks"][name] = evaluate_multiple_choice(model, tokenizer, examples, name, args.max_length,
                                                          add_bos=args.add_bos).to_dict()
        if args.lm_eval_tasks:
            out["lm_eval"] = run_lm_eval(model, tokenizer, args.lm_eval_tasks.split(","), args.lm_eval_include,
                                         args.limit, args.batch_size)
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as e:  # KeyError: unknown lm-eval task
        print(f"maskpro-eval-zeroshot: error: {e}", file=sys.stderr)
        return 2
    _emit(out, args.json_out)
    return 0
