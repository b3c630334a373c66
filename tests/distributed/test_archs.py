"""The architecture matrix: prior (lazy) -> 2-rank ZeRO-3 training -> export -> verify -> reload, per family.

For each tiny random model of tests/archs.py (Llama, Qwen3, Mistral, Gemma 3, Phi-3, Qwen2-MoE):
- the Wanda prior is computed with lazy loading and must equal the one computed on the whole model
  loaded by ``from_pretrained`` (SparseGPT likewise);
- one torchrun launch trains every architecture in turn on 2 ranks (ZeRO-3, partitions filled from
  the safetensors files), from the Wanda prior; logits must equal, bit for bit, the in-process
  reference (plain ``from_pretrained`` model, no DeepSpeed) trained from the same prior on the same
  windows, and so must the baseline losses f(m0) (the baseline pass reads the training windows);
- the final checkpoint is exported (hf-dense + ct-sparse24) with verify, and the hf-dense export,
  reloaded by ``from_pretrained``, must give the logits of the reference model with its final masks.
"""

from __future__ import annotations

import json

import pytest
import torch

from maskpro_ds.data.samples import build_samples
from maskpro_ds.export import export_checkpoint
from maskpro_ds.formats.checkpoint_format import load_layer_logits, read_manifest
from maskpro_ds.formats.mask_artifact import read_mask_artifact
from maskpro_ds.masks.nm import nm_violations
from maskpro_ds.masks.policy import final_mask
from maskpro_ds.priors.base import PriorSpec
from maskpro_ds.priors.make import compute_prior, make_prior
from tests.archs import ARCHS, exclude_for, make_arch
from tests.distributed.launch import BIN, REPO, free_port, run
from tests.reference import ReferenceMaskPro
from tests.tiny import make_text

pytestmark = pytest.mark.distributed
CONFIG = REPO / "configs" / "tiny_debug.yaml"
WORKER = str(REPO / "tests" / "distributed" / "train_many.py")
STEPS = 4
SAMPLES = 8


def prior_spec(model, arch, out, method="wanda", load="lazy", text=None) -> PriorSpec:
    return PriorSpec(model=str(model), method=method, out=str(out), calib=str(text), nsamples=8, seqlen=32,
                     exclude=exclude_for(arch), load=load, batch_size=4)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    root = tmp_path_factory.mktemp("archs")
    text = make_text(root / "text.txt")
    runs, setup = [], {}
    for arch in ARCHS:
        model = make_arch(arch, root / arch / "model")
        prior = make_prior(prior_spec(model, arch, root / arch / "prior", text=text))
        run_dir = root / arch / "run"
        runs.append({"config": str(CONFIG), "overrides": [
            f"--model.path={model}", f"--data.source={text}", f"--train.run_dir={run_dir}", f"--mask.prior={prior}",
            f"--train.steps={STEPS}", f"--data.num_samples={SAMPLES}", f"--checkpoint.every={STEPS}",
            f"--model.exclude={json.dumps(exclude_for(arch))}",
            "--mask.kernels=plain"]})  # the compiled kernels are tested elsewhere; data.cache_dir unset: run-relative
        setup[arch] = {"model": model, "prior": prior, "run": run_dir}
    (root / "runs.json").write_text(json.dumps(runs))
    run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
         str(free_port()), WORKER, str(root / "runs.json")], timeout=900)
    return {"root": root, "text": text, "archs": setup, "references": {}}


def reference(matrix, arch: str) -> ReferenceMaskPro:
    """The in-process reference of ``arch``, trained like the 2-rank run (computed once per module)."""
    if arch not in matrix["references"]:
        from transformers import AutoTokenizer

        setup = matrix["archs"][arch]
        tokenizer = AutoTokenizer.from_pretrained(str(setup["model"]))
        tokens = build_samples(tokenizer, str(matrix["text"]), seqlen=32, num_samples=SAMPLES, cache_dir=None).tokens
        prior = read_mask_artifact(setup["prior"])
        ref = ReferenceMaskPro(setup["model"], tokens, c=3.0, lr=20.0, batch_size=2, exclude=exclude_for(arch),
                               prior={name: prior.layer_mask(name) for name in prior.shapes})
        for _ in range(STEPS):
            ref.step(2)
        matrix["references"][arch] = ref
    return matrix["references"][arch]


@pytest.mark.parametrize("arch", ARCHS)
def test_priors_with_lazy_loading_equal_the_whole_model(matrix, arch, tmp_path):
    setup = matrix["archs"][arch]
    lazy_wanda = read_mask_artifact(setup["prior"])
    eager_wanda, _ = compute_prior(prior_spec(setup["model"], arch, tmp_path / "w", load="eager", text=matrix["text"]))
    lazy_sgpt, _ = compute_prior(prior_spec(setup["model"], arch, tmp_path / "s", "sparsegpt", text=matrix["text"]))
    eager_sgpt, _ = compute_prior(prior_spec(setup["model"], arch, tmp_path / "s", "sparsegpt", "eager",
                                             text=matrix["text"]))
    assert sorted(lazy_wanda.shapes) == sorted(eager_wanda) == sorted(lazy_sgpt) == sorted(eager_sgpt)
    assert not any(".experts." in name for name in eager_wanda)  # fused experts stay dense (refused as targets)
    for name in eager_wanda:
        assert torch.equal(lazy_wanda.layer_mask(name), eager_wanda[name]), name
        assert torch.equal(lazy_sgpt[name], eager_sgpt[name]), name


@pytest.mark.parametrize("arch", ARCHS)
def test_two_rank_run_equals_the_reference(matrix, arch):
    setup, ref = matrix["archs"][arch], reference(matrix, arch)
    manifest = read_manifest(setup["run"] / "checkpoints" / f"step-{STEPS:06d}")
    names = [name for name, _ in ref.layers]
    assert [layer.name for layer in manifest.layers] == names
    for name, want in zip(names, ref.logits, strict=True):
        got = load_layer_logits(manifest, name)
        assert torch.equal(got, want), f"{name}: max diff {(got - want).abs().max()}"
    from safetensors.torch import load_file

    baseline = load_file(str(setup["run"] / "baseline.safetensors"))["losses"]
    assert torch.equal(baseline, ref.baseline), (baseline - ref.baseline).abs().max()
    cached = list((setup["run"] / "cache" / "data").glob("samples-*.safetensors"))
    assert len(cached) == 1  # the default sample cache is run-relative
    if arch in ("llama", "gemma3"):  # their tokenizers add BOS: every training window starts with it
        assert (ref.tokens[:, 0] == 1).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_export_verify_and_reload(matrix, arch, tmp_path):
    from transformers import AutoModelForCausalLM

    setup, ref = matrix["archs"][arch], reference(matrix, arch)
    out = export_checkpoint(setup["run"], setup["model"], tmp_path / "export", "hf-dense,ct-sparse24", verify=True,
                            progress=False)
    reloaded = AutoModelForCausalLM.from_pretrained(str(out / "hf-dense"), dtype=torch.float32).eval()
    for (name, module), weight, logits in zip(ref.layers, ref.weights, ref.logits, strict=True):
        mask = final_mask(logits, ref.n, ref.m).reshape(weight.shape)
        module.weight.data = torch.where(mask, weight, 0.0)
        got = reloaded.get_submodule(name).weight
        assert torch.equal(got, module.weight.data), name
        assert nm_violations(mask, ref.n, ref.m).numel() == 0, name
    tokens = ref.tokens[:4]
    with torch.no_grad():
        want = ref.model(input_ids=tokens).logits
        got = reloaded(input_ids=tokens).logits
    assert torch.equal(got, want), (got - want).abs().max()
    dense = {n: p for n, p in ref.model.named_parameters() if ".experts." in n}
    for name, param in dense.items():  # MoE: the fused experts come back dense and unchanged
        assert torch.equal(reloaded.get_parameter(name), param), name
