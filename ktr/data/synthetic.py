"""A synthetic video reasoning task generated on the fly, in the Video-R1 schema (layer L2, no files).

Each item is a short clip of coloured squares. The answer depends on what is shown *and* on frame order:
- `direction`: one square moves across the frame; which way? (reversing the clip flips the answer)
- `order`: two coloured squares appear one after the other; which colour came first?
- `third`: three of the four colours flash one after the other; which colour came third? (harder: knowing
  which colours are shown narrows it to 3 of 4 options, only frame order settles it)
So the visual probe (hide the video) and the temporal probe (shuffle the frames) both have something to find.
Items are a pure function of (seed, index): a dataset of any length costs no memory and no disk.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (235, 220, 40),
}
DIRECTIONS = ("left to right", "right to left", "top to bottom", "bottom to top")
TaskKind = Literal["direction", "order", "third"]
KINDS = ("direction", "order", "third")


@dataclass
class SyntheticSpec:
    """Shape of the synthetic clips."""

    num_frames: int = 8
    """Raw frames per clip (the frame sampler then picks min(max_frames, ...) of them)."""
    size: int = 56
    """Frame height and width in pixels (a multiple of 28 needs no resize)."""
    fps: float = 4.0
    """Nominal frame rate of the raw clip."""
    square: int = 28
    """Side of the moving square in pixels (large, so a tiny random vision tower sees it in every patch row)."""
    kinds: tuple[str, ...] = ("direction", "order")
    """Question kinds to mix."""


def _blank(spec: SyntheticSpec) -> Tensor:
    return torch.full((spec.num_frames, 3, spec.size, spec.size), 16, dtype=torch.uint8)  # [F, 3, H, W]


def _paint(frames: Tensor, f: int, y: int, x: int, side: int, colour: tuple[int, int, int]) -> None:
    frames[f, :, y: y + side, x: x + side] = torch.tensor(colour, dtype=torch.uint8).view(3, 1, 1)


def render_direction(spec: SyntheticSpec, direction: str, colour: str, lane: int) -> Tensor:
    """A square crossing the frame in `direction`; `lane` picks the fixed coordinate. `[F, 3, H, W]` uint8."""
    frames = _blank(spec)
    span = spec.size - spec.square
    for f in range(spec.num_frames):
        step = round(span * f / max(1, spec.num_frames - 1))
        pos = {"left to right": (lane, step), "right to left": (lane, span - step),
               "top to bottom": (step, lane), "bottom to top": (span - step, lane)}[direction]
        _paint(frames, f, pos[0], pos[1], spec.square, COLOURS[colour])
    return frames


def render_order(spec: SyntheticSpec, first: str, second: str, y: int, x: int) -> Tensor:
    """`first` colour filling the first half of the clip, `second` the second half (a flash of each colour).

    `y`/`x` place a dark square on top, so that no two clips are pixel-identical.
    """
    frames = _blank(spec)
    half = spec.num_frames // 2
    for f in range(spec.num_frames):
        _paint(frames, f, 0, 0, spec.size, COLOURS[first if f < half else second])
        _paint(frames, f, y, x, spec.square // 2, (16, 16, 16))
    return frames


def render_sequence(spec: SyntheticSpec, colours: list[str], y: int, x: int) -> Tensor:
    """Each colour of `colours` fills one consecutive block of frames, in order (`[F, 3, H, W]` uint8).

    Block `k` covers frames `[k * F // n, (k + 1) * F // n)`; with `F = 2 n` (e.g. 6 frames for 3 colours) every
    block is one temporal patch of the vision tower. `y`/`x` place a dark square on top, as in `render_order`.
    """
    frames = _blank(spec)
    n = len(colours)
    for f in range(spec.num_frames):
        _paint(frames, f, 0, 0, spec.size, COLOURS[colours[min(n - 1, f * n // spec.num_frames)]])
        _paint(frames, f, y, x, spec.square // 2, (16, 16, 16))
    return frames


def make_item(seed: int, index: int, spec: SyntheticSpec, render: bool = True) -> tuple[dict, Tensor | None]:
    """Row in the Video-R1 schema (multiple choice) and its raw frames `[F, 3, H, W]` uint8 (None if not `render`)."""
    rng = random.Random(seed * 1_000_003 + index)
    kind = spec.kinds[rng.randrange(len(spec.kinds))]
    span = spec.size - spec.square
    if kind == "direction":
        answer_text = rng.choice(DIRECTIONS)
        colour, lane = rng.choice(list(COLOURS)), rng.randrange(span + 1)
        frames = render_direction(spec, answer_text, colour, lane) if render else None
        problem = "In which direction does the square move?"
        choices = list(DIRECTIONS)
    elif kind == "order":
        first, second = rng.sample(list(COLOURS), 2)
        y, x = rng.randrange(span + 1), rng.randrange(span + 1)
        frames = render_order(spec, first, second, y, x) if render else None
        problem = "Which colour appears first?"
        choices, answer_text = list(COLOURS), first
    elif kind == "third":
        shown = rng.sample(list(COLOURS), 3)
        y, x = rng.randrange(span + 1), rng.randrange(span + 1)
        frames = render_sequence(spec, shown, y, x) if render else None
        problem = "Which colour appears third?"
        choices, answer_text = list(COLOURS), shown[2]
    else:
        raise ValueError(f"unknown synthetic kind {kind!r}; expected one of {KINDS}")
    letters = "ABCD"
    options = [f"{letters[i]}. {c}" for i, c in enumerate(choices)]
    row = {
        "problem_id": f"synthetic-{seed}-{index}",
        "problem": problem,
        "data_type": "video",
        "problem_type": "multiple choice",
        "options": options,
        "solution": f"<answer>{letters[choices.index(answer_text)]}</answer>",
        "path": f"synthetic://{seed}/{index}",
        "data_source": f"synthetic/{kind}",
    }
    if kind == "third":
        row["colours"] = shown  # ground truth in frame order (the planted-attribution task reads it)
    return row, frames


def moving_pattern(n: int, height: int = 120, width: int = 160, sweep: int | None = None) -> Tensor:
    """`[n, 3, H, W]` uint8 test clip in which every frame differs: colour ramps that drift and a red square that moves
    down by one row per frame, over `sweep` rows (default: `height // 2`, made odd so that it never divides the
    ramps' period of 256 frames and no two of the first 256 * sweep frames are equal) before it starts again. Used
    to compare video decoders frame by frame (tests, scripts/decode_compare.py)."""
    sweep = (height // 2) | 1 if sweep is None else sweep
    y, x = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    out = torch.empty(n, 3, height, width, dtype=torch.uint8)
    top, side, left, right = height // 12, height // 4, width // 8, 3 * width // 8
    for t in range(n):
        out[t, 0] = (x * 255 // width + 3 * t) % 256
        out[t, 1] = (y * 255 // height + 5 * t) % 256
        out[t, 2] = (7 * t) % 256
        row = top + t % sweep
        out[t, :, row: row + side, left:right] = torch.tensor([230, 40, 40]).view(3, 1, 1)
    return out
