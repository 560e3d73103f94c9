"""Format reward of the released Video-R1 / Video-KTR run (layer L1, docs/method.md section 4.5)."""

from __future__ import annotations

import re

from ktr.rewards.registry import register_reward

FORMAT_RE = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)


@register_reward("format")
def format_reward(completion: str, solution: str = "", problem_type: str = "") -> float:
    """1.0 when the *whole* completion is ``<think>...</think>`` then ``<answer>...</answer>``, else 0.0.

    ``solution`` and ``problem_type`` are unused; they are there so that the function follows the reward
    protocol of :mod:`ktr.rewards.registry`.

    >>> format_reward("<think>let me think</think>\\n<answer>B</answer>")
    1.0
    >>> format_reward("<think>hm</think><answer>B</answer> trailing text")
    0.0
    """
    return 1.0 if FORMAT_RE.fullmatch(completion) is not None else 0.0
