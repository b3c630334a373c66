"""Token perplexity with the SparseGPT / Wanda / MaskLLM protocol (docs/formats.md).

Join the split's documents with ``"\\n\\n"``, tokenise once with the tokenizer's defaults (so a
Llama tokenizer puts ONE BOS at the very start and none later), keep the first ``max_tokens``
tokens if asked, cut into non-overlapping windows of ``seqlen`` (the remainder is dropped, no BOS
re-inserted), take each window's mean next-token cross-entropy (``seqlen − 1`` predictions,
logits in the model dtype, CE in fp32), average over windows, ``ppl = exp(mean)``. The result
carries seqlen, dtype, tokenizer, token counts and time: a perplexity without them is not a number
anyone can compare.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass
class PerplexityResult:
    ppl: float
    mean_nll: float
    seqlen: int
    windows: int
    tokens_used: int  # windows × seqlen
    tokens_total: int  # tokens of the whole text (before --max-tokens and the dropped remainder)
    dtype: str
    tokenizer: str
    bos_at_start: bool
    time_s: float

    def to_dict(self) -> dict:
        return asdict(self)


def tokenize_stream(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D id tensor, tokenised once with the tokenizer's defaults."""
    return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)


def window_nlls(model, ids: torch.Tensor, seqlen: int, batch_size: int = 1) -> torch.Tensor:
    """Mean next-token CE (fp32) of each non-overlapping ``seqlen`` window of 1-D ``ids``."""
    if seqlen < 2:
        raise ValueError(f"--seqlen must be >= 2; got {seqlen}")
    n_windows = ids.numel() // seqlen
    if n_windows == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of --seqlen {seqlen}")
    windows = ids[: n_windows * seqlen].view(n_windows, seqlen)
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


def perplexity(
    model,
    tokenizer,
    text: str,
    seqlen: int,
    max_tokens: int | None = None,
    batch_size: int = 1,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``text`` under the protocol of the module docstring."""
    t0 = time.perf_counter()
    ids = tokenize_stream(tokenizer, text)
    total = ids.numel()
    if max_tokens is not None:
        if max_tokens < seqlen:
            raise ValueError(f"--max-tokens {max_tokens} is below --seqlen {seqlen}: no window fits")
        ids = ids[:max_tokens]
    nlls = window_nlls(model, ids, seqlen, batch_size)
    mean_nll = float(nlls.double().mean())
    bos = getattr(tokenizer, "bos_token_id", None)
    return PerplexityResult(
        ppl=math.exp(mean_nll),
        mean_nll=mean_nll,
        seqlen=seqlen,
        windows=int(nlls.numel()),
        tokens_used=int(nlls.numel()) * seqlen,
        tokens_total=total,
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
        tokenizer=str(getattr(tokenizer, "name_or_path", type(tokenizer).__name__)),
        bos_at_start=bool(bos is not None and total > 0 and int(ids[0]) == bos),
        time_s=round(time.perf_counter() - t0, 3),
    )
