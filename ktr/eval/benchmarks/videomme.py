"""Video-MME: 2,700 four-option questions on 900 videos; breakdowns per duration, domain, sub-category and
task type. Both denominators are reported by :func:`ktr.eval.metrics.summarize`: all questions (lmms-eval)
and answered questions (the official script).

Official format: a JSON/JSONL list of flat per-question rows as in the Hugging Face release
(``video_id, duration, domain, sub_category, url, videoID, question_id, task_type, question, options,
answer``), or the official repository's per-video layout (``{video_id, duration, domain, sub_category,
videoID|url, questions: [{question_id, task_type, question, options, answer, ...}]}``). Videos are
``<video_root>/<videoID>.mp4``. Subtitles are not used.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ktr.eval.base import EvalItem, SchemaError, read_rows, register_benchmark, require, resolve_video_path
from ktr.eval.benchmarks.videor1 import DualFormatBenchmark, field_error
from ktr.eval.extract import Extraction, extract_videomme_lenient, extract_videomme_official

DURATIONS = ("short", "medium", "long")
VIDEO_FIELDS = ("duration", "domain", "sub_category")

VIDEOMME_PROMPT = (
    "Select the best answer to the following multiple-choice question based on the video. "
    "Respond with only the letter (A, B, C, or D) of the correct option.\n{question}\n{options}\nThe best answer is:"
)


def _video_id(row: Mapping[str, Any]) -> str | None:
    """The YouTube id that names the video file: ``videoID``, else the ``v=`` parameter of ``url``."""
    if isinstance(row.get("videoID"), str) and row["videoID"]:
        return row["videoID"]
    match = re.search(r"[?&]v=([\w-]+)", str(row.get("url", "")))
    return match.group(1) if match else None


@register_benchmark("videomme")
class VideoMMEBenchmark(DualFormatBenchmark):
    """Video-MME (``format="video_r1"`` or ``"official"``); meta: duration, domain, sub_category, task_type.

    ``lenient_extraction=True`` (off by default, not official) reads official-format outputs with
    ``videomme_lenient``, which also removes "Answer:" and "Option:"; ``results.json`` names the rule that ran.
    """

    breakdown_fields = ("duration", "domain", "sub_category", "task_type")
    prompt_variants = {"video_r1": "video_r1_eval", "official": "videomme_official"}
    extraction_rules = {"video_r1": "video_r1", "official": "videomme_official"}

    def __init__(self, annotation_path: Any, video_root: Any = None, format: str = "video_r1",  # noqa: A002
                 lenient_extraction: bool = False) -> None:
        super().__init__(annotation_path, video_root, format)
        self.lenient_extraction = lenient_extraction

    @property
    def extraction_rule(self) -> str:
        if self.lenient_extraction and self.format == "official":
            return "videomme_lenient"
        return self.extraction_rules[self.format]

    def video_r1_meta(self, row: Mapping[str, Any], index: int) -> dict[str, Any]:
        return _meta(row, row)

    def load_official(self) -> list[EvalItem]:
        items: list[EvalItem] = []
        path = self.annotation_path
        for i, row in enumerate(read_rows(path)):
            questions = row.get("questions")
            if questions is None:  # flat row: one question
                items.append(self._official_item(row, row, path, i))
                continue
            if not isinstance(questions, list):
                raise SchemaError(f"{path}: row {i}: field 'questions': expected a list")
            for j, question in enumerate(questions):
                if not isinstance(question, dict):
                    raise SchemaError(f"{path}: row {i}.questions[{j}]: expected an object")
                items.append(self._official_item(row, question, path, f"{i}.questions[{j}]"))
        return items

    def _official_item(self, video: Mapping[str, Any], q: Mapping[str, Any], path: Any, index: Any) -> EvalItem:
        qid = require(q, "question_id", (str, int), path, index)
        question = require(q, "question", str, path, index)
        options = require(q, "options", list, path, index)
        answer = require(q, "answer", str, path, index)
        if answer not in ("A", "B", "C", "D"):
            raise SchemaError(f"{path}: row {index}: field 'answer': expected a letter A-D, got {answer!r}")
        video_id = _video_id(video)
        if video_id is None:
            raise SchemaError(f"{path}: row {index}: field 'videoID': missing (and no YouTube 'url' to read it from)")
        try:
            meta = _meta(video, q)
        except ValueError as err:
            raise SchemaError(f"{path}: row {index}: {err}") from None
        prompt = VIDEOMME_PROMPT.format(question=question, options="\n".join(options))
        return EvalItem(qid=str(qid), video_path=resolve_video_path(self.video_root, f"{video_id}.mp4"),
                        prompt_text=prompt, answer=answer, problem_type="multiple choice", options=options, meta=meta)

    def extract_official(self, output: str, item: EvalItem) -> Extraction:
        return (extract_videomme_lenient if self.lenient_extraction else extract_videomme_official)(output)


def _meta(video: Mapping[str, Any], question: Mapping[str, Any]) -> dict[str, Any]:
    """Breakdown fields: duration, domain, sub_category from the video, task_type from the question."""
    meta: dict[str, Any] = {}
    for name, source in [(n, video) for n in VIDEO_FIELDS] + [("task_type", question)]:
        value = source.get(name)
        if not isinstance(value, str) or not value:
            raise field_error(name, f"missing or not a string: {value!r:.40}")
        meta[name] = value
    if meta["duration"] not in DURATIONS:
        raise field_error("duration", f"expected one of {list(DURATIONS)}, got {meta['duration']!r}")
    return meta
