"""Prompts equal hand-written expectations from docs/method.md section 4, on real rows of the released data.

The expected strings below are typed from that section (and the row texts from the fixture), never produced
by the code under test.
"""

from __future__ import annotations

import json

import pytest

from ktr.data.prompts import (
    QUESTION_TEMPLATE,
    QUESTION_TEMPLATE_EVAL,
    TYPE_TEMPLATE,
    build_messages,
    build_question,
    validate_row,
)
from tests import FIXTURES

ROWS_FILE = FIXTURES / "video_r1_rows.json"

# Spec text after "{Question}", training wording.
TRAIN = "\nPlease think about this question as if you were a human pondering deeply. Engage in an internal dialogue using expressions such as 'let me think', 'wait', 'Hmm', 'oh, I see', 'let's break it down', etc, or other natural language thought expressions It's encouraged to include self-reflection or verification in the reasoning process. Provide your detailed reasoning between the <think> </think> tags, and then give your final answer between the <answer> </answer> tags."  # noqa: E501
# Evaluation wording.
EVAL = "\nPlease think about this question as if you were a human pondering deeply. Engage in an internal dialogue using expressions such as 'let me think', 'wait', 'Hmm', 'oh, I see', 'let's break it down', etc, or other natural language thought expressions It's encouraged to include self-reflection or verification in the reasoning process. Provide your detailed reasoning between the <think> and </think> tags, and then give your final answer between the <answer> and </answer> tags."  # noqa: E501

MC = " Please provide only the single option letter (e.g., A, B, C, D, etc.) within the <answer> </answer> tags."
NUM = " Please provide the numerical value (e.g., 42 or 3.14) within the <answer> </answer> tags."
OCR = " Please transcribe text from the image/video clearly and provide your text answer within the <answer> </answer> tags."  # noqa: E501
FREE = " Please provide your text answer within the <answer> </answer> tags."


@pytest.fixture(scope="module")
def rows() -> dict[int, dict]:
    if not ROWS_FILE.exists():
        pytest.skip(f"fixture {ROWS_FILE} not found (expected the shared fixtures next to the repo)")
    return {row["problem_id"]: row for row in json.loads(ROWS_FILE.read_text())}


def test_templates_are_the_spec_text():
    assert QUESTION_TEMPLATE == "{Question}" + TRAIN
    assert QUESTION_TEMPLATE_EVAL == "{Question}" + EVAL
    assert TYPE_TEMPLATE == {"multiple choice": MC, "numerical": NUM, "OCR": OCR, "free-form": FREE, "regression": NUM}


# Row 601 written out in full once, so that no constant above can hide a mistake.
EXPECTED_601 = (
    "What type of hat is the man in red wearing?Options:\nA. newsboy cap\nB. derby\nC. beanie\nD. fedora\n"
    "\nPlease think about this question as if you were a human pondering deeply. Engage in an internal "
    "dialogue using expressions such as 'let me think', 'wait', 'Hmm', 'oh, I see', 'let's break it down', "
    "etc, or other natural language thought expressions It's encouraged to include self-reflection or "
    "verification in the reasoning process. Provide your detailed reasoning between the <think> </think> "
    "tags, and then give your final answer between the <answer> </answer> tags. Please provide only the "
    "single option letter (e.g., A, B, C, D, etc.) within the <answer> </answer> tags."
)


# (problem_id, expected user text, training wording)
CASES = [
    (601, EXPECTED_601),
    (108700, "How many people are featured in the video?Options:\nA. 4\nB. 2\nC. 5\nD. 3\n" + TRAIN + MC),
    (
        31530,  # Video-Holmes row: double spaces and newlines inside the problem, unicode options
        "Arrange the following events in chronological order:  \n① First confirmation of room number 370  \n"
        "② Key inserted, then changed to 356  \n③ Encountered 370 again, then changed to 328  \n"
        "④ Multiple failures before successfully opening the door  \n⑤ Corridor appeared behind the door"
        "Options:\nA. ①→③→②→④→⑤\nB. ②→①→④→③→⑤\nC. ①→②→③→④→⑤\nD. ④→①→③→②→⑤\nE. ③→②→①→⑤→④\n"
        "F. ⑤→④→③→②→①\n" + TRAIN + MC,
    ),
    (
        108851,
        "In Cora's research for her P.E. project, she looked into the participation of athletes from different "
        "countries in an international sporting event. How many countries have precisely 77 athletes competing?"
        + TRAIN + NUM,
    ),
    (108725, "How many objects are stationary when the video ends?" + TRAIN + NUM),
    (222, "Please write out the expression of the formula in the image using LaTeX format." + TRAIN + OCR),
    (495, "Are the couches made of cloth?\nAnswer the question using a single word or phrase." + TRAIN + FREE),
    (
        740,
        "How distant is the text image from the the ground with the sky vertically? Please measure it in inches."
        + TRAIN + NUM,
    ),
]


@pytest.mark.parametrize(("problem_id", "expected"), CASES, ids=[str(c[0]) for c in CASES])
def test_training_question(rows, problem_id, expected):
    assert build_question(rows[problem_id]) == expected


def test_eval_wording(rows):
    assert build_question(rows[108700], eval=True) == (
        "How many people are featured in the video?Options:\nA. 4\nB. 2\nC. 5\nD. 3\n" + EVAL + MC
    )
    assert build_question(rows[740], eval=True) == (
        "How distant is the text image from the the ground with the sky vertically? Please measure it in inches."
        + EVAL + NUM
    )


@pytest.mark.parametrize(("problem_id", "kind"), [(601, "image"), (108700, "video"), (108725, "video"), (222, "image")])
def test_messages_image_and_video(rows, problem_id, kind):
    expected_text = dict(CASES)[problem_id]
    messages = build_messages(rows[problem_id])
    assert messages == [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": expected_text}]}]


def test_all_fixture_rows_are_valid_and_build(rows):
    assert {r["data_type"] for r in rows.values()} == {"image", "video"}
    for row in rows.values():
        assert validate_row(row) == [], row["problem_id"]
        text = build_question(row)
        assert text.startswith(row["problem"]) and text.endswith(TYPE_TEMPLATE[row["problem_type"]])


def _row(**overrides) -> dict:
    row = {
        "problem_id": 1,
        "problem": "How many?",
        "problem_type": "numerical",
        "options": [],
        "solution": "<answer>3</answer>",
        "data_type": "video",
        "path": "./v.mp4",
    }
    row.update(overrides)
    return {k: v for k, v in row.items() if v is not _DROP}


_DROP = object()


def test_unknown_problem_type_names_field_and_value():
    with pytest.raises(ValueError, match=r"field 'problem_type': unknown value 'essay'"):
        build_question(_row(problem_type="essay"))
    assert validate_row(_row(problem_type="essay"))[0].startswith("field 'problem_type': unknown value 'essay'")


def test_multiple_choice_without_options_raises():
    for options in ([], _DROP):
        with pytest.raises(ValueError, match="field 'options'"):
            build_question(_row(problem_type="multiple choice", options=options, solution="<answer>A</answer>"))
    assert validate_row(_row(problem_type="multiple choice", solution="<answer>A</answer>")) == [
        "field 'options': multiple choice row has no options"
    ]


def test_options_on_non_multiple_choice_ignored_in_prompt_but_reported():
    row = _row(options=["A. 1", "B. 2"])
    assert build_question(row) == "How many?" + TRAIN + NUM  # released behaviour
    assert validate_row(row) == ["field 'options': 2 options given for problem_type 'numerical'"]


def test_validate_row_reports_each_problem():
    assert validate_row(_row(path=_DROP, solution=_DROP)) == ["missing field 'solution'", "missing field 'path'"]
    assert validate_row(_row(data_type="audio")) == [
        "field 'data_type': unknown value 'audio'; expected one of 'image', 'video'"
    ]
    assert validate_row(_row(solution="3")) == ["field 'solution': no <answer>...</answer> tag in '3'"]
    assert validate_row(_row(solution="<answer> </answer>")) == ["field 'solution': the <answer> tag is empty"]
    assert validate_row(_row(problem=5)) == ["field 'problem': expected a string, got int"]
    assert validate_row(_row(problem_type="multiple choice", options="A. 1", solution="<answer>A</answer>")) == [
        "field 'options': expected a list of strings, got 'A. 1'"
    ]


def test_build_messages_rejects_unknown_data_type():
    with pytest.raises(ValueError, match="field 'data_type'"):
        build_messages(_row(data_type="audio"))


def test_docstring_examples_run():
    import doctest

    import ktr.data.prompts

    result = doctest.testmod(ktr.data.prompts)
    assert result.attempted > 0 and result.failed == 0
