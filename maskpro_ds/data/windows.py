"""The one tokenisation policy: how a text becomes token windows, in every path that feeds the model.

Training samples, the baseline pass (which reads the training samples), the priors' calibration
windows, periodic held-out evaluation and ``maskpro-eval-ppl`` all cut their windows here, so a
model sees the same kind of input whether it is trained, calibrated or evaluated:

- the text is tokenised once, without special tokens (:func:`text_ids`);
- every window starts with the BOS token when the policy asks for one, followed by
  ``seqlen - 1`` text tokens; without BOS a window is ``seqlen`` text tokens.

The policy (``data.add_bos``, ``--add-bos``): ``auto`` (default) puts BOS first when the tokenizer
adds one by default (Llama 2/3, Gemma: their models are trained to see it), ``true`` always (an
error if the tokenizer has no BOS token), ``false`` never. The resolved BOS id is part of the
samples' fingerprint (:mod:`maskpro_ds.data.samples`), so a cache made under another policy is
never reused. Rationale and numbers: docs/data.md.
"""

from __future__ import annotations

from typing import Literal

import torch

BosPolicy = Literal["auto", "true", "false"]
BOS_POLICIES: tuple[str, ...] = ("auto", "true", "false")


def _policy(value: object, option: str) -> str:
    # YAML and argparse may hand over a bool for true/false.
    text = str(value).lower() if isinstance(value, bool) else str(value)
    if text not in BOS_POLICIES:
        raise ValueError(f"{option} = {value!r} is not allowed; choose one of {', '.join(BOS_POLICIES)}")
    return text


def adds_bos_by_default(tokenizer) -> bool:
    """Whether ``tokenizer(text)`` (its defaults) puts the BOS token first."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    probe = "a"
    with_special = tokenizer(probe)["input_ids"]
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    return bool(with_special) and with_special[0] == bos and (not plain or plain[0] != bos)


def bos_id(tokenizer, policy: object = "auto", option: str = "data.add_bos") -> int | None:
    """The token id every window starts with under ``policy``, or None for no BOS."""
    policy = _policy(policy, option)
    if policy == "false":
        return None
    bos = getattr(tokenizer, "bos_token_id", None)
    if policy == "true":
        if bos is None:
            raise ValueError(f"{option} = true, but the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no "
                             "BOS token; use auto or false")
        return int(bos)
    return int(bos) if adds_bos_by_default(tokenizer) else None


def text_ids(tokenizer, text: str) -> list[int]:
    """``text`` tokenised once, without special tokens (``verbose=False``: the text is cut into windows
    afterwards, so the "longer than model_max_length" warning does not apply)."""
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def _with_bos(rows: torch.Tensor, bos: int | None) -> torch.Tensor:
    if bos is None:
        return rows
    return torch.cat([torch.full((rows.shape[0], 1), bos, dtype=torch.long), rows], dim=1)


def body_length(seqlen: int, bos: int | None) -> int:
    """Text tokens per window."""
    if seqlen < 2:
        raise ValueError(f"a window needs at least 2 tokens; got seqlen {seqlen}")
    return seqlen - (bos is not None)


def cut_windows(ids: list[int] | torch.Tensor, seqlen: int, bos: int | None) -> torch.Tensor:
    """Consecutive non-overlapping windows ``[n, seqlen]`` of the token stream (the remainder dropped)."""
    body = body_length(seqlen, bos)
    ids = torch.as_tensor(ids, dtype=torch.long)
    n = ids.numel() // body
    return _with_bos(ids[: n * body].reshape(n, body), bos)


def spaced_windows(ids: list[int] | torch.Tensor, nsamples: int, seqlen: int, bos: int | None,
                   where: str = "the text") -> torch.Tensor:
    """``nsamples`` windows ``[nsamples, seqlen]`` at evenly spaced, non-overlapping offsets of the stream."""
    body = body_length(seqlen, bos)
    ids = torch.as_tensor(ids, dtype=torch.long)
    total = ids.numel()
    if total < nsamples * body:
        raise ValueError(f"{where} holds {total} tokens, fewer than the {nsamples * body} that --nsamples {nsamples} "
                         f"windows of --seqlen {seqlen} need; pass more text or lower --nsamples/--seqlen")
    stride = (total - body) // (nsamples - 1) if nsamples > 1 else 0
    return _with_bos(torch.stack([ids[i * stride : i * stride + body] for i in range(nsamples)]), bos)
