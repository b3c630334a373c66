"""Blockwise calibration replays every block with that block's own inputs, on every architecture.

Reference: the model's own full forward (eager, every block real), with a pre-hook on each decoder
layer recording the arguments the model gives it, and ``output_hidden_states`` for what each block
produces. The replay under test is ``run_blockwise`` (lazy and eager loading) with a dense "prune"
(weights unchanged): the arguments it passes to block k must be tensor-equal to the model's own,
and its dense outputs must equal the model's hidden states. Gemma 3 (4 layers: sliding, full,
sliding, full; rotary bases 1e4 and 1e6) is where reusing block 0's arguments went wrong.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from maskpro_ds.models.lazy import open_causal_lm
from maskpro_ds.priors import calibration
from maskpro_ds.priors.block_inputs import block_forward, record_block_inputs
from maskpro_ds.priors.calibration import BlockResult, ColumnSumSq, run_blockwise
from tests.archs import ARCHS, make_arch


def same(a, b) -> bool:
    """Tensor-equal for tensors, element-wise for tuples/lists/dicts, == otherwise."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def model_own_calls(model_dir, tokens: torch.Tensor, batch_size: int):
    """[block][batch] -> (args after hidden, kwargs) from the model's own forward; and hidden states."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    layers = model.model.layers
    calls = [[] for _ in layers]

    def hook(index):
        def record(_m, args, kwargs):
            kwargs = dict(kwargs)
            if not args:
                kwargs.pop("hidden_states")
            calls[index].append((tuple(args[1:]), kwargs))
        return record

    hooks = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    hidden = []
    with torch.no_grad():
        for batch in tokens.split(batch_size):
            model(input_ids=batch, use_cache=False)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        for batch in tokens.split(batch_size):
            hidden.append(model(input_ids=batch, use_cache=False, output_hidden_states=True).hidden_states)
    return calls, hidden, model


def dense_prune(_name, lin, _stat) -> BlockResult:
    return BlockResult(mask=torch.ones(lin.weight.shape, dtype=torch.bool), pruned_weight=lin.weight.data)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("block_inputs")
    return {arch: make_arch(arch, root / arch, layers=4 if arch == "gemma3" else 2) for arch in ARCHS}


@pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_replay_passes_each_block_its_own_inputs(models, arch, lazy, monkeypatch):
    torch.manual_seed(1)
    tokens = torch.randint(3, 200, (5, 24))  # 24 > the sliding window of 8: sliding masks differ from full ones
    batch_size = 2
    want_calls, want_hidden, model = model_own_calls(models[arch], tokens, batch_size)
    handle = open_causal_lm(models[arch], lazy=lazy)
    n = len(handle.layers)
    index_of = {id(layer): i for i, layer in enumerate(handle.layers)}
    got_calls = [[] for _ in range(n)]
    got_out = [[] for _ in range(n)]

    def recording_forward(block, hidden, call):  # what run_blockwise hands each block, and what it gets back
        out = block_forward(block, hidden, call)
        got_calls[index_of[id(block)]].append((call.args, call.kwargs))
        got_out[index_of[id(block)]].append(out)
        return out

    monkeypatch.setattr(calibration, "block_forward", recording_forward)
    names = [n for n, m in handle.model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    run_blockwise(handle, tokens, names, lambda lin: ColumnSumSq(lin.in_features, "cpu"), dense_prune,
                  batch_size=batch_size)
    batches = len(want_hidden)
    for k in range(n):
        # The block runs twice per micro-batch (statistics, then the next block's inputs), the last block once.
        runs = 2 if k + 1 < n else 1
        assert len(got_calls[k]) == runs * batches, k
        for i, (args, kwargs) in enumerate(got_calls[k]):
            want_args, want_kwargs = want_calls[k][i % batches]
            assert same(args, want_args), (k, i)
            assert kwargs.keys() == want_kwargs.keys(), (k, sorted(kwargs), sorted(want_kwargs))
            for key in kwargs:
                assert same(kwargs[key], want_kwargs[key]), (k, i, key)
        for b in range(batches):
            out = got_out[k][b - batches]  # the last pass over the batches (it feeds the next block)
            if k + 1 < n:
                assert torch.equal(out, want_hidden[b][k + 1]), (k, b, (out - want_hidden[b][k + 1]).abs().max())
            else:  # the last hidden state is taken after the final norm
                with torch.no_grad():
                    assert torch.equal(model.model.norm(out), want_hidden[b][n]), (k, b)
    if arch == "gemma3":  # the point of the test: blocks of different kinds got different tables and masks
        first, second = want_calls[0][0][1], want_calls[1][0][1]
        assert not same(first["position_embeddings"], second["position_embeddings"])
        assert not same(first["attention_mask"], second["attention_mask"])


def test_replay_refuses_a_model_that_changes_hidden_states_between_blocks(models):
    handle = open_causal_lm(models["llama"], lazy=False)
    inner = handle.model.model
    plain = type(inner).forward

    def tampered(self, *args, **kwargs):  # a model that rescales hidden states between its blocks
        original = [layer.forward for layer in self.layers]
        for layer, fwd in zip(self.layers, original, strict=True):
            layer.forward = lambda *a, _f=fwd, **k: _f(*a, **k) * 2.0
        try:
            return plain(self, *args, **kwargs)
        finally:
            for layer, fwd in zip(self.layers, original, strict=True):
                layer.forward = fwd

    inner.forward = tampered.__get__(inner)
    with pytest.raises(ValueError, match="hidden states change between decoder blocks 0 and 1"):
        record_block_inputs(handle, torch.randint(3, 200, (2, 16)), 2)


def test_lazy_names_the_module_whose_tensor_is_missing(models, tmp_path):
    import shutil

    broken = tmp_path / "gemma3_no_embed"
    shutil.copytree(models["gemma3"], broken)
    state = load_file(str(broken / "model.safetensors"))
    del state["model.embed_tokens.weight"]
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    handle = open_causal_lm(broken, lazy=True)
    with pytest.raises(ValueError, match=r"model\.embed_tokens \(Gemma3TextScaledWordEmbedding\): weight not loaded"):
        record_block_inputs(handle, torch.randint(3, 200, (2, 16)), 2)


def test_lazy_names_a_computed_buffer_it_could_not_build(models):
    handle = open_causal_lm(models["gemma3"], lazy=True)
    # As if the config did not determine it: a non-persistent buffer left on meta.
    handle.model.model.embed_tokens.register_buffer("embed_scale", torch.empty((), device="meta"), persistent=False)
    with pytest.raises(ValueError, match=r"model\.embed_tokens .*embed_scale not loaded.*--load eager"):
        record_block_inputs(handle, torch.randint(3, 200, (2, 16)), 2)
