"""Rewards of docs/method.md section 4: hand-computed values, rouge-score parity, properties, registry."""

from __future__ import annotations

import doctest
import json
import math
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer

import ktr.rewards.accuracy
import ktr.rewards.format
import ktr.rewards.length
import ktr.rewards.registry
from ktr.rewards import (
    REWARDS,
    accuracy_reward,
    accuracy_reward_detail,
    compute_rewards,
    format_reward,
    get_reward,
    length_bonus,
    register_reward,
)
from tests import FIXTURES as FIXTURES_ROOT

ROWS_FILE = FIXTURES_ROOT / "video_r1_rows.json"
TYPES = ["multiple choice", "numerical", "OCR", "free-form", "regression"]


def acc(pred: str, gt: str, problem_type: str) -> float:
    """Accuracy with both answers wrapped in tags, the way completions and solutions carry them."""
    return accuracy_reward(f"<think>t</think><answer>{pred}</answer>", f"<answer>{gt}</answer>", problem_type)


# ---------------------------------------------------------------- multiple choice


def test_multiple_choice():
    assert acc("B", "B", "multiple choice") == 1.0
    assert acc("C", "B", "multiple choice") == 0.0
    assert acc("b", "B", "multiple choice") == 0.0  # exact match, case-sensitive
    assert acc("B. derby", "B", "multiple choice") == 0.0
    assert acc("", "B", "multiple choice") == 0.0  # empty answer
    assert accuracy_reward("<answer>  B \n</answer>", "<answer>B</answer>", "multiple choice") == 1.0
    # Multiple tags: the first one counts.
    assert accuracy_reward("<answer>A</answer><answer>B</answer>", "<answer>B</answer>", "multiple choice") == 0.0
    assert accuracy_reward("<answer>B</answer><answer>A</answer>", "<answer>B</answer>", "multiple choice") == 1.0


# ---------------------------------------------------------------- numerical


@pytest.mark.parametrize(
    ("pred", "gt", "expected"),
    [
        ("3", "3", 1.0),
        ("3", "3.0", 0.0),  # exactly one has a decimal point
        ("3.0", "3", 0.0),
        ("3.0", "3.00", 1.0),
        ("1,000", "1000", 0.0),  # exactly one has a comma
        ("1,000", "1,000.00", 1.0),  # both have one: commas removed, 1000 == 1000
        ("1.000", "1,000", 0.0),  # both "decimal": 1.0 vs 1000.0
        ("3.141", "3.14", 1.0),  # equal after rounding to 2 decimals
        ("3.146", "3.14", 0.0),  # 3.15 vs 3.14
        ("0.624", "0.62", 1.0),
        ("69.01", "69.01", 1.0),  # real solutions from the fixture rows
        ("-2", "-2", 1.0),
        ("2", "-2", 0.0),
        ("", "3", 0.0),  # empty answer
        ("three", "3", 0.0),  # unparsable
        ("inf", "inf", 0.0),  # non-finite is unparsable here (released float() accepted it)
    ],
)
def test_numerical(pred, gt, expected):
    assert acc(pred, gt, "numerical") == expected


def test_numerical_parse_failures_are_reported():
    for pred in ("", "three", "nan"):
        result = accuracy_reward_detail(f"<answer>{pred}</answer>", "<answer>3</answer>", "numerical")
        assert result.value == 0.0 and not result.parse_ok and "unparsable number" in result.reason
    # A decimal mismatch is a decided 0, not a parse failure.
    assert accuracy_reward_detail("<answer>3</answer>", "<answer>3.0</answer>", "numerical").parse_ok


# ---------------------------------------------------------------- OCR


@pytest.mark.parametrize(
    ("pred", "gt", "expected"),
    [
        ("a b c d", "a b c d", 1.0),
        ("a x c", "a b c d", 0.5),  # 1 substitution + 1 deletion over 4 reference words
        ("the cat sit on mat", "the cat sat on the mat", 1 - 2 / 6),
        ("a b c d e", "a", 0.0),  # 4 insertions / 1 word: WER 4, clipped
        ("", "a b", 0.0),  # empty answer: WER 1
        ("honest sorrow\".", "honest\nsorrow\".", 1.0),  # words split on any whitespace (fixture row 2014)
        ("5 3 - 3 = 5 O", "5 3 - 3 = 5 0", 1 - 1 / 7),  # fixture row 222, one wrong symbol
    ],
)
def test_ocr(pred, gt, expected):
    assert acc(pred, gt, "OCR") == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------- free-form (ROUGE)


def test_free_form_hand_value():
    # Stemmed tokens: ref [the, cat, are, run], pred [the, cat, run].
    # ROUGE-1 F = 2*1*(3/4)/(1+3/4) = 6/7; ROUGE-2: 1 of 2 pred / 3 ref bigrams, F = 0.4; ROUGE-L: LCS 3, F = 6/7.
    assert acc("the cat runs", "The cats are running", "free-form") == pytest.approx((6 / 7 + 0.4 + 6 / 7) / 3)
    assert acc("", "No", "free-form") == 0.0
    # A one-word answer has no bigram, so ROUGE-2 is 0 and even an exact match scores 2/3 (released
    # behaviour; fixture rows such as 495 "No" and 791 "Tennis" are capped at 2/3).
    assert acc("No", "No", "free-form") == pytest.approx(2 / 3)
    assert acc("no", "No", "free-form") == pytest.approx(2 / 3)  # rouge-score lower-cases
    assert acc("a curtain with the tree is shorter.", "a curtain with the tree is shorter.", "free-form") == 1.0


def _free_form_pairs() -> list[tuple[str, str]]:
    pairs = [("the cat runs", "The cats are running"), ("Tennis.", "Tennis"), ("千", "千")]
    if ROWS_FILE.exists():
        for row in json.loads(ROWS_FILE.read_text()):
            if row["problem_type"] in ("free-form", "OCR"):
                gt = row["solution"][len("<answer>") : -len("</answer>")].strip()
                words = gt.split()
                pairs.append((" ".join(words[::-1]), gt))  # reversed: ROUGE-L differs from ROUGE-1
                pairs.append((" ".join(words[: max(1, len(words) // 2)]) + " extra words", gt))
    return pairs


def test_rouge_parity_with_rouge_score():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    pairs = _free_form_pairs()
    assert len(pairs) > 3 or not ROWS_FILE.exists()
    for pred, gt in pairs:
        s = scorer.score(gt, pred)
        expected = (s["rouge1"].fmeasure + s["rouge2"].fmeasure + s["rougeL"].fmeasure) / 3
        assert acc(pred, gt, "free-form") == pytest.approx(expected, abs=1e-12), (pred, gt)


# ---------------------------------------------------------------- regression


@pytest.mark.parametrize(
    ("pred", "gt", "expected"),
    [
        ("2.0", "2.0", 1 - 1e-9 / (2 + 1e-9)),
        ("2", "2.0", 1 - 1e-9 / (2 + 1e-9)),  # no decimal-point rule for regression
        ("1.0", "2.0", 1 - (1 + 1e-9) / (2 + 1e-9)),
        ("62", "62.7", 1 - (0.7 + 1e-9) / (62.7 + 1e-9)),  # fixture row 965's target
        ("5", "2", 0.0),  # relative error 1.5, clipped
        ("-2", "2", 0.0),
        ("1,000", "1000", 1 - 1e-9 / (1000 + 1e-9)),
        ("0.0", "0.0", 0.0),  # released quirk: a 0 target always scores 0 (fixture row 3568)
        ("", "2.0", 0.0),
        ("about 2", "2.0", 0.0),
    ],
)
def test_regression(pred, gt, expected):
    assert acc(pred, gt, "regression") == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------- failures never raise


def test_unknown_type_missing_tags_and_bad_input_score_zero_and_are_counted():
    cases = [
        (("<answer>B</answer>", "<answer>B</answer>", "essay"), "unknown problem_type 'essay'"),
        (("B", "<answer>B</answer>", "multiple choice"), "no <answer> tag in completion"),
        (("<answer>B</answer>", "B", "multiple choice"), "no <answer> tag in solution"),
        ((None, "<answer>B</answer>", "multiple choice"), "TypeError"),  # not a string: caught, not raised
    ]
    for args, reason in cases:
        result = accuracy_reward_detail(*args)
        assert (result.value, result.parse_ok) == (0.0, False)
        assert reason in result.reason
        assert accuracy_reward(*args) == 0.0


# ---------------------------------------------------------------- format


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<think>a</think><answer>B</answer>", 1.0),
        ("<think>\nmulti\nline\n</think>\n\n<answer>\nB\n</answer>", 1.0),
        ("<think></think> <answer></answer>", 1.0),
        (" <think>a</think><answer>B</answer>", 0.0),  # full match: nothing before
        ("<think>a</think><answer>B</answer>\n", 0.0),  # nor after
        ("<think>a</think> x <answer>B</answer>", 0.0),  # only whitespace between
        ("<answer>B</answer>", 0.0),
        ("<think>a</think>", 0.0),
        ("B", 0.0),
        ("", 0.0),
    ],
)
def test_format_reward(completion, expected):
    assert format_reward(completion) == expected


# ---------------------------------------------------------------- properties

_PIECES = st.sampled_from(
    ["<think>", "</think>", "<answer>", "</answer>", " ", "\n", "3", "3.0", "1,000", "-", "e9", "B", "nan", "inf",
     "0", "the cat", "千"]
)
_TEXT = st.one_of(st.text(max_size=200), st.lists(_PIECES | st.text(max_size=5), max_size=30).map("".join))


@settings(max_examples=300, deadline=None)
@given(completion=_TEXT, solution=_TEXT, problem_type=st.sampled_from([*TYPES, "essay", ""]))
def test_rewards_are_floats_in_unit_interval(completion, solution, problem_type):
    value = accuracy_reward(completion, solution, problem_type)
    assert type(value) is float and 0.0 <= value <= 1.0
    fmt = format_reward(completion)
    assert type(fmt) is float and fmt in (0.0, 1.0)


@settings(max_examples=100, deadline=None)
@given(answer=_TEXT, problem_type=st.sampled_from(TYPES))
def test_tagged_answers_are_floats_in_unit_interval(answer, problem_type):
    value = accuracy_reward(f"<answer>{answer}</answer>", "<answer>3.5</answer>", problem_type)
    assert type(value) is float and 0.0 <= value <= 1.0


# ---------------------------------------------------------------- length bonus


def test_length_bonus_conditions():
    # One group of 4: only completion 0 passes all three conditions.
    accuracies = [1.0, 0.05, 0.5, 1.0]  # 0.05 fails the threshold
    lengths = [320, 512, 319, 513]  # 319 and 513 are just outside [320, 512]
    assert length_bonus(accuracies, lengths, group_size=4).tolist() == pytest.approx([0.2, 0.0, 0.0, 0.0])
    # Edges inclusive: 512 fires when the accuracy is high enough.
    assert length_bonus([1.0, 1.0], [512, 320], group_size=2).tolist() == pytest.approx([0.2, 0.2])
    # "More than one" accurate completion in the group: a lone accurate one gets nothing.
    assert length_bonus([1.0, 0.0, 0.0, 0.0], [400] * 4, group_size=4).tolist() == [0.0] * 4
    # Accuracy must be strictly above the threshold.
    assert length_bonus([0.1, 0.1, 1.0], [400] * 3, group_size=3).tolist() == [0.0] * 3


def test_length_bonus_groups_are_separate_and_options_apply():
    # Group 0 has two accurate completions, group 1 has one.
    out = length_bonus(torch.tensor([1.0, 0.9, 1.0, 0.0]), torch.tensor([400, 400, 400, 400]), group_size=2)
    assert out.dtype == torch.float32 and out.tolist() == pytest.approx([0.2, 0.2, 0.0, 0.0])
    out = length_bonus([0.6, 0.6], [10, 30], group_size=2, bonus=1.0, min_len=5, max_len=20, acc_threshold=0.5)
    assert out.tolist() == [1.0, 0.0]
    assert length_bonus(torch.tensor([1.0, 1.0], dtype=torch.float64), [400, 400], 2).dtype == torch.float64


def test_length_bonus_two_readings():
    valid = torch.zeros(2, 600, dtype=torch.bool)
    valid[:, :400] = True  # [N, T]: 400 generated tokens each
    key = torch.zeros_like(valid)
    key[:, :140] = True  # [N, T]: ~35% of them are key tokens
    accuracies = [1.0, 1.0]
    assert length_bonus(accuracies, valid.sum(1), group_size=2).tolist() == pytest.approx([0.2, 0.2])  # generated
    assert length_bonus(accuracies, key.sum(1), group_size=2).tolist() == [0.0, 0.0]  # key: as released


def test_length_bonus_rejects_bad_shapes():
    with pytest.raises(ValueError, match="group_size"):
        length_bonus([1.0, 1.0, 1.0], [400] * 3, group_size=2)
    with pytest.raises(ValueError, match=r"\[N\]"):
        length_bonus([1.0, 1.0], [400], group_size=2)


# ---------------------------------------------------------------- registry and compute_rewards


def test_registry_builtins_and_unknown_name():
    assert REWARDS["accuracy"] is accuracy_reward and REWARDS["format"] is format_reward
    with pytest.raises(ValueError, match=r"unknown reward 'acuracy'; registered rewards: \[.*'accuracy'.*'format'"):
        get_reward("acuracy")
    with pytest.raises(ValueError, match="already registered"):
        register_reward("accuracy")(lambda completion, solution, problem_type: 0.0)


CUSTOM_MODULE = """
def brevity(completion, solution, problem_type):
    return 1.0 if len(completion) <= 5 else 0.0

def broken(completion, solution, problem_type):
    raise RuntimeError("bug in user reward")

def not_finite(completion, solution, problem_type):
    return float("nan")

def wrong_signature(completion):
    return 1.0
"""


@pytest.fixture()
def custom_module(tmp_path, monkeypatch):
    (tmp_path / "ktr_test_custom_rewards.py").write_text(textwrap.dedent(CUSTOM_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "ktr_test_custom_rewards"


def test_dotted_path_custom_reward(custom_module):
    fn = get_reward(f"{custom_module}:brevity")
    assert fn is get_reward(f"{custom_module}.brevity")
    assert fn("short", "", "") == 1.0
    total, per, failed = compute_rewards(
        ["<answer>B</answer>", "B"], ["<answer>B</answer>"] * 2, ["multiple choice"] * 2,
        names=["accuracy", f"{custom_module}:brevity"], weights=[1.0, 2.0],
    )
    assert total.tolist() == [1.0, 2.0]
    assert per[f"{custom_module}:brevity"].tolist() == [0.0, 1.0]
    assert failed == {"accuracy": 1, f"{custom_module}:brevity": 0}
    with pytest.raises(ValueError, match="could not be imported"):
        get_reward(f"{custom_module}:missing")
    with pytest.raises(ValueError, match="could not be imported"):
        get_reward("no_such_module_for_ktr:fn")
    with pytest.raises(ValueError, match=r"must accept \(completion, solution, problem_type\)"):
        get_reward(f"{custom_module}:wrong_signature")


def test_failing_custom_rewards_score_zero_and_are_counted(custom_module):
    names = [f"{custom_module}:broken", f"{custom_module}:not_finite"]
    total, per, failed = compute_rewards(["a", "b", "c"], ["s"] * 3, ["OCR"] * 3, names=names, weights=[1.0, 1.0])
    assert total.tolist() == [0.0, 0.0, 0.0]
    assert failed == {names[0]: 3, names[1]: 3}


def test_compute_rewards_weights_and_checks():
    completions = ["<think>x</think><answer>3</answer>", "<answer>3</answer>", "<think>x</think><answer>4</answer>"]
    total, per, failed = compute_rewards(
        completions, ["<answer>3</answer>"] * 3, ["numerical"] * 3, names=["accuracy", "format"], weights=[1.0, 0.5]
    )
    assert per["accuracy"].tolist() == [1.0, 1.0, 0.0]
    assert per["format"].tolist() == [1.0, 0.0, 1.0]
    assert total.tolist() == [1.5, 1.0, 0.5]
    assert failed == {"accuracy": 0, "format": 0}
    with pytest.raises(ValueError, match="weights"):
        compute_rewards(completions, ["s"] * 3, ["OCR"] * 3, names=["accuracy"], weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="solutions"):
        compute_rewards(completions, ["s"] * 2, ["OCR"] * 3, names=["accuracy"], weights=[1.0])
    with pytest.raises(ValueError, match="repeat"):
        compute_rewards(completions, ["s"] * 3, ["OCR"] * 3, names=["format", "format"], weights=[1.0, 1.0])


def test_compute_rewards_on_empty_batch():
    total, per, failed = compute_rewards([], [], [], names=["accuracy"], weights=[1.0])
    assert total.shape == (0,) and per["accuracy"].shape == (0,) and failed == {"accuracy": 0}


@pytest.mark.parametrize(
    "module", [ktr.rewards.accuracy, ktr.rewards.format, ktr.rewards.length, ktr.rewards.registry]
)
def test_docstring_examples_run(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


def test_scores_are_plain_python_floats():
    assert all(type(acc("1", "1", t)) is float for t in TYPES)
    assert not math.isnan(acc("1", "1", "regression"))
