"""Group advantages: hand-computed values, G = 1, Dr. GRPO, layout validation, registry."""

from __future__ import annotations

import doctest

import pytest
import torch

import ktr.advantages
from ktr.advantages import ADVANTAGES, get_advantage_fn, group_advantages


def test_hand_values_one_group() -> None:
    # r = [1, 0, 0, 0]: mean 0.25, centred [0.75, -0.25, -0.25, -0.25],
    # unbiased var = (0.5625 + 3 * 0.0625) / 3 = 0.25, std = 0.5.
    a = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), group_size=4)
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25]) / (0.5 + 1e-4)
    torch.testing.assert_close(a, expected)


def test_groups_are_consecutive_blocks() -> None:
    # Group 1 = [1, 0]: centred [0.5, -0.5], std = sqrt(0.5); group 2 = [2, 2]: constant -> 0.
    a = group_advantages(torch.tensor([1.0, 0.0, 2.0, 2.0]), group_size=2, eps=1e-4)
    s = 0.5 / (0.5**0.5 + 1e-4)
    torch.testing.assert_close(a, torch.tensor([s, -s, 0.0, 0.0]))
    # Interleaving the same rewards changes the groups and so the result.
    b = group_advantages(torch.tensor([1.0, 2.0, 0.0, 2.0]), group_size=2)
    assert not torch.allclose(a, b)


def test_unscaled_is_dr_grpo() -> None:
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 3.0, 1.0])
    a = group_advantages(r, group_size=3, scale_by_std=False)
    torch.testing.assert_close(a, torch.tensor([2 / 3, -1 / 3, -1 / 3, -4 / 3, 5 / 3, -1 / 3]))
    torch.testing.assert_close(get_advantage_fn("drgrpo")(r, 3), a)


def test_matches_torch_std_reference() -> None:
    torch.manual_seed(0)
    r = torch.rand(5 * 8, dtype=torch.float64)
    g = r.view(5, 8)
    ref = ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-4)).reshape(-1)
    torch.testing.assert_close(group_advantages(r, 8), ref)
    assert group_advantages(r, 8).dtype == torch.float64


@pytest.mark.parametrize("scale", [True, False])
def test_group_size_one_is_zero_not_nan(scale: bool) -> None:
    a = group_advantages(torch.tensor([3.0, -1.0, 0.5]), group_size=1, scale_by_std=scale)
    assert torch.equal(a, torch.zeros(3))


def test_low_precision_input_is_upcast() -> None:
    a = group_advantages(torch.tensor([1.0, 0.0], dtype=torch.bfloat16), group_size=2)
    assert a.dtype == torch.float32
    assert torch.isfinite(a).all()


@pytest.mark.parametrize(
    ("rewards", "group_size", "match"),
    [
        (torch.zeros(5), 2, "not a multiple of group_size=2"),
        (torch.zeros(2, 2), 2, "1-D"),
        (torch.zeros(4), 0, "positive int"),
    ],
)
def test_bad_layout_raises(rewards: torch.Tensor, group_size: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        group_advantages(rewards, group_size)


def test_zero_eps_rejected_when_scaling() -> None:
    with pytest.raises(ValueError, match="eps"):
        group_advantages(torch.zeros(4), 2, eps=0.0)
    # Without scaling eps is unused, so 0 is fine.
    assert torch.equal(group_advantages(torch.zeros(4), 2, eps=0.0, scale_by_std=False), torch.zeros(4))


def test_registry() -> None:
    assert {"grpo", "drgrpo"} <= set(ADVANTAGES)
    r = torch.tensor([1.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(get_advantage_fn("grpo")(r, 4), group_advantages(r, 4))
    with pytest.raises(ValueError, match="drgrpo"):
        get_advantage_fn("ppo")


def test_docstring_example() -> None:
    result = doctest.testmod(ktr.advantages, extraglobs={"torch": torch})
    assert result.attempted >= 1 and result.failed == 0
