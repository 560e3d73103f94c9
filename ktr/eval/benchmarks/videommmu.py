"""Video-MMMU: 900 questions on 300 lecture videos in three tracks (Perception, Comprehension, Adaptation);
accuracy per track and overall. The knowledge gain needs a before-video run and is left to the caller.

Video-R1 format: no track field. The released file holds the tracks in blocks of 300 rows (rows 1-300
Adaptation, 301-600 Comprehension, 601-900 Perception); since a file may be a subset, the row position is
read from ``problem_id`` (1-based, as in the released file), not from the position in the file.

Official format: a JSON/JSONL list of rows of the Hugging Face release (``id, question, options, answer,
question_type`` = ``"multiple-choice"`` | ``"open"``), with the track in a ``track`` field or given as the
``track`` argument (one file per track). Videos are ``<video_root>/<id>.mp4``. Prompts as lmms-eval's
``videommmu`` task; multiple choice is parsed by the MMMU rule (unparsable = wrong, no random guess).
Open questions use a simplified MMMU open rule: a numeric gold answer is matched against the numbers in
the output (rounded to 2 decimals), a text gold answer by case-insensitive containment.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ktr.eval.base import EvalItem, Format, SchemaError, read_rows, register_benchmark, require, resolve_video_path
from ktr.eval.benchmarks.videor1 import DualFormatBenchmark, field_error
from ktr.eval.extract import Extraction, extract_mmmu, option_texts
from ktr.rewards.accuracy import parse_number

TRACKS = ("Perception", "Comprehension", "Adaptation")
VIDEO_R1_TRACK_ORDER = ("Adaptation", "Comprehension", "Perception")
TRACK_SIZE = 300

PRE_PROMPT = ("Please directly output the option letter/data as the answer. You should watch and learn the video "
              "content. Then apply what you learned to ")
MCQ_PROMPT = "answer the following multi-choice question. The image for this question is at the end of the video.\n"
OPEN_PROMPT = "answer the following open-ended question. The image for this question is at the end of the video.\n"
POST_PROMPT = "\nPlease directly output the option letter/data as the answer."

_NUMBER_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|-?\.\d+")


def lettered(options: Sequence[str]) -> list[str]:
    """Option lines "A. text"; options already lettered that way are kept as they are."""
    letters = [chr(ord("A") + i) for i in range(len(options))]
    if all(o.startswith(f"{x}.") for o, x in zip(options, letters)):
        return list(options)
    return [f"{x}. {o}" for x, o in zip(letters, options)]


@register_benchmark("videommmu")
class VideoMMMUBenchmark(DualFormatBenchmark):
    """Video-MMMU; meta: track."""

    breakdown_fields = ("track",)
    prompt_variants = {"video_r1": "video_r1_eval", "official": "videommmu_lmms_eval"}
    extraction_rules = {"video_r1": "video_r1", "official": "mmmu_parse"}

    def __init__(self, annotation_path: str | os.PathLike, video_root: str | os.PathLike | None,
                 format: Format = "video_r1", track: str | None = None,  # noqa: A002
                 track_order: Sequence[str] = VIDEO_R1_TRACK_ORDER) -> None:
        super().__init__(annotation_path, video_root, format)
        if track is not None and track not in TRACKS:
            raise ValueError(f"videommmu: unknown track {track!r}; expected one of {list(TRACKS)}")
        if sorted(track_order) != sorted(TRACKS):
            raise ValueError(f"videommmu: track_order must order all of {list(TRACKS)}, got {list(track_order)}")
        self.track, self.track_order = track, tuple(track_order)

    def video_r1_meta(self, row: Mapping[str, Any], index: int) -> dict[str, Any]:
        pid = row.get("problem_id")
        try:
            position = int(pid)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise field_error("problem_id", f"expected an integer row position, got {pid!r}") from None
        if not 1 <= position <= TRACK_SIZE * len(self.track_order):
            raise field_error("problem_id", f"{position} is outside 1..{TRACK_SIZE * len(self.track_order)}, "
                              "so its track cannot be inferred")
        return {"track": self.track_order[(position - 1) // TRACK_SIZE]}

    def load_official(self) -> list[EvalItem]:
        path = self.annotation_path
        return [self._official_item(row, i, path) for i, row in enumerate(read_rows(path))]

    def _official_item(self, row: Mapping[str, Any], i: int, path: Any) -> EvalItem:
        vid = require(row, "id", str, path, i)
        question = require(row, "question", str, path, i)
        answer = str(require(row, "answer", (str, int, float), path, i))
        qtype = require(row, "question_type", str, path, i)
        track = row.get("track", self.track)
        if track not in TRACKS:
            raise SchemaError(f"{path}: row {i}: field 'track': got {track!r}; give it in the row or as the "
                              f"`track` argument, one of {list(TRACKS)}")
        options: list[str] | None = None
        if qtype == "multiple-choice":
            options = lettered(require(row, "options", list, path, i))
            body = question + "\n" + "\n".join(options)
            prompt = PRE_PROMPT + MCQ_PROMPT + body if track == "Adaptation" else body + POST_PROMPT
        elif qtype == "open":
            prompt = PRE_PROMPT + OPEN_PROMPT + question if track == "Adaptation" else question + POST_PROMPT
        else:
            raise SchemaError(f"{path}: row {i}: field 'question_type': expected 'multiple-choice' or 'open', "
                              f"got {qtype!r}")
        return EvalItem(qid=f"{track}/{vid}", video_path=resolve_video_path(self.video_root, f"{vid}.mp4"),
                        prompt_text=prompt, answer=answer, problem_type=qtype, options=options, meta={"track": track})

    def extract_official(self, output: str, item: EvalItem) -> Extraction:
        if item.problem_type == "multiple-choice":
            return extract_mmmu(output, option_texts(item.options or []))
        text = output.strip()
        return Extraction(text, "open_text") if text else Extraction(None, "none")

    def score_official(self, pred: str | None, item: EvalItem) -> float:
        if pred is None:
            return 0.0
        if item.problem_type == "multiple-choice":
            return 1.0 if pred == item.answer else 0.0
        return score_open(pred, item.answer)


def knowledge_gain(acc_after: float, acc_before: float) -> float:
    """Video-MMMU's knowledge gain on Adaptation, ``(after - before) / (1 - before)`` on fractions in [0, 1].

    >>> round(knowledge_gain(0.5, 0.4), 6)  # (50 - 40) / (100 - 40)
    0.166667
    """
    if acc_before >= 1.0:
        raise ValueError("knowledge gain is undefined when the accuracy before the video is already 1")
    return (acc_after - acc_before) / (1.0 - acc_before)


def score_open(pred: str, gold: str) -> float:
    """Simplified MMMU open-answer check (see the module docstring).

    >>> score_open("so the total is 1,200.0 kg", "1200"), score_open("it is Mitosis.", "mitosis")
    (1.0, 1.0)
    """
    gold_num = parse_number(gold.strip())
    if gold_num is not None:
        numbers = [parse_number(n) for n in _NUMBER_RE.findall(pred)]
        return 1.0 if any(n is not None and round(n, 2) == round(gold_num, 2) for n in numbers) else 0.0
    target, text = gold.strip().lower(), f" {pred.lower()} "
    if len(target) == 1:  # a single character needs a space on one side, as in the reference
        return 1.0 if f" {target}" in text or f"{target} " in text else 0.0
    return 1.0 if target in text else 0.0
