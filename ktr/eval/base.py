"""Evaluation items, the benchmark base class and its registry (layer L1: stdlib only, no Lightning).

A benchmark reads its annotation file into :class:`EvalItem` objects (``load``), reads the answer out of a
model output (``extract_detail`` / ``extract``), scores it (``score``) and names the breakdown groups of
an item (``breakdown_keys``). :meth:`Benchmark.evaluate` runs the last three and returns the record
written to ``predictions.jsonl`` and aggregated by :func:`ktr.eval.metrics.summarize`.

Benchmarks are registered by name in :data:`BENCHMARKS` (``"videomme"``, ``"tempcompass"``,
``"videommmu"``, ``"mmvu"``, ``"videoholmes"``); :func:`ktr.eval.get_benchmark` fails with the valid names.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar, Literal, get_args

from ktr.eval.extract import Extraction

Format = Literal["video_r1", "official"]
FORMATS: tuple[str, ...] = get_args(Format)


class SchemaError(ValueError):
    """An annotation row that cannot be read; the message names the file, the row and the field."""


def schema_error(path: str | os.PathLike, row: int | str, field_name: str, problem: str) -> SchemaError:
    return SchemaError(f"{path}: row {row}: field {field_name!r}: {problem}")


@dataclass
class EvalItem:
    """One benchmark question, ready for generation and scoring.

    ``qid`` is unique within the benchmark; ``video_path`` is absolute (it may not exist: the evaluator
    counts unreadable videos as skipped); ``prompt_text`` is the user text placed after the video;
    ``answer`` is the gold answer in the form the benchmark's extraction rule produces (usually a letter);
    ``problem_type`` is the Video-R1 type for Video-R1 rows, else the benchmark's own question type;
    ``options`` are the option lines as shown in the prompt; ``meta`` holds the breakdown fields and any
    other field the scorer needs (documented per benchmark).
    """

    qid: str
    video_path: str
    prompt_text: str
    answer: str
    problem_type: str
    options: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- paths


def _overlap(root_parts: tuple[str, ...], rel_parts: tuple[str, ...]) -> int:
    """Largest k with root_parts[-k:] == rel_parts[:k] (k < len(rel_parts): the file name never overlaps)."""
    for k in range(min(len(root_parts), len(rel_parts) - 1), 0, -1):
        if tuple(root_parts[-k:]) == tuple(rel_parts[:k]):
            return k
    return 0


def resolve_video_path(video_root: str | os.PathLike | None, stored: str) -> str:
    """Absolute path of a stored video path under ``video_root``, without the doubled-folder pitfall.

    - Relative paths (``./Evaluation/VideoMME/x.mp4``) are joined to ``video_root``. When the root already
      ends with the path's leading folders (root ``.../Evaluation``), they are not repeated, unless only
      the doubled path exists on disk (the layout the released Video-R1 script expects).
    - Absolute paths are kept when ``video_root`` is None; otherwise they come from another machine
      (``/nas-ssd2/.../videos/x.mp4``) and are rebased onto ``video_root`` by file name.

    >>> resolve_video_path("/data/Evaluation", "./Evaluation/VideoMME/a.mp4")
    '/data/Evaluation/VideoMME/a.mp4'
    >>> resolve_video_path("/data", "./Evaluation/VideoMME/a.mp4")
    '/data/Evaluation/VideoMME/a.mp4'
    >>> resolve_video_path("/videos", "/nas/user/Holmes/videos/b.mp4")
    '/videos/b.mp4'
    """
    stored_path = PurePosixPath(stored.replace("\\", "/"))
    if stored_path.is_absolute():
        if video_root is None:
            return os.path.normpath(str(stored_path))
        return os.path.abspath(os.path.join(os.fspath(video_root), stored_path.name))
    root = os.path.abspath(os.fspath(video_root) if video_root is not None else ".")
    rel_parts = tuple(p for p in stored_path.parts if p not in ("", "."))
    k = _overlap(Path(root).parts, rel_parts)
    joined = os.path.join(root, *rel_parts[k:])
    if k > 0 and not os.path.exists(joined):
        doubled = os.path.join(root, *rel_parts)
        if os.path.exists(doubled):
            return doubled
    return joined


# --------------------------------------------------------------------------------------------- reading


def read_json(path: str | os.PathLike) -> Any:
    """JSON (or JSON Lines, by suffix ``.jsonl``) with errors that name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise SchemaError(f"{path}: line {lineno}: invalid JSON: {err}") from None
        return rows
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise SchemaError(f"{path}: invalid JSON: {err}") from None


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """A JSON list of objects; the error names the file and the first row that is not an object."""
    data = read_json(path)
    if not isinstance(data, list):
        raise SchemaError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise SchemaError(f"{path}: row {i}: expected an object, got {type(row).__name__}")
    return data


def require(row: Mapping[str, Any], name: str, kind: type | tuple[type, ...], path: Any, index: Any) -> Any:
    """``row[name]`` checked for presence and type; SchemaError naming file, row and field otherwise."""
    if name not in row or row[name] is None:
        raise schema_error(path, index, name, "missing")
    value = row[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        expected = " or ".join(k.__name__ for k in kinds)
        raise schema_error(path, index, name, f"expected {expected}, got {type(value).__name__}: {value!r:.60}")
    return value


def check_unique(items: list[EvalItem], path: Any) -> None:
    seen: set[str] = set()
    for item in items:
        if item.qid in seen:
            raise SchemaError(f"{path}: question id {item.qid!r} appears more than once")
        seen.add(item.qid)


# ------------------------------------------------------------------------------------------- benchmark


class Benchmark(ABC):
    """One benchmark in one annotation format. Subclasses set the class variables and the four methods.

    ``format="video_r1"`` reads the Video-R1 eval JSON (Video-R1 prompt and extraction rule);
    ``format="official"`` reads the benchmark's own files (its prompt and extraction rule).
    After :meth:`load`, :attr:`excluded` counts rows left out on purpose, by reason (e.g. MMVU open-ended).
    """

    name: ClassVar[str]
    breakdown_fields: ClassVar[tuple[str, ...]]
    prompt_variants: ClassVar[dict[str, str]]  # format -> prompt variant name
    extraction_rules: ClassVar[dict[str, str]]  # format -> extraction rule name

    def __init__(self, annotation_path: str | os.PathLike, video_root: str | os.PathLike | None,
                 format: Format = "video_r1") -> None:  # noqa: A002 - the issue's argument name
        if format not in FORMATS:
            raise ValueError(f"{self.name}: unknown format {format!r}; expected one of {list(FORMATS)}")
        self.annotation_path = Path(annotation_path)
        self.video_root = None if video_root is None else os.fspath(video_root)
        self.format: Format = format
        self.excluded: dict[str, int] = {}

    @property
    def prompt_variant(self) -> str:
        return self.prompt_variants[self.format]

    @property
    def extraction_rule(self) -> str:
        return self.extraction_rules[self.format]

    def settings(self) -> dict[str, Any]:
        """The benchmark part of ``results.json``'s ``settings``."""
        return {"benchmark": self.name, "format": self.format, "annotation_path": str(self.annotation_path),
                "video_root": self.video_root, "prompt_variant": self.prompt_variant,
                "extraction_rule": self.extraction_rule, "excluded": dict(self.excluded)}

    @abstractmethod
    def load(self) -> list[EvalItem]:
        """All scored questions, in file order; raises SchemaError naming file, row and field."""

    @abstractmethod
    def extract_detail(self, output: str, item: EvalItem) -> Extraction:
        """The answer read from ``output`` and the rule step that decided it."""

    @abstractmethod
    def score(self, pred: str | None, item: EvalItem) -> float:
        """Score in [0, 1] of an extracted answer (None = unparsable, scores 0)."""

    def extract(self, output: str, item: EvalItem) -> str | None:
        """The extracted answer, or None when the output is unparsable."""
        return self.extract_detail(output, item).answer

    def breakdown_keys(self, item: EvalItem) -> dict[str, str]:
        """``{field: group}`` for every field of :attr:`breakdown_fields`."""
        return {name: str(item.meta[name]) for name in self.breakdown_fields}

    def parsed(self, extraction: Extraction, item: EvalItem) -> bool:
        """Whether the rule read an answer out of the output (else counted in ``n_unparsable``); only the
        accounting depends on it, never the score."""
        return extraction.answer is not None

    def evaluate(self, output: str, item: EvalItem, prompt_hash: str | None = None) -> dict[str, Any]:
        """The ``predictions.jsonl`` record of one answered question (see :mod:`ktr.eval.metrics`)."""
        extraction = self.extract_detail(output, item)
        score = float(self.score(extraction.answer, item))
        return {"qid": item.qid, "prompt_hash": prompt_hash, "output": output, "extracted": extraction.answer,
                "step": extraction.step, "parsed": self.parsed(extraction, item), "score": score,
                "correct": score >= 1.0, "answer": item.answer, "keys": self.breakdown_keys(item),
                "skipped": None}

    def skipped(self, item: EvalItem, reason: str, prompt_hash: str | None = None) -> dict[str, Any]:
        """The record of a question not answered (unreadable video); never scored, listed in results."""
        return {"qid": item.qid, "prompt_hash": prompt_hash, "output": None, "extracted": None, "step": None,
                "parsed": False, "score": None, "correct": False, "answer": item.answer,
                "keys": self.breakdown_keys(item), "skipped": reason}


BENCHMARKS: dict[str, type[Benchmark]] = {}


def register_benchmark(name: str) -> Callable[[type[Benchmark]], type[Benchmark]]:
    def wrap(cls: type[Benchmark]) -> type[Benchmark]:
        if name in BENCHMARKS:
            raise ValueError(f"benchmark {name!r} is registered twice")
        cls.name = name
        BENCHMARKS[name] = cls
        return cls

    return wrap

