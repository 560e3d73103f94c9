"""Accuracy reward of the released Video-R1 / Video-KTR run (layer L1, docs/method.md section 4.4).

One scorer per ``problem_type``, picked from :data:`ACCURACY_SCORERS`. Scorers see the two extracted
answers (model, ground truth) and return a score in [0, 1]. The reward never raises: an unknown type, an
answer that cannot be read, or an exception inside a scorer scores 0 and is reported through
:func:`accuracy_reward_detail` (``parse_ok=False`` plus a reason) so that callers can count failures.

Deliberate difference from the released code: a number that parses to a non-finite float (``"nan"``,
``"inf"``, ``"1e999"``) is unparsable here. The released ``float()`` accepted them, so ``"inf"`` vs
``"inf"`` scored 1 and a ``nan`` regression target scored 1 for every prediction.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

from ktr.answers import ANSWER_RE, extract_answer
from ktr.rewards.registry import RewardResult, register_reward


def _fail(reason: str) -> RewardResult:
    return RewardResult(0.0, parse_ok=False, reason=reason)


def _clip01(x: float) -> float:
    return max(0.0, min(1.0, x))


def parse_number(text: str) -> float | None:
    """``float`` of ``text`` with commas removed, as released; None when unparsable or not finite.

    >>> parse_number("1,000.5"), parse_number("abc"), parse_number("nan")
    (1000.5, None, None)
    """
    try:
        value = float(text.replace(",", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word-level edit distance / max(1, number of reference words); words split on whitespace.

    >>> word_error_rate("a b c d", "a x c")  # one substitution, one deletion
    0.5
    """
    ref, hyp = reference.split(), hypothesis.split()
    # Two rows of the Levenshtein table: previous[j] = distance(ref[:i-1], hyp[:j]).
    previous = list(range(len(hyp) + 1))
    for i, ref_word in enumerate(ref, start=1):
        current = [i] + [0] * len(hyp)
        for j, hyp_word in enumerate(hyp, start=1):
            if ref_word == hyp_word:
                current[j] = previous[j - 1]
            else:
                current[j] = 1 + min(previous[j], current[j - 1], previous[j - 1])
        previous = current
    return previous[-1] / max(1, len(ref))


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    # Imported lazily: rouge-score pulls in nltk (~0.3 s), which most callers of ktr never need.
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


def rouge_mean_f(reference: str, hypothesis: str) -> float:
    """Mean of the ROUGE-1, ROUGE-2 and ROUGE-L F-measures from ``rouge-score`` (Porter stemmer on).

    >>> round(rouge_mean_f("the cats are running", "the cat runs"), 4)  # (6/7 + 0.4 + 6/7) / 3
    0.7048
    """
    scores = _rouge_scorer().score(reference, hypothesis)
    return (scores["rouge1"].fmeasure + scores["rouge2"].fmeasure + scores["rougeL"].fmeasure) / 3


def _multiple_choice(pred: str, gt: str) -> RewardResult:
    return RewardResult(1.0 if pred.strip() == gt.strip() else 0.0)


def _numerical(pred: str, gt: str) -> RewardResult:
    # Released rule: "3" vs "3.0" and "1000" vs "1,000" score 0 before any parsing.
    if (("." in gt) or ("," in gt)) != (("." in pred) or ("," in pred)):
        return RewardResult(0.0)
    gt_num, pred_num = parse_number(gt), parse_number(pred)
    if gt_num is None or pred_num is None:
        return _fail(f"unparsable number: prediction {pred!r:.40}, ground truth {gt!r:.40}")
    return RewardResult(1.0 if round(gt_num, 2) == round(pred_num, 2) else 0.0)


def _ocr(pred: str, gt: str) -> RewardResult:
    return RewardResult(_clip01(1.0 - word_error_rate(gt, pred)))


def _free_form(pred: str, gt: str) -> RewardResult:
    return RewardResult(_clip01(rouge_mean_f(gt, pred)))


def _regression(pred: str, gt: str) -> RewardResult:
    gt_num, pred_num = parse_number(gt), parse_number(pred)
    if gt_num is None or pred_num is None:
        return _fail(f"unparsable number: prediction {pred!r:.40}, ground truth {gt!r:.40}")
    # As released, the 1e-9 sits in the numerator too, so a target of exactly 0 always scores 0.
    rel_diff = (abs(pred_num - gt_num) + 1e-9) / (abs(gt_num) + 1e-9)
    return RewardResult(1.0 - _clip01(rel_diff))


ScorerFn = Callable[[str, str], RewardResult]
"""``scorer(pred_answer, gt_answer) -> RewardResult`` on already extracted answers."""

ACCURACY_SCORERS: dict[str, ScorerFn] = {
    "multiple choice": _multiple_choice,
    "numerical": _numerical,
    "OCR": _ocr,
    "free-form": _free_form,
    "regression": _regression,
}


def accuracy_reward_detail(completion: str, solution: str, problem_type: str) -> RewardResult:
    """Accuracy reward with its parse status; never raises.

    ``parse_ok`` is False (and the value 0) when the type is unknown, either text has no ``<answer>``
    tag, a number cannot be read, or a scorer raised. The released code reads a missing tag as ``""``: the same 0
    for a completion without one, but against a solution without one it compares empty strings (a tagless
    multiple-choice completion then scores 1). ktr's loader skips such solutions (docs/method.md section 7).

    >>> accuracy_reward_detail("<answer>4</answer>", "<answer>4</answer>", "numerical")
    RewardResult(value=1.0, parse_ok=True, reason='')
    >>> accuracy_reward_detail("four", "<answer>4</answer>", "numerical").reason
    'no <answer> tag in completion'
    """
    try:
        scorer = ACCURACY_SCORERS.get(problem_type)
        if scorer is None:
            return _fail(f"unknown problem_type {problem_type!r}")
        if ANSWER_RE.search(solution) is None:
            return _fail("no <answer> tag in solution")
        if ANSWER_RE.search(completion) is None:
            return _fail("no <answer> tag in completion")
        result = scorer(extract_answer(completion), extract_answer(solution))
        if not math.isfinite(result.value):
            return _fail(f"non-finite score {result.value}")
        return result
    except Exception as err:  # noqa: BLE001 - rewards never raise (issue 5); the failure is reported.
        return _fail(f"{type(err).__name__}: {err}")


@register_reward("accuracy", detail=accuracy_reward_detail)
def accuracy_reward(completion: str, solution: str, problem_type: str) -> float:
    """Accuracy reward in [0, 1] by ``problem_type`` (docs/method.md section 4.4); 0 on any failure.

    >>> accuracy_reward("<think>...</think><answer> B </answer>", "<answer>B</answer>", "multiple choice")
    1.0
    >>> accuracy_reward("<answer>3</answer>", "<answer>3.0</answer>", "numerical")  # decimal mismatch
    0.0
    >>> accuracy_reward("<answer>a b c</answer>", "<answer>a b c d</answer>", "OCR")  # WER 1/4
    0.75
    """
    return accuracy_reward_detail(completion, solution, problem_type).value
