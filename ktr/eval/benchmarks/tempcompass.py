"""TempCompass: temporal perception on 410 videos; breakdowns per dimension (action, speed, direction,
order, attribute_change), task type and fine-grained type; overall = the average over all questions.

Official format: ``questions/<task>.json`` files ``{video_id: {dimension: [{"question", "answer"}]}}``
plus ``meta_info.json`` (fine-grained type per video and dimension). ``annotation_path`` is the repository
folder (or its ``questions/`` folder), one task file (``meta_info.json`` next to it or one folder up, or
``meta_info_path``), or one combined JSON ``{"multi-choice": ..., "yes_no": ..., "meta_info": ...}``.
Videos are ``<video_root>/<video_id>.mp4``. Scoring is TempCompass' rule-based matching only; answers the
rules cannot match are unparsable (the official pipeline would ask an LLM judge). Captioning questions
need an LLM judge for every answer, so they are not loaded; their count is in :attr:`excluded`.

Video-R1 format: breakdown fields come from the row's ``dimension``/``dim``, ``task_type`` and
``fine_type`` extras when present, else ``"unknown"``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ktr.eval.base import EvalItem, Format, SchemaError, read_json, register_benchmark, resolve_video_path
from ktr.eval.benchmarks.videor1 import DualFormatBenchmark
from ktr.eval.extract import (
    Extraction,
    extract_tempcompass_caption_matching,
    extract_tempcompass_mc,
    extract_tempcompass_yes_no,
    score_tempcompass_caption_matching,
)

SCORED_TASKS = ("multi-choice", "yes_no", "caption_matching")
ALL_TASKS = (*SCORED_TASKS, "captioning")
DIMENSIONS = ("action", "speed", "direction", "order", "attribute_change")
ANSWER_PROMPTS = {
    "multi-choice": "\nPlease directly give the best option:",
    "yes_no": "\nPlease answer yes or no:",
    "caption_matching": "\nPlease directly give the best option:",
}
UNKNOWN = "unknown"


@register_benchmark("tempcompass")
class TempCompassBenchmark(DualFormatBenchmark):
    """TempCompass; meta: dimension, task_type, fine_type (+ answer_line for the official rules)."""

    breakdown_fields = ("dimension", "task_type", "fine_type")
    prompt_variants = {"video_r1": "video_r1_eval", "official": "tempcompass_official"}
    extraction_rules = {"video_r1": "video_r1", "official": "tempcompass_rules"}

    def __init__(self, annotation_path: str | os.PathLike, video_root: str | os.PathLike | None,
                 format: Format = "video_r1", tasks: Sequence[str] = SCORED_TASKS,  # noqa: A002
                 meta_info_path: str | os.PathLike | None = None) -> None:
        super().__init__(annotation_path, video_root, format)
        bad = [t for t in tasks if t not in SCORED_TASKS]
        if bad:
            why = ""
            if "captioning" in bad:
                why = " ('captioning' needs an LLM judge for every answer; ktr scores by rule only)"
            raise ValueError(f"tempcompass: unknown or unscored tasks {bad}{why}; "
                             f"expected a subset of {list(SCORED_TASKS)}")
        self.tasks = tuple(tasks)
        self.meta_info_path = None if meta_info_path is None else Path(meta_info_path)

    def video_r1_meta(self, row: Mapping[str, Any], index: int) -> dict[str, Any]:
        dimension = row.get("dimension", row.get("dim", UNKNOWN))
        return {"dimension": str(dimension), "task_type": str(row.get("task_type", UNKNOWN)),
                "fine_type": str(row.get("fine_type", UNKNOWN))}

    # ------------------------------------------------------------------------------------ official files

    def _task_files(self) -> tuple[dict[str, tuple[Any, Path]], Any, Path]:
        """``{task: (data, file)}`` for the tasks present, the meta info and its file."""
        path = self.annotation_path
        if path.is_dir():
            qdir = path / "questions" if (path / "questions").is_dir() else path
            files = {t: qdir / f"{t}.json" for t in ALL_TASKS if (qdir / f"{t}.json").is_file()}
            meta_path = self._meta_path(path, path.parent)
            return {t: (read_json(f), f) for t, f in files.items()}, read_json(meta_path), meta_path
        data = read_json(path)
        if isinstance(data, dict) and "meta_info" in data:  # combined file
            return {t: (data[t], path) for t in ALL_TASKS if t in data}, data["meta_info"], path
        if path.stem not in ALL_TASKS:
            raise SchemaError(f"{path}: not a TempCompass task file (name must be one of {list(ALL_TASKS)}.json) "
                              "and no 'meta_info' key")
        meta_path = self._meta_path(path.parent, path.parent.parent)
        return {path.stem: (data, path)}, read_json(meta_path), meta_path

    def _meta_path(self, *folders: Path) -> Path:
        """``meta_info_path`` if given, else the first ``meta_info.json`` found in ``folders``."""
        if self.meta_info_path is not None:
            return self.meta_info_path
        candidates = [folder / "meta_info.json" for folder in folders]
        return next((p for p in candidates if p.is_file()), candidates[0])  # read_json names a missing file

    def load_official(self) -> list[EvalItem]:
        tasks, meta_info, meta_path = self._task_files()
        missing = [t for t in self.tasks if t not in tasks]
        if missing:
            raise SchemaError(f"{self.annotation_path}: no questions for tasks {missing}")
        if "captioning" in tasks:
            self.excluded["captioning (LLM judge only)"] = _count(tasks["captioning"][0])
        items: list[EvalItem] = []
        for task in self.tasks:
            data, file = tasks[task]
            if not isinstance(data, dict):
                raise SchemaError(f"{file}: {task}: expected {{video_id: {{dimension: [questions]}}}}")
            for vid, dims in data.items():
                if not isinstance(dims, dict) or not all(isinstance(qs, list) for qs in dims.values()):
                    raise SchemaError(f"{file}: {task}[{vid!r}]: expected {{dimension: [questions]}}")
                for dim, questions in dims.items():
                    fine = _fine_type(meta_info, vid, dim, meta_path)
                    for j, q in enumerate(questions):
                        items.append(self._item(task, vid, dim, j, q, fine, file))
        return items

    def _item(self, task: str, vid: str, dim: str, j: int, q: Any, fine: str, file: Path) -> EvalItem:
        where = f"{file}: {task}[{vid!r}][{dim!r}][{j}]"
        if not isinstance(q, dict) or not isinstance(q.get("question"), str) or not isinstance(q.get("answer"), str):
            raise SchemaError(f"{where}: expected an object with string fields 'question' and 'answer'")
        if dim not in DIMENSIONS:
            raise SchemaError(f"{where}: unknown dimension {dim!r}; expected one of {list(DIMENSIONS)}")
        question, answer_line = q["question"], q["answer"].strip()
        options = question.split("\n")[1:] or None
        answer = answer_line
        if task == "multi-choice":
            if answer_line[:1] not in ("A", "B", "C", "D"):
                raise SchemaError(f"{where}: field 'answer': expected 'X. ...' with X in A-D, got {answer_line!r:.40}")
            answer = answer_line[0]
        elif task == "yes_no":
            if answer_line not in ("yes", "no"):
                raise SchemaError(f"{where}: field 'answer': expected 'yes' or 'no', got {answer_line!r:.40}")
            options = None
        meta = {"dimension": dim, "task_type": task, "fine_type": fine, "answer_line": answer_line, "video_id": vid}
        return EvalItem(qid=f"{task}/{vid}/{dim}/{j}", video_path=resolve_video_path(self.video_root, f"{vid}.mp4"),
                        prompt_text=question + ANSWER_PROMPTS[task], answer=answer, problem_type=task,
                        options=options, meta=meta)

    def extract_official(self, output: str, item: EvalItem) -> Extraction:
        task = item.meta["task_type"]
        if task == "multi-choice":
            return extract_tempcompass_mc(output, item.meta["answer_line"])
        if task == "yes_no":
            return extract_tempcompass_yes_no(output)
        return extract_tempcompass_caption_matching(output, item.options or [])

    def score_official(self, pred: str | None, item: EvalItem) -> float:
        if item.meta["task_type"] == "caption_matching":
            return score_tempcompass_caption_matching(pred, item.meta["answer_line"])
        return 1.0 if pred is not None and pred == item.answer else 0.0


def _fine_type(meta_info: Any, vid: str, dim: str, meta_path: Path) -> str:
    """Fine-grained type of a video's dimension; the official script names every ``order`` type "order"."""
    if dim == "order":
        return "order"
    try:
        return str(meta_info[vid]["eval_dim"][dim]["type"])
    except (KeyError, TypeError):
        raise SchemaError(f"{meta_path}: no fine-grained type at [{vid!r}]['eval_dim'][{dim!r}]['type']") from None


def _count(task_data: Any) -> int:
    return sum(len(qs) for dims in task_data.values() for qs in dims.values()) if isinstance(task_data, dict) else 0
