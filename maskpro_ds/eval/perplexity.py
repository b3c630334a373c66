"""Token perplexity with the SparseGPT / Wanda / MaskLLM protocol (docs/formats.md).

Join the split's documents with ``"\\n\\n"``, tokenise once without special tokens, keep the first
``max_tokens`` text tokens if asked, cut into non-overlapping windows of ``seqlen`` (the remainder
is dropped) built as training windows are (:mod:`maskpro_ds.data.windows`: with the default policy
a tokenizer that adds BOS, as Llama's and Gemma's do, gets BOS at the start of EVERY window, then
``seqlen − 1`` text tokens), take each window's mean next-token cross-entropy (``seqlen − 1``
predictions, logits in the model dtype, CE in fp32), average over windows, ``ppl = exp(mean)``.
The result carries seqlen, dtype, tokenizer, the BOS policy, token counts and time: a perplexity
without them is not a number anyone can compare.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from maskpro_ds.data.windows import BosPolicy, body_length, bos_id, cut_windows, text_ids


@dataclass
class PerplexityResult:
    ppl: float
    mean_nll: float
    seqlen: int
    windows: int
    tokens_used: int  # windows × seqlen (BOS tokens included)
    tokens_total: int  # text tokens of the whole text (before --max-tokens and the dropped remainder)
    dtype: str
    tokenizer: str
    add_bos: str  # the policy asked for (auto | true | false)
    bos_per_window: bool  # what it resolved to: every window starts with BOS
    time_s: float

    def to_dict(self) -> dict:
        return asdict(self)


def window_nlls(model, windows: torch.Tensor, batch_size: int = 1) -> torch.Tensor:
    """Mean next-token CE (fp32) of each row of ``windows`` ``[n, seqlen]``."""
    seqlen = windows.shape[1]
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for batch in windows.split(batch_size):
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            ce = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none"
            )
            out.append(ce.view(batch.shape[0], seqlen - 1).mean(dim=1).cpu())
    return torch.cat(out)


def perplexity_windows(tokenizer, text: str, seqlen: int, max_tokens: int | None = None,
                       add_bos: BosPolicy = "auto") -> tuple[torch.Tensor, int, int | None]:
    """(windows ``[n, seqlen]``, text tokens in the whole text, BOS id or None) under the protocol."""
    if seqlen < 2:
        raise ValueError(f"--seqlen must be >= 2; got {seqlen}")
    bos = bos_id(tokenizer, add_bos, "--add-bos")
    ids = torch.tensor(text_ids(tokenizer, text), dtype=torch.long)
    body = body_length(seqlen, bos)
    if max_tokens is not None and max_tokens < body:
        raise ValueError(f"--max-tokens {max_tokens} is below the {body} text tokens of one --seqlen {seqlen} "
                         "window: no window fits")
    windows = cut_windows(ids[:max_tokens] if max_tokens is not None else ids, seqlen, bos)
    if windows.shape[0] == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of --seqlen {seqlen}")
    return windows, ids.numel(), bos


def perplexity(
    model,
    tokenizer,
    text: str,
    seqlen: int,
    max_tokens: int | None = None,
    batch_size: int = 1,
    add_bos: BosPolicy = "auto",
) -> PerplexityResult:
    """Perplexity of ``model`` on ``text`` under the protocol of the module docstring."""
    t0 = time.perf_counter()
    windows, total, bos = perplexity_windows(tokenizer, text, seqlen, max_tokens, add_bos)
    nlls = window_nlls(model, windows, batch_size)
    mean_nll = float(nlls.double().mean())
    return PerplexityResult(
        ppl=math.exp(mean_nll),
        mean_nll=mean_nll,
        seqlen=seqlen,
        windows=int(nlls.numel()),
        tokens_used=int(nlls.numel()) * seqlen,
        tokens_total=total,
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
        tokenizer=str(getattr(tokenizer, "name_or_path", type(tokenizer).__name__)),
        add_bos=str(add_bos).lower(),
        bos_per_window=bos is not None,
        time_s=round(time.perf_counter() - t0, 3),
    )
