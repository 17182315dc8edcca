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


@pytest.fixture(scope="session")
def first_load(tmp_path_factory):
    """SmolLM2 loaded once per session into a fresh cache (the one ~20 s dequantisation)."""
    import time
    from types import SimpleNamespace

    from pm_lens.model.smollm2 import load_smollm2

    cache_dir = tmp_path_factory.mktemp("pm_lens_cache")
    start = time.perf_counter()
    model, tokenizer = load_smollm2(cache_dir=cache_dir)
    seconds = time.perf_counter() - start
    return SimpleNamespace(cache_dir=cache_dir, model=model, tokenizer=tokenizer, seconds=seconds)
