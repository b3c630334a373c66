"""Zero-shot multiple choice: BIG-bench JSON tasks scored by log-likelihood, and lm-eval when installed.

BIG-bench JSON format: ``{"examples": [{"input": str, "target_scores": {choice: score}}], ...}``
with optional ``task_prefix``, ``example_input_prefix`` (default ``"\\nQ: "``),
``example_output_prefix`` (default ``"\\nA: "``) and ``append_choices_to_input`` (default here:
False; BIG-bench's own default lists the choices in the prompt). The correct choices are those
with the highest target score.

Scoring (lm-eval's loglikelihood rule): context = task_prefix + input_prefix + input +
output_prefix, with its trailing whitespace moved to the front of the continuation (a space is
added if neither side has one); the continuation tokens are ``tok(context + continuation)`` past
``len(tok(context))``, both tokenised under the project's one policy (no special tokens, BOS first
when ``add_bos`` says so: maskpro_ds.data.windows; ``auto`` gives what the tokenizer's defaults give
for Llama- and Gemma-style tokenizers); a choice's score is the sum of the log-probs of its tokens. ``acc`` takes the
argmax of the sums, ``acc_norm`` of the sums divided by the choice's length in characters
(lm-eval's acc_norm; its acc_bytes divides by UTF-8 bytes). Ties go to the first choice in file order.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from maskpro_ds.data.windows import BosPolicy, bos_id, text_ids


@dataclass
class MCExample:
    context: str
    choices: list[str]
    correct: set[int]


@dataclass
class MCResult:
    task: str
    examples: int
    acc: float
    acc_norm: float
    chance: float  # expected accuracy of a uniform random guess
    time_s: float

    def to_dict(self) -> dict:
        return asdict(self)


def load_bigbench_task(path: str | os.PathLike, limit: int | None = None) -> tuple[str, list[MCExample]]:
    """(task name, multiple-choice examples) of a BIG-bench ``task.json``."""
    path = Path(path)
    try:
        task = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--bigbench {path}: cannot read a JSON task ({e})") from e
    prefix = task.get("task_prefix", "")
    in_prefix = task.get("example_input_prefix", "\nQ: ")
    out_prefix = task.get("example_output_prefix", "\nA: ")
    append = bool(task.get("append_choices_to_input", False))
    choice_prefix = task.get("choice_prefix", "\n  choice: ")
    examples = []
    for ex in task.get("examples", []):
        scores = ex.get("target_scores")
        if not scores:
            continue  # a generative example: not multiple choice
        choices = list(scores)
        best = max(scores.values())
        listed = "".join(choice_prefix + c for c in choices) if append else ""
        context = prefix + in_prefix + ex["input"] + listed + out_prefix
        examples.append(MCExample(context, choices, {i for i, c in enumerate(choices) if scores[c] == best}))
    if not examples:
        raise ValueError(f"--bigbench {path}: no examples with target_scores (not a multiple-choice task)")
    if limit is not None:
        examples = examples[:limit]
    return str(task.get("name", path.parent.name or path.stem)), examples


def split_context(context: str, choice: str) -> tuple[str, str]:
    """Move the context's trailing whitespace onto the continuation; ensure one separator."""
    stripped = context.rstrip()
    continuation = context[len(stripped) :] + choice
    if stripped and not continuation[:1].isspace():
        continuation = " " + continuation
    return stripped, continuation


def choice_logprobs(model, tokenizer, context: str, choices: list[str], max_length: int | None = None,
                    bos: int | None = None) -> list[float]:
    """Sum of log-probs of each choice's tokens given ``context`` (one right-padded batch); ``bos``
    (:func:`maskpro_ds.data.windows.bos_id`) goes first when not None."""
    head = [bos] if bos is not None else []
    seqs, n_cont = [], []
    for choice in choices:
        ctx, cont = split_context(context, choice)
        ctx_ids = head + text_ids(tokenizer, ctx)
        whole = head + text_ids(tokenizer, ctx + cont)
        k = len(whole) - len(ctx_ids)
        if k <= 0 or whole[: len(ctx_ids)] != ctx_ids:
            # The boundary merged into one token: score the continuation tokenised on its own.
            whole = ctx_ids + text_ids(tokenizer, cont)
            k = len(whole) - len(ctx_ids)
        if max_length is not None and len(whole) > max_length:
            whole = whole[-max_length:]  # keep the continuation, drop the oldest context
        if len(whole) < 2 or k < 1:
            raise ValueError(f"choice {choice!r} produced no tokens to score")
        seqs.append(whole)
        n_cont.append(min(k, len(whole) - 1))
    width = max(len(s) for s in seqs)
    # Right padding needs no attention mask: a causal model never looks at later positions.
    batch = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        batch[i, : len(s)] = torch.tensor(s)
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=batch.to(device), use_cache=False).logits.float().cpu()
    logp = F.log_softmax(logits, dim=-1)
    sums = []
    for i, s in enumerate(seqs):
        start = len(s) - n_cont[i]
        targets = torch.tensor(s[start:])
        sums.append(float(logp[i, start - 1 : len(s) - 1].gather(1, targets.unsqueeze(1)).sum()))
    return sums


def evaluate_multiple_choice(model, tokenizer, examples: list[MCExample], task: str = "task",
                             max_length: int | None = None, add_bos: BosPolicy = "auto") -> MCResult:
    """acc and acc_norm of ``model`` over ``examples`` (see the module docstring)."""
    t0 = time.perf_counter()
    hits = hits_norm = 0
    chance = 0.0
    bos = bos_id(tokenizer, add_bos, "--add-bos")
    for ex in examples:
        sums = choice_logprobs(model, tokenizer, ex.context, ex.choices, max_length, bos)
        normed = [s / max(1, len(c)) for s, c in zip(sums, ex.choices, strict=True)]
        hits += int(max(range(len(sums)), key=lambda i: (sums[i], -i)) in ex.correct)
        hits_norm += int(max(range(len(normed)), key=lambda i: (normed[i], -i)) in ex.correct)
        chance += len(ex.correct) / len(ex.choices)
    n = len(examples)
    return MCResult(task=task, examples=n, acc=hits / n, acc_norm=hits_norm / n, chance=chance / n,
                    time_s=round(time.perf_counter() - t0, 3))


def lm_eval_missing() -> str | None:
    """None when lm-eval can be imported, else a message saying how to get it."""
    try:  # these two pull in all of lm-eval's import-time dependencies
        import lm_eval.evaluator  # noqa: F401
        import lm_eval.models.huggingface  # noqa: F401
    except ImportError as e:
        return (
            f"lm-eval is not installed or incomplete ({e}); `pip install lm-eval` to run --lm-eval-tasks. "
            "BIG-bench JSON tasks (--bigbench) need nothing extra."
        )
    return None


def run_lm_eval(model, tokenizer, tasks: list[str], include_path: str | None = None,
                limit: int | None = None, batch_size: int = 1) -> dict:
    """lm-eval's ``simple_evaluate`` on the loaded (possibly masked) model; local YAML tasks via
    ``include_path``. lm-eval is optional: without it this raises with the install command."""
    missing = lm_eval_missing()
    if missing:
        raise RuntimeError(missing)
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=tasks, task_manager=TaskManager(include_path=include_path), limit=limit,
        log_samples=False,  # only the aggregate metrics are returned
    )
    return results["results"]  # {task: {"acc,none": ..., "acc_norm,none": ..., "sample_len": ...}}
