"""Video-Holmes: 1,837 six-option questions on 270 short suspense films; accuracy per question type
(SR, IMC, TCI, TA, MHR, PAR, CTI) and overall.

Official format: a JSON list of ``{"video ID", "Question ID", "Question Type", "Question", "Options":
{"A": ...}, "Answer", "Explanation"}``; videos are ``<video_root>/<video ID>.mp4``. Official prompt and
extraction (:func:`ktr.eval.extract.extract_videoholmes_official`); the ``step`` of each prediction says
whether the bare-letter fallback decided it.

Video-R1 format: the type is the row's ``original_question_type`` (or ``Question Type``). Absolute paths
from another machine are rebased onto ``video_root`` by file name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ktr.eval.base import EvalItem, SchemaError, read_rows, register_benchmark, require, resolve_video_path
from ktr.eval.benchmarks.videor1 import DualFormatBenchmark, field_error
from ktr.eval.extract import Extraction, extract_videoholmes_official

QUESTION_TYPES = ("SR", "IMC", "TCI", "TA", "MHR", "PAR", "CTI")

HOLMES_PROMPT = (
    "Based on the given video, reason and answer the single-choice question. Provide your reasoning between the "
    "<think> and </think> tags, and then give your final answer between the <answer> and </answer> tags. "
    "The question is: {question}. The options are: {options}. Your answer:"
)


def _question_type(value: Any, name: str) -> str:
    if value not in QUESTION_TYPES:
        raise field_error(name, f"expected one of {list(QUESTION_TYPES)}, got {value!r}")
    return value


@register_benchmark("videoholmes")
class VideoHolmesBenchmark(DualFormatBenchmark):
    """Video-Holmes; meta: question_type."""

    breakdown_fields = ("question_type",)
    prompt_variants = {"video_r1": "video_r1_eval", "official": "videoholmes_official"}
    extraction_rules = {"video_r1": "video_r1", "official": "videoholmes_official"}

    def video_r1_meta(self, row: Mapping[str, Any], index: int) -> dict[str, Any]:
        name = "original_question_type" if "original_question_type" in row else "Question Type"
        return {"question_type": _question_type(row.get(name), name)}

    def load_official(self) -> list[EvalItem]:
        path = self.annotation_path
        return [self._official_item(row, i, path) for i, row in enumerate(read_rows(path))]

    def _official_item(self, row: Mapping[str, Any], i: int, path: Any) -> EvalItem:
        video_id = require(row, "video ID", str, path, i)
        question_id = require(row, "Question ID", (int, str), path, i)
        question = require(row, "Question", str, path, i)
        choices = require(row, "Options", dict, path, i)
        answer = require(row, "Answer", str, path, i)
        if answer not in choices:
            raise SchemaError(f"{path}: row {i}: field 'Answer': {answer!r} is not one of the options {list(choices)}")
        try:
            qtype = _question_type(row.get("Question Type"), "Question Type")
        except ValueError as err:
            raise SchemaError(f"{path}: row {i}: {err}") from None
        options = [f"{key}: {value}" for key, value in choices.items()]
        prompt = HOLMES_PROMPT.format(question=question, options=", ".join(options))
        video_path = resolve_video_path(self.video_root, f"{video_id}.mp4")
        return EvalItem(qid=f"{video_id}/{question_id}", video_path=video_path, prompt_text=prompt, answer=answer,
                        problem_type="multiple choice", options=options, meta={"question_type": qtype})

    def extract_official(self, output: str, item: EvalItem) -> Extraction:
        return extract_videoholmes_official(output)
