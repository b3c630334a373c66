"""Each decoder block's own call arguments, recorded from the model's own forward, for blockwise replay.

Blockwise calibration runs block k on the outputs of blocks 0..k-1, but block k must also get the
rest of its inputs exactly as the model would give them: position ids, its attention mask (a
sliding-window layer gets the sliding mask, a full layer the full one), its rotary table (Gemma 3
gives sliding and full layers tables with different bases) and any other per-layer keyword.
Rebuilding those would mean re-implementing every architecture's forward; instead the model's own
forward is run once per micro-batch with a forward pre-hook (``with_kwargs=True``) on every decoder
layer that records its arguments, while each layer's ``forward`` is replaced by a pass-through (so
no block needs its weights: in lazy mode they are still on ``meta``). The last layer's hook stops
the forward, so neither the final norm nor the head runs.

Replay then calls block k with the hidden states of the previous (dense or pruned) block and block
k's recorded arguments. A model that changes the hidden states between two blocks (outside them)
cannot be replayed this way: the pass-through would not reproduce what block k+1 receives, and it is
refused with an error naming the model class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from maskpro_ds.models.lazy import ModelHandle


class _StopForward(Exception):
    """Raised by the last layer's pre-hook: nothing after the last block is needed."""


@dataclass
class Call:
    """How the model called one block for one micro-batch: positional arguments after the hidden
    states, and keyword arguments (position ids, masks, rotary tables, ...)."""

    args: tuple
    kwargs: dict


@dataclass
class BlockInputs:
    """Block 0's hidden states per micro-batch, and every block's own calls per micro-batch."""

    hidden: list[torch.Tensor]  # [batch] -> block 0's input hidden states
    calls: list[list[Call]]  # [block][batch]


def _pass_through(*args, **kwargs):
    return args[0] if args else kwargs["hidden_states"]


def record_block_inputs(handle: ModelHandle, tokens: torch.Tensor, batch_size: int) -> BlockInputs:
    """Run the model on ``tokens`` (micro-batches of ``batch_size``) and record every block's call."""
    layers = handle.layers
    last = len(layers) - 1
    seen: list[list[tuple[torch.Tensor, Call]]] = [[] for _ in layers]

    def make_hook(index: int):
        def hook(_module, args, kwargs):
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            seen[index].append((hidden, Call(args=tuple(args[1:]), kwargs=kwargs)))
            if index == last:
                raise _StopForward
        return hook

    saved = [layer.__dict__.get("forward") for layer in layers]
    hooks = [layer.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    batches = tokens.split(batch_size)
    try:
        for layer in layers:
            layer.forward = _pass_through
        with torch.no_grad(), handle.guard_top_level():
            for batch in batches:
                try:
                    handle.model(input_ids=batch.to(handle.device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        for hook in hooks:
            hook.remove()
        for layer, forward in zip(layers, saved, strict=True):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward
    _check_chain(handle.model, seen, len(batches))
    return BlockInputs(hidden=[h for h, _ in seen[0]], calls=[[c for _, c in block] for block in seen])


def _check_chain(model: nn.Module, seen: list[list[tuple[torch.Tensor, Call]]], batches: int) -> None:
    """Every block ran once per micro-batch, and block k+1 received exactly what block k returned."""
    name = type(model).__name__
    for index, calls in enumerate(seen):
        if len(calls) != batches:
            raise ValueError(f"{name}: decoder block {index} ran {len(calls)} times for {batches} micro-batches; "
                             "blockwise calibration needs each block to run once per forward (use a method "
                             "without calibration, e.g. --method magnitude)")
    for index in range(1, len(seen)):
        for b in range(batches):
            if seen[index][b][0] is not seen[index - 1][b][0]:
                raise ValueError(f"{name}: the hidden states change between decoder blocks {index - 1} and {index} "
                                 "outside the blocks, so blocks cannot be replayed one by one; blockwise "
                                 "calibration does not support this architecture (use --method magnitude)")


def block_forward(block: nn.Module, hidden: torch.Tensor, call: Call) -> torch.Tensor:
    """Run ``block`` as the model would, on ``hidden``; returns its output hidden states."""
    out = block(hidden, *call.args, **call.kwargs)
    return out[0] if isinstance(out, tuple) else out
