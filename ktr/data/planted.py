"""Planted ground truth for the attribution probes: completions whose token roles are known (layer L2, pure text).

The `third` synthetic clip shows three of the four colours one after the other. Its planted completion lists
them twice, first in a fixed (alphabetical) order, then in frame order:

    <think>colours: blue, green, red. order: red, blue, green.</think><answer>C</answer>

Under teacher forcing a token's log-prob can depend on the video only if the prefix before it does not already
fix it. The labels say exactly that, computed by enumerating every clip of the task (the 24 ordered triples)
and comparing their tokenised completions:

- `content`: the token at position t differs among the clips whose completions share the first t tokens. These
  are the tokens that hiding the video can change (the visual probe's target).
- `order`: the token at t differs among those clips *that show the same set of colours*. Only frame order can
  change these (the temporal probe's target). Every order token is a content token.

So the alphabetical list is content-only, the frame-order list is order (except its last colour, which the
set and the first two fix), and the template words, the answer letter (fixed by the order list) and the end
token are neither. A token split differently by the tokenizer is handled too: the comparison is on token ids.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import permutations

from ktr.data.synthetic import COLOURS

Tokenize = Callable[[str], list[int]]
LABELS = ("content", "order")


def planted_target(colours: Sequence[str], choices: Sequence[str] = tuple(COLOURS)) -> str:
    """The planted completion of a `third` clip showing `colours` in frame order (answer: the third one)."""
    if len(set(colours)) != len(colours) or not set(colours) <= set(choices):
        raise ValueError(f"colours must be distinct names from {list(choices)}, got {list(colours)}")
    letter = "ABCDEFGH"[list(choices).index(colours[2])]
    return (f"<think>colours: {', '.join(sorted(colours))}. order: {', '.join(colours)}.</think>"
            f"<answer>{letter}</answer>")


def all_clips(palette: Sequence[str] = tuple(COLOURS), k: int = 3) -> list[tuple[str, ...]]:
    """Every clip of the task: ordered k-tuples of distinct colours."""
    return list(permutations(palette, k))


def token_labels(colours: Sequence[str], tokenize: Tokenize, end_ids: Sequence[int] = (),
                 palette: Sequence[str] = tuple(COLOURS)) -> dict[str, list[bool]]:
    """Per-token `content` / `order` labels of the planted completion of `colours` (see the module docstring).

    Args:
        colours: the clip's colours in frame order.
        tokenize: text -> token ids, exactly as the completion is tokenised for scoring.
        end_ids: ids appended after the text (e.g. `<|im_end|>`); they are fixed, so labelled neither.
        palette: the task's colours (the options).
    Returns:
        `{"content": [bool] * T, "order": [bool] * T}` with `T = len(tokenize(target)) + len(end_ids)`.
    """
    clips = all_clips(palette, len(colours))
    if tuple(colours) not in clips:
        raise ValueError(f"{list(colours)} is not a clip of this task (distinct colours from {list(palette)})")
    seqs = {c: list(tokenize(planted_target(c, palette))) + list(end_ids) for c in clips}
    mine = seqs[tuple(colours)]
    labels: dict[str, list[bool]] = {name: [] for name in LABELS}
    for t in range(len(mine)):
        same_prefix = [c for c, s in seqs.items() if s[:t] == mine[:t]]
        same_set = [c for c in same_prefix if set(c) == set(colours)]
        labels["content"].append(len({_at(seqs[c], t) for c in same_prefix}) > 1)
        labels["order"].append(len({_at(seqs[c], t) for c in same_set}) > 1)
    return labels


def _at(seq: list[int], t: int) -> int | None:
    return seq[t] if t < len(seq) else None  # a shorter completion "ends" here: that differs too
