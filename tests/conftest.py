import os

# As the `ktr` command does (ktr/__main__.py): torch's large CPU tensors on huge pages, set before its first allocation,
# and glibc's thresholds, so that the in-process tests allocate as the command does; the processes the tests start
# inherit the huge pages (and set the thresholds themselves where they run `ktr`).
from ktr.__main__ import allocator_defaults

allocator_defaults()
# Before anything imports huggingface_hub (Lightning does), which reads the variable once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

# Lightning gives its loggers a handler on the `sys.stderr` of the moment it is first imported. Imported here, that is
# the session's stream; first imported inside a test with `capsys`, it was that test's stream, closed when the test
# ended, and every later Lightning log in the worker printed "--- Logging error ---" with a traceback to stderr
# (test_first_contact's "no Traceback in stderr" check failed after test_readme's `--help` runs had imported it).
import lightning.pytorch  # noqa: E402,F401
import pytest  # noqa: E402
import torch  # noqa: E402

from tests import FIXTURES  # noqa: E402


_SCHEDULING = (os.sched_getscheduler(0), os.sched_getparam(0)) if hasattr(os, "sched_getscheduler") else None


@pytest.fixture(autouse=True)
def _scheduling_unchanged():
    """No test leaves its worker with another scheduling policy: the processes a worker starts later inherit it.
    (SVT-AV1 made a root worker real-time, and the demo guard's runs then starved a 2-process FSDP test ~10x.)"""
    yield
    if _SCHEDULING is not None and (os.sched_getscheduler(0), os.sched_getparam(0)) != _SCHEDULING:
        now = os.sched_getscheduler(0), os.sched_getparam(0).sched_priority
        os.sched_setscheduler(0, *_SCHEDULING)
        pytest.fail(f"the test left this process with scheduling policy {now[0]}, priority {now[1]} (was "
                    f"{_SCHEDULING[0]}, {_SCHEDULING[1].sched_priority}); restored")


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
