"""The config tree: defaults, YAML, overrides beating YAML, round trip, and every error path."""

from __future__ import annotations

import pytest

from maskpro_ds.config import Config, from_dict, load_config, parse_overrides, safe_load_yaml


def test_defaults_are_valid_and_parse_the_pattern_once():
    cfg = load_config()
    assert cfg == Config().validate()
    assert (cfg.mask.n, cfg.mask.m) == (2, 4)
    assert cfg.train.lr == 50.0 and cfg.train.alpha == 0.99 and cfg.mask.init_scale == 10.0


def test_yaml_then_overrides_beat_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("mask:\n  pattern: 4:8\ntrain:\n  lr: 100\n  steps: 7\nmodel:\n  exclude: [lm_head, mlp]\n")
    cfg = load_config(path)
    assert (cfg.mask.n, cfg.mask.m) == (4, 8)  # unquoted 4:8 is not YAML 1.1's base-60 integer 248
    assert cfg.train.lr == 100.0 and isinstance(cfg.train.lr, float) and cfg.train.steps == 7
    assert cfg.model.exclude == ["lm_head", "mlp"]
    cfg = load_config(path, ["--train.lr=3e-1", "--train.steps", "9", "--mask.pattern=2:8", "--model.exclude=[]"])
    assert cfg.train.lr == 0.3 and cfg.train.steps == 9 and (cfg.mask.n, cfg.mask.m) == (2, 8)
    assert cfg.model.exclude == []


def test_dump_and_load_back_identically(tmp_path):
    cfg = load_config(None, ["--train.lr=123.5", "--mask.pattern=1:4", "--model.include=[q_proj]", "--data.source=a b.txt"])
    path = tmp_path / "resolved.yaml"
    path.write_text(cfg.dump_yaml())
    assert load_config(path) == cfg
    assert from_dict(safe_load_yaml(cfg.dump_yaml())) == cfg


def test_yaml_loader_is_safe(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("train: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(Exception, match="python/object"):
        load_config(path)


@pytest.mark.parametrize("overrides, message", [
    (["--train.stepz=3"], "unknown config key train.stepz; keys of train are: run_dir, steps"),
    (["--trian.steps=3"], "unknown config section 'trian'; sections are: model, data"),
    (["--train.steps=1.5"], "train.steps: expected an integer, got float 1.5"),
    (["--train.steps=true"], "train.steps: expected an integer, got bool"),
    (["--train.lr=fast"], "train.lr: expected a number, got str 'fast'"),
    (["--metrics.tensorboard=1"], "metrics.tensorboard: expected true or false"),
    (["--model.exclude=lm_head"], "model.exclude: expected a list"),
    (["--mask.pattern=4:2"], "need 0 < N < M"),
    (["--mask.pattern=2-4"], "mask.pattern must look like 'N:M'"),
    (["--mask.pattern=0:4"], "need 0 < N < M"),
    (["--model.dtype=fp8"], "model.dtype = 'fp8' is not allowed; choose one of bf16, fp16, fp32"),
    (["--train.estimator=reinforce"], "train.estimator = 'reinforce' is not allowed"),
    (["--train.advantage_norm=l2"], "train.advantage_norm = 'l2' is not allowed"),
    (["--train.baseline=cached"], "train.baseline = 'cached' is not allowed"),
    (["--train.alpha=1.0"], "train.alpha must be in [0, 1)"),
    (["--train.lr=-1"], "train.lr must be >= 0"),
    (["--train.steps=-1"], "train.steps must be > 0"),
    (["--train.steps=0"], "train.steps must be > 0 (the step to train up to), got 0"),
    (["--data.seqlen=0"], "data.seqlen must be > 0"),
    (["--data.batch_size=0"], "data.batch_size must be > 0"),
    (["--mask.init_scale=0"], "mask.init_scale must be > 0"),
    (["--checkpoint.keep_last=0"], "checkpoint.keep_last must be > 0"),
    (["--train.eval_every=10"], "train.eval_every > 0 needs train.eval_source"),
    (["--train.advantage_norm=clip", "--train.advantage_clip=0"], "train.advantage_clip must be > 0"),
    (["--train.advantage_clip=3"], "train.advantage_clip = 3.0 has no effect with train.advantage_norm = none"),
    (["--train.advantage_norm=rms", "--train.advantage_clip=-1"], "train.advantage_clip must be >= 0"),
    (["--zero.backend=mpi"], "zero.backend = 'mpi' is not allowed"),
    (["train.steps=3"], "must look like --section.key=value"),
    (["--train.steps"], "has no value"),
])
def test_errors_name_the_field(overrides, message):
    with pytest.raises(ValueError) as info:
        load_config(None, overrides)
    assert message in str(info.value)


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="must be a mapping of sections"):
        load_config(bad)
    bad.write_text("train: 3\n")
    with pytest.raises(ValueError, match="section 'train' must be a mapping"):
        load_config(bad)


def test_override_values_are_parsed_as_yaml_scalars():
    parsed = parse_overrides(["--a.b=1", "--a.c=x", "--a.d=[1, 2]", "--a.e=", "--a.f=2:4"])
    assert parsed == [("a", "b", 1), ("a", "c", "x"), ("a", "d", [1, 2]), ("a", "e", ""), ("a", "f", "2:4")]


def test_every_shipped_config_loads():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path)
