"""The Video-R1 eval JSON, shared by all five benchmarks, and the two-format base class.

Rows: ``{problem_id, problem, data_type: "video", problem_type, options, solution: "<answer>C</answer>",
path: "./Evaluation/<Bench>/<file>.mp4", ...extras}``. Prompt: the evaluation wording of the training
prompt (:func:`ktr.data.prompts.build_question` with ``eval=True``). Extraction: first ``<answer>`` tag,
else the whole output. Scoring as Video-R1's ``eval_bench.py``: multiple choice by exact, case-sensitive
``pred.strip() == gt.strip()`` ("C." is wrong), numerical as the training reward, regression by mean
relative accuracy over thresholds 0.50:0.05:0.95. OCR and free-form, which the released script scores 0,
are scored with the training reward (none of the five benchmarks has them).

Two departures in accounting only (scores are as released): a multiple-choice row whose answer is not one of
its options is left out and counted in ``excluded``; an output that reads as no option letter (cut off at
``<answer>``) counts as unparsable even when the rule scored its whole text.
"""

from __future__ import annotations

import logging
import os
import re
from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ktr.answers import PROBLEM_TYPES, extract_answer
from ktr.data.prompts import build_question
from ktr.eval.base import (
    Benchmark,
    EvalItem,
    SchemaError,
    check_unique,
    read_rows,
    require,
    resolve_video_path,
    schema_error,
)
from ktr.eval.extract import Extraction, extract_video_r1, option_texts
from ktr.rewards.accuracy import ACCURACY_SCORERS, parse_number

log = logging.getLogger(__name__)

MetaFn = Callable[[Mapping[str, Any], int], dict[str, Any]]
"""``meta_fn(row, index) -> meta`` for one Video-R1 row; raises ValueError naming the field on bad input."""


def mean_relative_accuracy(pred: float, target: float) -> float:
    """Fraction of thresholds t in 0.50:0.05:0.95 with ``|pred - target| / (|target| + 1e-8) < 1 - t``.

    Computed in float32 with torch as the reference does, so that errors on a threshold fall the same way.

    >>> mean_relative_accuracy(8.0, 10.0)  # relative error 0.2 < 1 - t for t <= 0.75 (6 of 10)
    0.6000000238418579
    """
    pred_t = torch.tensor(pred, dtype=torch.float32)
    target_t = torch.tensor(target, dtype=torch.float32)
    rel_error = torch.abs(pred_t - target_t) / (torch.abs(target_t) + 1e-8)
    thresholds = torch.arange(0.50, 0.95 + 0.05 / 2, 0.05, dtype=torch.float32)  # [10]
    return float((rel_error < 1 - thresholds).float().mean())


def score_video_r1(pred: str | None, gold: str, problem_type: str) -> float:
    """Score of an extracted answer against the gold answer by Video-R1 ``problem_type``; None scores 0.

    >>> score_video_r1("C", "C", "multiple choice"), score_video_r1("C.", "C", "multiple choice")
    (1.0, 0.0)
    """
    if pred is None:
        return 0.0
    if problem_type == "multiple choice":
        return 1.0 if pred.strip() == gold.strip() else 0.0
    if problem_type == "regression":
        pred_num, gold_num = parse_number(pred), parse_number(gold)
        return 0.0 if pred_num is None or gold_num is None else mean_relative_accuracy(pred_num, gold_num)
    return ACCURACY_SCORERS[problem_type](pred, gold).value


def video_r1_item(row: Mapping[str, Any], index: int, path: Any, video_root: str | None, meta_fn: MetaFn) -> EvalItem:
    """One :class:`EvalItem` of a Video-R1 eval row; SchemaError naming file, row and field."""
    problem_id = require(row, "problem_id", (int, str), path, index)
    stored = require(row, "path", str, path, index)
    solution = require(row, "solution", str, path, index)
    problem_type = require(row, "problem_type", str, path, index)
    if problem_type not in PROBLEM_TYPES:
        raise schema_error(path, index, "problem_type", f"unknown value {problem_type!r}; expected one of "
                           f"{list(PROBLEM_TYPES)}")
    if row.get("data_type", "video") != "video":
        raise schema_error(path, index, "data_type", f"expected 'video', got {row.get('data_type')!r}")
    gold = extract_answer(solution)
    if not gold:
        raise schema_error(path, index, "solution", f"no <answer>...</answer> content in {solution!r:.60}")
    try:
        prompt = build_question(row, eval=True)
        meta = meta_fn(row, index)
    except ValueError as err:  # the message names the field ("field 'options': ..."); add file and row
        raise SchemaError(f"{path}: row {index}: {err}") from None
    return EvalItem(qid=str(problem_id), video_path=resolve_video_path(video_root, stored), prompt_text=prompt,
                    answer=gold, problem_type=problem_type, options=row.get("options"), meta=meta)


ANSWER_NOT_AN_OPTION = "answer not among the options"
"""The ``excluded`` reason of a multiple-choice row whose gold answer no option carries (it cannot be right)."""
_OPTION_LETTER_RE = re.compile(r"^\(?([A-Z])\)?(?:[.:)]|\s|$)")


def option_letters(options: Sequence[str] | None) -> list[str]:
    """The letters of option lines ("A. text" / "A: text"; unlettered lines get A, B, ...).

    >>> option_letters(["A. red", "B. blue"])
    ['A', 'B']
    """
    return list(option_texts(options or []))


def reads_as_option(pred: str | None, letters: Sequence[str]) -> bool:
    """Whether an extracted answer is an option choice: a letter of ``letters``, alone or as "C.", "C:",
    "(C)", "C) text", "C text".

    >>> reads_as_option("C.", "ABCD"), reads_as_option("<think>x</think><answer>", "ABCD")
    (True, False)
    """
    match = _OPTION_LETTER_RE.match(pred.strip()) if pred is not None else None
    return match is not None and match.group(1) in letters


def load_video_r1(path: str | os.PathLike, video_root: str | None, meta_fn: MetaFn,
                  excluded: dict[str, int] | None = None) -> list[EvalItem]:
    """All rows of a Video-R1 eval JSON (or JSONL) file, in file order.

    A multiple-choice row whose gold answer is not one of its option letters (``<answer>Z</answer>`` with
    options A-E) can never be answered right: it is logged, left out, and counted in ``excluded``.
    """
    items = []
    for i, row in enumerate(read_rows(path)):
        item = video_r1_item(row, i, path, video_root, meta_fn)
        letters = option_letters(item.options)
        if item.problem_type == "multiple choice" and item.answer.strip() not in letters:
            log.warning("%s: row %d: field 'solution': answer %r is not among the options %s; the question is "
                        "left out (results.json 'excluded')", path, i, item.answer, letters)
            if excluded is not None:
                excluded[ANSWER_NOT_AN_OPTION] = excluded.get(ANSWER_NOT_AN_OPTION, 0) + 1
            continue
        items.append(item)
    check_unique(items, path)
    return items


class DualFormatBenchmark(Benchmark):
    """A benchmark readable as Video-R1 eval JSON or in its official format.

    The Video-R1 format is handled here; subclasses provide the breakdown fields of a Video-R1 row
    (:meth:`video_r1_meta`) and the official loader, extraction and scoring.
    """

    prompt_variants = {"video_r1": "video_r1_eval"}
    extraction_rules = {"video_r1": "video_r1"}

    def load(self) -> list[EvalItem]:
        self.excluded = {}
        if self.format == "video_r1":
            items = load_video_r1(self.annotation_path, self.video_root, self.video_r1_meta, self.excluded)
        else:
            items = self.load_official()
            check_unique(items, self.annotation_path)
        return items

    def extract_detail(self, output: str, item: EvalItem) -> Extraction:
        if self.format == "video_r1":
            return extract_video_r1(output)
        return self.extract_official(output, item)

    def parsed(self, extraction: Extraction, item: EvalItem) -> bool:
        """Video-R1 multiple choice: parsed only when the extraction reads as an option letter.

        A judgement call: the Video-R1 rule scores the whole output when it has no ``<answer>`` content, so
        an output cut off before any letter (``<think>...</think><answer>``) is "extracted" yet holds no
        answer. Counting it as unparsable keeps ``n_unparsable`` honest; the score (exact match, as
        released) is the same either way, so only ``n_unparsable`` and ``overall_answered`` change.
        """
        if self.format == "video_r1" and item.problem_type == "multiple choice":
            return reads_as_option(extraction.answer, option_letters(item.options))
        return super().parsed(extraction, item)

    def score(self, pred: str | None, item: EvalItem) -> float:
        if self.format == "video_r1":
            return score_video_r1(pred, item.answer, item.problem_type)
        return self.score_official(pred, item)

    @abstractmethod
    def video_r1_meta(self, row: Mapping[str, Any], index: int) -> dict[str, Any]:
        """Breakdown fields of one Video-R1 row (ValueError naming the field when they cannot be read)."""

    @abstractmethod
    def load_official(self) -> list[EvalItem]:
        """Items of the official annotation files."""

    @abstractmethod
    def extract_official(self, output: str, item: EvalItem) -> Extraction:
        """The official extraction rule."""

    def score_official(self, pred: str | None, item: EvalItem) -> float:
        """Exact match of the extracted answer (a letter for most official rules)."""
        return 1.0 if pred is not None and pred == item.answer else 0.0


def field_error(name: str, problem: str) -> ValueError:
    """A ValueError in the ``field 'name': problem`` form that :func:`video_r1_item` re-raises with file and row."""
    return ValueError(f"field {name!r}: {problem}")
