"""Answer extraction and the Video-R1 schema vocabulary (layer L1: stdlib only).

The released Video-R1 / Video-KTR code reads answers from ``<answer>...</answer>`` tags in both the model
output and the dataset's ``solution`` field (docs/method.md section 4.3). Training and evaluation differ only
in what happens when no answer can be read: training scores the empty string, evaluation falls back to
the whole output (docs/method.md section 6.1).

The problem and data types live here, at the bottom layer, so that prompts (L2), rewards (L1) and data
loaders (L3) share one list.
"""

from __future__ import annotations

import re
from typing import Literal, get_args

ProblemType = Literal["multiple choice", "numerical", "OCR", "free-form", "regression"]
PROBLEM_TYPES: tuple[str, ...] = get_args(ProblemType)

DataType = Literal["image", "video"]
DATA_TYPES: tuple[str, ...] = get_args(DataType)

# Non-greedy and DOTALL as released, so a multi-line answer is read up to the *first* closing tag.
ANSWER_RE = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)


def has_answer_tag(text: str) -> bool:
    """True when ``text`` holds a complete ``<answer>...</answer>`` pair.

    >>> has_answer_tag("<think>hm</think><answer>B</answer>"), has_answer_tag("B")
    (True, False)
    """
    return ANSWER_RE.search(text) is not None


def extract_answer(text: str) -> str:
    """Content of the first ``<answer>...</answer>`` pair, stripped; ``""`` when there is none.

    Used for training rewards, on both the completion and the ``solution`` field.

    >>> extract_answer("<think>...</think>\\n<answer>  B </answer>")
    'B'
    >>> extract_answer("<answer>1</answer> and <answer>2</answer>")
    '1'
    >>> extract_answer("the answer is B")
    ''
    """
    match = ANSWER_RE.search(text)
    return match.group(1).strip() if match else ""


def extract_answer_or_text(text: str) -> str:
    """Evaluation rule: the tag content, or the whole output stripped when that is empty.

    As in the released evaluation code, an empty tag (``<answer></answer>``) also falls back to the whole
    output, since only the extracted string is looked at.

    >>> extract_answer_or_text("<answer>C</answer>"), extract_answer_or_text("  C\\n")
    ('C', 'C')
    """
    answer = extract_answer(text)
    return answer if answer else text.strip()
