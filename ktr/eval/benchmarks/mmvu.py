"""MMVU, multiple-choice subset (625 validation questions, five options A-E); breakdowns per discipline
(27 subjects in 4 disciplines) and per subject.

Official format: ``validation.json`` rows ``{id, video (URL), question, question_type, choices {A..E},
answer (letter), metadata.subject}``; only ``multiple-choice`` rows are loaded (the open-ended count is in
:attr:`excluded`). A video URL ``.../resolve/main/videos/<Subject>/N.mp4`` maps to
``<video_root>/videos/<Subject>/N.mp4`` (``video_root`` may also be that ``videos`` folder). Prompt: MMVU's
chain-of-thought prompt. The official scorer is a GPT-4o judge; ktr reads the letter by rule
(:func:`ktr.eval.extract.extract_mmvu`) and counts unparsable answers.

Video-R1 format: the subject is the folder of ``path`` (``./Evaluation/MMVU/videos/<Subject>/N.mp4``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

from ktr.eval.base import EvalItem, SchemaError, read_rows, register_benchmark, require, resolve_video_path
from ktr.eval.benchmarks.videor1 import DualFormatBenchmark, field_error
from ktr.eval.extract import Extraction, extract_mmvu, option_texts

DISCIPLINES: dict[str, tuple[str, ...]] = {
    "Science": ("Biology", "Chemistry", "Modern Physics", "Astronomy", "Geography", "Materials Science",
                "Neurobiology", "Electromagnetism", "Thermodynamics", "Mechanics"),
    "Engineering": ("Civil Engineering", "Electrical Engineering", "Mechanical Engineering",
                    "Biomedical Engineering", "Electronics and Communication", "Computer Science"),
    "Healthcare": ("Clinical Medicine", "Basic Medicine", "Preventive Medicine", "Pharmacy", "Dentistry"),
    "Humanities and Social Science": ("Art", "Literature", "History", "Law", "Economics", "Management"),
}


def _norm(subject: str) -> str:
    return " ".join(subject.replace("_", " ").split()).casefold()


SUBJECT_TO_DISCIPLINE: dict[str, tuple[str, str]] = {
    _norm(s): (s, d) for d, subjects in DISCIPLINES.items() for s in subjects
}
"""normalised subject -> (canonical subject name, discipline)."""

MMVU_PROMPT = (
    "\nQuestion: {question}\n{options}\n\nAnswer the given multiple-choice question step by step. Begin by "
    "explaining your reasoning process clearly. Conclude by stating the final answer using the following format: "
    "'Therefore, the final answer is: $LETTER' (without quotes), where $LETTER is one of the options. Think step by"
    "\nstep before answering."
)
"""MMVU's chain-of-thought multiple-choice prompt, line break inside "step by\\nstep" included."""


def subject_meta(subject: str) -> dict[str, str]:
    """``{"subject", "discipline"}`` of a subject name ("Materials_Science" or "Materials Science").

    >>> subject_meta("Basic_Medicine")
    {'subject': 'Basic Medicine', 'discipline': 'Healthcare'}
    """
    key = _norm(subject)
    if key not in SUBJECT_TO_DISCIPLINE:
        known = sorted(s for s, _ in SUBJECT_TO_DISCIPLINE.values())
        raise field_error("subject", f"unknown MMVU subject {subject!r}; expected one of {known}")
    name, discipline = SUBJECT_TO_DISCIPLINE[key]
    return {"subject": name, "discipline": discipline}


def video_relpath(video: str) -> str:
    """Local relative path of a video URL (the part after ``/resolve/main/``), or the value itself."""
    marker = "/resolve/main/"
    return video.split(marker, 1)[1] if marker in video else video


@register_benchmark("mmvu")
class MMVUBenchmark(DualFormatBenchmark):
    """MMVU multiple-choice subset; meta: discipline, subject."""

    breakdown_fields = ("discipline", "subject")
    prompt_variants = {"video_r1": "video_r1_eval", "official": "mmvu_cot"}
    extraction_rules = {"video_r1": "video_r1", "official": "mmvu_rule"}

    def video_r1_meta(self, row: Mapping[str, Any], index: int) -> dict[str, Any]:
        folder = PurePosixPath(str(row.get("path", ""))).parent.name
        if not folder:
            raise field_error("path", f"no subject folder in {row.get('path')!r}")
        return subject_meta(folder)

    def load_official(self) -> list[EvalItem]:
        path, items, open_ended = self.annotation_path, [], 0
        for i, row in enumerate(read_rows(path)):
            qtype = require(row, "question_type", str, path, i)
            if qtype == "open-ended":
                open_ended += 1
                continue
            if qtype != "multiple-choice":
                raise SchemaError(f"{path}: row {i}: field 'question_type': expected 'multiple-choice' or "
                                  f"'open-ended', got {qtype!r}")
            items.append(self._official_item(row, i, path))
        self.excluded["open-ended"] = open_ended
        return items

    def _official_item(self, row: Mapping[str, Any], i: int, path: Any) -> EvalItem:
        qid = require(row, "id", (str, int), path, i)
        video = require(row, "video", str, path, i)
        question = require(row, "question", str, path, i)
        choices = require(row, "choices", dict, path, i)
        answer = require(row, "answer", str, path, i)
        if answer not in choices:
            raise SchemaError(f"{path}: row {i}: field 'answer': {answer!r} is not one of the choices {list(choices)}")
        metadata = require(row, "metadata", dict, path, i)
        subject = require(metadata, "subject", str, path, f"{i}.metadata")
        try:
            meta = subject_meta(subject)
        except ValueError as err:
            raise SchemaError(f"{path}: row {i}.metadata: {err}") from None
        options = [f"{key}: {value}" for key, value in choices.items()]
        prompt = MMVU_PROMPT.format(question=question, options="\n".join(options))
        return EvalItem(qid=str(qid), video_path=resolve_video_path(self.video_root, video_relpath(video)),
                        prompt_text=prompt, answer=answer, problem_type="multiple choice", options=options, meta=meta)

    def extract_official(self, output: str, item: EvalItem) -> Extraction:
        return extract_mmvu(output, option_texts(item.options or []))
