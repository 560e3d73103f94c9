import os
from pathlib import Path

import pytest
import torch

from tests import FIXTURES

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RUN_FIRST = (
    # the two demo runs (tests/test_demo_learns.py): about 4 minutes on both cores, one file, one test
    "test_demo_learns.py",
    # the longest one-process files (20-100 s each on 2 cores)
    "test_prefix.py", "test_first_contact.py", "test_resume.py", "test_probes.py", "test_export.py",
    "test_gpu_check.py", "test_reliability.py", "test_evaluator.py",
    # the 2-process FSDP2 runs, queued after the files above so that they mostly start once the demo runs ended:
    # in 2 of 3 local suites where one ran beside them it took 5-15x its usual 15-25 s (cause not found)
    "test_distributed.py", "test_split_fsdp.py", "test_qwen35.py",
)
"""Test files queued first, longest first, the rest after them in collection order.

`pytest -n 2 --dist loadfile` hands whole files to the two workers from one queue; by default pytest-xdist orders
that queue by the number of tests in a file, which put the demo guard (one test, 4 minutes) last, so one worker
ran it alone at the end (the suite 11-12 minutes, one worker idle for the last 4). Queueing the long files first
lets the other worker take the short ones meanwhile."""


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the queue in RUN_FIRST's order
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(RUN_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(RUN_FIRST)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"shared fixtures not found at {FIXTURES} (present in CI; absent in a user's clone)")
    return FIXTURES


@pytest.fixture(scope="session")
def tiny_policy():
    """The built-in tiny Qwen2.5-VL with the real tokenizer (built once per session)."""
    from ktr.config import PolicyConfig
    from ktr.model.policy import load_policy

    torch.set_num_threads(1)
    return load_policy(PolicyConfig(attn_implementation="eager"))


@pytest.fixture(scope="session")
def tiny_qwen3vl():
    """The built-in tiny Qwen3-VL (deepstack, timestamped videos) with the real Qwen3 tokenizer."""
    from ktr.config import PolicyConfig
    from ktr.model.policy import load_policy

    torch.set_num_threads(1)
    return load_policy(PolicyConfig(name_or_path="tiny-qwen3vl", attn_implementation="eager"))


TINY_FAMILIES = ["tiny", "tiny-qwen3vl"]


@pytest.fixture(params=TINY_FAMILIES)
def tiny_any(request):
    """Each tiny family in turn (the family-agnostic tests run on both)."""
    return request.getfixturevalue("tiny_policy" if request.param == "tiny" else "tiny_qwen3vl")
