import os
from pathlib import Path

import pytest
import torch

from tests import FIXTURES

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"shared fixtures not found at {FIXTURES} (present in CI; absent in a user's clone)")
    return FIXTURES


@pytest.fixture(scope="session")
def tiny_policy():
    """The built-in tiny Qwen2.5-VL with the real tokenizer (built once per session)."""
    from ktr.policy import PolicyConfig, load_policy

    torch.set_num_threads(1)
    return load_policy(PolicyConfig(attn_implementation="eager"))
