import os

# No test may touch the hub or wandb.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from pm_lens.testing import char_tokenizer  # noqa: E402


@pytest.fixture
def tokenizer():
    return char_tokenizer()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
