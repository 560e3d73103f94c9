"""Rewards (layer L1): pure functions of strings, looked up by name.

Built-ins: ``"accuracy"`` and ``"format"`` (docs/method.md sections 4.4-4.5) and the length bonus. Custom rewards
follow the protocol of :mod:`ktr.rewards.registry` and are named in the config by dotted path.
"""

from ktr.rewards.accuracy import (  # noqa: I001 - registers "accuracy", needs the registry first
    ACCURACY_SCORERS,
    accuracy_reward,
    accuracy_reward_detail,
    parse_number,
    rouge_mean_f,
    word_error_rate,
)
from ktr.rewards.format import format_reward
from ktr.rewards.length import LengthReading, length_bonus
from ktr.rewards.registry import (REWARD_DETAILS, REWARDS, RewardFn, RewardResult, compute_rewards, get_reward,
                                  get_reward_detail, register_reward, resolve_rewards)

__all__ = [
    "ACCURACY_SCORERS",
    "REWARDS",
    "REWARD_DETAILS",
    "LengthReading",
    "RewardFn",
    "RewardResult",
    "accuracy_reward",
    "accuracy_reward_detail",
    "compute_rewards",
    "format_reward",
    "get_reward",
    "get_reward_detail",
    "length_bonus",
    "parse_number",
    "register_reward",
    "resolve_rewards",
    "rouge_mean_f",
    "word_error_rate",
]
