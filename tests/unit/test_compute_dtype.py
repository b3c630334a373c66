"""``auto`` compute dtype: bf16 only where this machine runs it natively; explicit names pass through."""

import pytest
import torch

from maskpro_ds.demo.run import DemoSizes
from maskpro_ds.formats.compute_dtype import cpu_has_native_bf16, fast_dtype, resolve_dtype


def test_auto_follows_the_cpu_flags():
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert cpu_has_native_bf16() == native
    assert resolve_dtype("auto") == ("bf16" if native else "fp32")
    assert DemoSizes().dtype == resolve_dtype("auto")


def test_gpus_get_bf16():
    assert fast_dtype("cuda") == "bf16"
    assert resolve_dtype("auto", device="cuda:1") == "bf16"


def test_explicit_names_are_normalised():
    assert resolve_dtype("bfloat16") == "bf16"
    assert resolve_dtype("fp32") == "fp32"
    assert resolve_dtype("float16") == "fp16"


def test_a_bad_name_names_the_option():
    with pytest.raises(ValueError, match="--train-dtype"):
        resolve_dtype("int8", option="--train-dtype")
