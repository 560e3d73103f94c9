"""Rollout backends are looked up by name; a dotted entry is imported only when chosen."""

import pytest

from ktr.config import SamplingConfig
from ktr.rollout.base import ROLLOUT_BACKENDS, rollout_backend
from ktr.rollout.hf import HFBackend


def test_unknown_backend_names_the_registered_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown rollout backend 'nope'.*'hf'"):
        rollout_backend("nope")


def test_dotted_entry_is_imported_on_first_use(monkeypatch) -> None:
    monkeypatch.setitem(ROLLOUT_BACKENDS, "lazy", "ktr.rollout.hf:HFBackend")
    assert type(rollout_backend("lazy")) is HFBackend
    assert type(rollout_backend("hf")) is HFBackend


def test_shared_prefix_is_the_default() -> None:
    from ktr.rollout.shared import SharedPrefixBackend

    assert type(rollout_backend(SamplingConfig().backend)) is SharedPrefixBackend
