"""dtype and device arguments: names accepted, anything else refused in one line before loading."""

import re

import pytest
import torch

from pm_lens import RewardModel
from pm_lens.model import as_device, as_dtype
from pm_lens.testing import tiny_hf_reward_model


@pytest.mark.parametrize(
    "name, dtype",
    [("bfloat16", torch.bfloat16), ("float16", torch.float16), ("float32", torch.float32),
     ("torch.bfloat16", torch.bfloat16), ("BF16", torch.bfloat16), ("half", torch.float16),
     (torch.float64, torch.float64)],
)
def test_dtype_names(name, dtype):
    assert as_dtype(name) is dtype


@pytest.mark.parametrize("bad", ["int8", "fp33", torch.int64, "auto", torch.float8_e4m3fn, 16])
def test_bad_dtype_is_named_with_the_allowed_ones(bad):
    with pytest.raises(ValueError) as err:
        as_dtype(bad)
    message = str(err.value)
    assert message.startswith(f"dtype {bad!r} is not a floating dtype pm_lens can use; allowed: 'float32'")
    assert "'bfloat16' (bf16)" in message and "'float16' (half/fp16)" in message and "\n" not in message


def test_string_dtype_through_from_hf_and_from_pretrained(tmp_path, tokenizer):
    hf_model = tiny_hf_reward_model()
    assert {p.dtype for p in RewardModel.from_hf(hf_model, tokenizer, dtype="float16").parameters()} == {torch.float16}
    hf_model.save_pretrained(tmp_path)
    rm = RewardModel.from_pretrained(tmp_path, dtype="torch.bfloat16")
    assert {p.dtype for p in rm.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("bad", ["int8", "fp33", torch.int64])
def test_bad_dtype_is_refused_before_loading(bad, tmp_path):
    # The folder does not exist: the dtype is checked first, so its message is the one raised.
    with pytest.raises(ValueError, match=r"^dtype .* is not a floating dtype pm_lens can use; allowed: "):
        RewardModel.from_pretrained(tmp_path / "missing", dtype=bad)
    with pytest.raises(ValueError, match=r"^dtype .* is not a floating dtype pm_lens can use; allowed: "):
        RewardModel.from_hf(tiny_hf_reward_model(), dtype=bad)


@pytest.mark.parametrize("bad", ["cdua", "gpu", "cpu:x", 3.5])
def test_garbage_device_is_named(bad, tmp_path):
    message = rf"^device {re.escape(repr(bad))} is not a device; use 'cpu', 'cuda', 'cuda:N', 'mps' or a torch\.device$"
    with pytest.raises(ValueError, match=message):
        as_device(bad)
    if isinstance(bad, str):  # the loaders' parameters are typed str | torch.device (type-checked in tests)
        with pytest.raises(ValueError, match=message):
            RewardModel.from_pretrained(tmp_path / "missing", device=bad)
        with pytest.raises(ValueError, match=message):
            RewardModel.from_hf(tiny_hf_reward_model(), device=bad)


def test_device_this_machine_lacks():
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ValueError, match=r"^device 'cuda:99' (needs CUDA|does not exist)"):
        as_device("cuda:99")
    if n_gpus == 0:
        with pytest.raises(ValueError, match=r"^device 'cuda' needs CUDA, which is not available on this machine"):
            RewardModel.from_hf(tiny_hf_reward_model(), device="cuda")
    assert as_device("cpu") == torch.device("cpu")
