"""Prompts of the released Video-R1 / Video-KTR run, character for character (docs/method.md sections 4.1-4.2).

Layer L2, but pure text: no tokenizer or processor here. The user turn is one vision item followed by
``QUESTION_TEMPLATE.format(Question=q) + TYPE_TEMPLATE[problem_type]``; no system message is added, so
the chat template's default system prompt applies. Rows follow the Video-R1 schema (``problem``,
``problem_type``, ``options``, ``data_type``, ``solution``, ``path``).

Options on a non-multiple-choice row are ignored by :func:`build_question`, as in the released code (the
prompt then equals the released one); :func:`validate_row` reports them so that the data loader can skip
such a row as bad input, naming the file and row.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ktr.answers import ANSWER_RE, DATA_TYPES, PROBLEM_TYPES

_THOUGHT = (
    "\nPlease think about this question as if you were a human pondering deeply. Engage in an internal "
    "dialogue using expressions such as 'let me think', 'wait', 'Hmm', 'oh, I see', 'let's break it down', "
    "etc, or other natural language thought expressions It's encouraged to include self-reflection or "
    "verification in the reasoning process. "
)

QUESTION_TEMPLATE = (
    "{Question}" + _THOUGHT + "Provide your detailed reasoning between the <think> </think> tags, "
    "and then give your final answer between the <answer> </answer> tags."
)
"""Training wording (the released GRPO script)."""

QUESTION_TEMPLATE_EVAL = (
    "{Question}" + _THOUGHT + "Provide your detailed reasoning between the <think> and </think> tags, "
    "and then give your final answer between the <answer> and </answer> tags."
)
"""Evaluation wording (the released evaluation script): only the two tag phrases differ."""

_NUMERIC = " Please provide the numerical value (e.g., 42 or 3.14) within the <answer> </answer> tags."

# Each suffix starts with a space: it is appended directly after the question template.
TYPE_TEMPLATE: dict[str, str] = {
    "multiple choice": (
        " Please provide only the single option letter (e.g., A, B, C, D, etc.) within the <answer> </answer> tags."
    ),
    "numerical": _NUMERIC,
    "OCR": (
        " Please transcribe text from the image/video clearly and provide your text answer within the "
        "<answer> </answer> tags."
    ),
    "free-form": " Please provide your text answer within the <answer> </answer> tags.",
    "regression": _NUMERIC,
}
assert set(TYPE_TEMPLATE) == set(PROBLEM_TYPES)

REQUIRED_FIELDS: tuple[str, ...] = ("problem", "problem_type", "solution", "data_type", "path")


def _options_problem(row: Mapping[str, Any]) -> str | None:
    """The problem with ``options`` for this row's type, or None when they are fine."""
    options = row.get("options")
    is_mc = row.get("problem_type") == "multiple choice"
    if options is None or (isinstance(options, (list, tuple)) and len(options) == 0):
        return "field 'options': multiple choice row has no options" if is_mc else None
    if not isinstance(options, (list, tuple)) or not all(isinstance(o, str) for o in options):
        return f"field 'options': expected a list of strings, got {options!r:.80}"
    if not is_mc:
        return f"field 'options': {len(options)} options given for problem_type {row.get('problem_type')!r}"
    return None


def validate_row(row: Mapping[str, Any]) -> list[str]:
    """Every schema problem of one row, each naming its field; ``[]`` for a good row.

    The caller prefixes file and row index (it knows them; this function does not).

    >>> validate_row({"problem": "Q?", "problem_type": "essay", "solution": "B", "data_type": "video",
    ...               "path": "./v.mp4"})  # doctest: +NORMALIZE_WHITESPACE
    ["field 'problem_type': unknown value 'essay'; expected one of 'multiple choice', 'numerical',
      'OCR', 'free-form', 'regression'", "field 'solution': no <answer>...</answer> tag in 'B'"]
    """
    problems = [f"missing field {name!r}" for name in REQUIRED_FIELDS if row.get(name) is None]
    for name in ("problem", "solution", "path"):
        if row.get(name) is not None and not isinstance(row[name], str):
            problems.append(f"field {name!r}: expected a string, got {type(row[name]).__name__}")
    ptype, dtype = row.get("problem_type"), row.get("data_type")
    if ptype is not None and ptype not in PROBLEM_TYPES:
        problems.append(f"field 'problem_type': unknown value {ptype!r}; expected one of {_listing(PROBLEM_TYPES)}")
    if dtype is not None and dtype not in DATA_TYPES:
        problems.append(f"field 'data_type': unknown value {dtype!r}; expected one of {_listing(DATA_TYPES)}")
    if ptype in PROBLEM_TYPES and (options_problem := _options_problem(row)) is not None:
        problems.append(options_problem)
    solution = row.get("solution")
    if isinstance(solution, str):
        match = ANSWER_RE.search(solution)
        if match is None:
            problems.append(f"field 'solution': no <answer>...</answer> tag in {solution!r:.80}")
        elif not match.group(1).strip():
            problems.append("field 'solution': the <answer> tag is empty")
    return problems


def _listing(values: tuple[str, ...]) -> str:
    return ", ".join(repr(v) for v in values)


def build_question(row: Mapping[str, Any], *, eval: bool = False) -> str:  # noqa: A002 (spec'd name)
    """The user text of one row: question template (training or ``eval`` wording) + type suffix.

    For multiple choice, ``q = problem + "Options:\\n" + "".join(option + "\\n" for option in options)``
    (no separator before ``Options:``, as released); otherwise ``q = problem`` and ``options`` is ignored.
    Raises ``ValueError`` naming the field for a row no prompt can be built from.

    >>> row = {"problem": "Which?", "problem_type": "multiple choice", "options": ["A. x", "B. y"]}
    >>> build_question(row).split("\\n")[:3]
    ['Which?Options:', 'A. x', 'B. y']
    """
    problem, ptype = row.get("problem"), row.get("problem_type")
    if not isinstance(problem, str):
        raise ValueError(f"field 'problem': expected a string, got {problem!r:.80}")
    if ptype not in TYPE_TEMPLATE:
        raise ValueError(f"field 'problem_type': unknown value {ptype!r}; expected one of {_listing(PROBLEM_TYPES)}")
    question = problem
    if ptype == "multiple choice":
        options_problem = _options_problem(row)
        if options_problem is not None:
            raise ValueError(options_problem)
        question = problem + "Options:\n" + "".join(option + "\n" for option in row["options"])
    template = QUESTION_TEMPLATE_EVAL if eval else QUESTION_TEMPLATE
    return template.format(Question=question) + TYPE_TEMPLATE[ptype]


def build_messages(row: Mapping[str, Any], *, eval: bool = False) -> list[dict[str, Any]]:  # noqa: A002
    """Chat messages of one row in the Hugging Face / Qwen2.5-VL format, with no system message.

    Returns ``[{"role": "user", "content": [{"type": "video" | "image"}, {"type": "text", "text": ...}]}]``;
    the processor's chat template inserts the vision placeholder tokens where the vision item sits.

    >>> build_messages({"problem": "Q", "problem_type": "free-form", "data_type": "image"})[0]["content"][0]
    {'type': 'image'}
    """
    dtype = row.get("data_type")
    if dtype not in DATA_TYPES:
        raise ValueError(f"field 'data_type': unknown value {dtype!r}; expected one of {_listing(DATA_TYPES)}")
    text = build_question(row, eval=eval)
    return [{"role": "user", "content": [{"type": dtype}, {"type": "text", "text": text}]}]
