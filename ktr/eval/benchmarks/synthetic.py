"""A synthetic benchmark in the Video-R1 eval format, written to disk on demand (layer L2, no Lightning).

The demo evaluation (``configs/demo_eval.yaml``) must run anywhere, so its benchmark is generated: the items
of :mod:`ktr.data.synthetic` (a disjoint index range from training and validation) are written as an
``annotation.json`` list of Video-R1 eval rows (``path: ./Evaluation/Synthetic/<id>.mp4``) plus one small
mp4 per row. Evaluation then reads them through exactly the path real benchmarks take: the Video-R1 row
parser, path resolution, video decoding (decord or PyAV, `video.backend`), the Video-R1 prompt, extraction and scoring.

Its videos are written with :func:`ktr.data.video.write_video`, which tests use too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from ktr.data.prompts import build_question
from ktr.data.synthetic import SyntheticSpec, make_item
from ktr.data.video import write_video
from ktr.eval.base import EvalItem, Format, read_rows
from ktr.eval.benchmarks.videor1 import DualFormatBenchmark, field_error
from ktr.eval.extract import Extraction

EVAL_FIRST_INDEX = 20_000_000
"""First item index of the synthetic benchmark: far from training (0..) and validation (10,000,000..)."""
VIDEO_FOLDER = ("Evaluation", "Synthetic")




def synthetic_rows(num_questions: int, seed: int = 0, spec: SyntheticSpec | None = None,
                   first_index: int = EVAL_FIRST_INDEX) -> list[dict[str, Any]]:
    """Video-R1 eval rows of the synthetic benchmark (no frames rendered)."""
    spec = spec or SyntheticSpec()
    rows = []
    for index in range(first_index, first_index + num_questions):
        row, _ = make_item(seed, index, spec, render=False)
        row["path"] = "./" + "/".join((*VIDEO_FOLDER, f"{row['problem_id']}.mp4"))
        rows.append(row)
    return rows


def write_synthetic_benchmark(root: str | os.PathLike, num_questions: int, seed: int = 0,
                              spec: SyntheticSpec | None = None, first_index: int = EVAL_FIRST_INDEX) -> Path:
    """Write ``root/annotation.json`` and ``root/Evaluation/Synthetic/<id>.mp4``; returns the annotation path.

    Items are a pure function of (seed, index), so an existing video is kept as it is (re-runs and resumed
    evaluations read the same files); the annotation is rewritten only when its content changes.
    """
    spec = spec or SyntheticSpec()
    root = Path(root)
    rows = synthetic_rows(num_questions, seed, spec, first_index)
    for index, row in zip(range(first_index, first_index + num_questions), rows):
        video = root.joinpath(*VIDEO_FOLDER, f"{row['problem_id']}.mp4")
        if not video.is_file():
            _, frames = make_item(seed, index, spec)
            write_video(video, frames, spec.fps)
    annotation = root / "annotation.json"
    text = json.dumps(rows, indent=1)
    if not annotation.is_file() or annotation.read_text(encoding="utf-8") != text:
        tmp = annotation.with_name(f".annotation.{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, annotation)
    return annotation


class SyntheticVideoR1(DualFormatBenchmark):
    """The synthetic benchmark read as Video-R1 eval JSON; breakdown per question kind (direction, order).

    Not registered in :data:`ktr.eval.BENCHMARKS`, which lists the five paper benchmarks only.
    """

    name = "synthetic"
    breakdown_fields = ("kind",)

    def __init__(self, annotation_path: str | os.PathLike, video_root: str | os.PathLike | None,
                 format: Format = "video_r1", wording: Literal["eval", "train"] = "eval") -> None:  # noqa: A002
        if format != "video_r1":
            raise ValueError(f"synthetic: only format 'video_r1' exists, got {format!r}")
        if wording not in ("eval", "train"):
            raise ValueError(f"synthetic: wording must be 'eval' or 'train', got {wording!r}")
        self.wording = wording
        super().__init__(annotation_path, video_root, format)

    @property
    def prompt_variant(self) -> str:
        return "video_r1_eval" if self.wording == "eval" else "video_r1_train"

    def load(self) -> list[EvalItem]:
        """The rows as Video-R1 eval items; with `wording: train`, the prompt of the training template (a tiny
        policy trained on one exact prompt, like the demo's, does not transfer to the evaluation wording)."""
        items = super().load()
        if self.wording == "eval":
            return items
        rows = read_rows(self.annotation_path)
        return [replace(item, prompt_text=build_question(row, eval=False)) for item, row in zip(items, rows)]

    def video_r1_meta(self, row: Mapping[str, Any], index: int) -> dict[str, Any]:
        source = str(row.get("data_source", ""))
        if not source.startswith("synthetic/"):
            raise field_error("data_source", f"expected 'synthetic/<kind>', got {source!r:.40}")
        return {"kind": source.split("/", 1)[1]}

    def load_official(self) -> list[EvalItem]:  # unreachable: __init__ accepts video_r1 only
        raise ValueError("synthetic: no official format")

    def extract_official(self, output: str, item: EvalItem) -> Extraction:
        raise ValueError("synthetic: no official format")
