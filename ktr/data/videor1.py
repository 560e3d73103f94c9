"""Data modules for files in the Video-R1 schema (layer L3): Video-R1-Holmes-16k, Video-R1-260k, Video-R1-COT-165k.

A data file is a JSON list or JSONL of rows (`problem_id`, `problem`, `data_type`, `problem_type`, `options`,
`solution`, `path`, `data_source`; the COT file adds `process`), docs/method.md section 5.5. `path` is relative to a
media root (`./LLaVA-Video-178K/...`); images and videos are mixed in one run and decoded in DataLoader workers.

Bad input, two stages:

- **load time** (schema): every row goes through `ktr.data.prompts.validate_row`. By default an invalid row is
  dropped and counted, and ONE warning per file lists the counts by reason and the first few problems, each
  naming file, row index and field; if more than `max_skip_fraction` of a file's rows are invalid it is
  probably not a Video-R1 file and loading fails. With `strict=True` the first invalid row raises
  `DataFileError` naming file, row and field.
- **run time** (media): a row whose file is missing or cannot be decoded becomes a `Skipped` record in its
  batch (never replaced by another row) and is counted by `ktr.data.skips.SkipCounter`.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from ktr.data.base import BaseDataModule, decode_image_file, decode_video_file
from ktr.data.prompts import validate_row
from ktr.data.skips import SourcedRow
from ktr.types import Media

log = logging.getLogger(__name__)

DataTypeName = Literal["image", "video"]
MAX_EXAMPLES = 5
"""Invalid rows quoted in the load-time warning."""


class DataFileError(ValueError):
    """A data file cannot be used: malformed JSON, an invalid row in strict mode, or too many invalid rows."""


@dataclass
class RowProblem:
    """Where a row is invalid and why; `problem` names the field."""

    file: str
    row: int  # 0-based index among the file's records
    line: int | None  # 1-based line number (JSONL only)
    problem: str
    key: str  # reason key for the counts, e.g. "missing field 'solution'" or "field 'options'"

    def short(self) -> str:
        """`row 4 (line 5): <problem>`, without the file."""
        where = f"row {self.row}" + (f" (line {self.line})" if self.line is not None else "")
        return f"{where}: {self.problem}"

    def __str__(self) -> str:
        return f"{self.file}, {self.short()}"


@dataclass
class LoadReport:
    """What loading one data file kept and dropped."""

    file: str
    total: int = 0  # records in the file
    invalid_rows: int = 0  # records dropped as invalid
    invalid: Counter = field(default_factory=Counter)  # reason key -> problems (a row may have several)
    examples: list[RowProblem] = field(default_factory=list)  # first MAX_EXAMPLES problems
    filtered: int = 0  # valid rows dropped by the data_types filter
    kept: int = 0
    duplicates: dict[str, list[int]] = field(default_factory=dict)  # problem_id (JSON) -> its rows, if > 1

    def duplicates_summary(self) -> str:
        rows = sum(len(v) for v in self.duplicates.values())
        examples = "; ".join(f"{k} at rows {', '.join(map(str, v[:4]))}" for k, v in list(self.duplicates.items())[:3])
        return (f"{self.file}: {len(self.duplicates)} problem_ids occur more than once ({rows} rows), e.g. "
                f"{examples}. The rows are kept; per-question results keyed by problem_id may mix them")

    def summary(self) -> str:
        counts = ", ".join(f"{k}: {n}" for k, n in self.invalid.most_common())
        examples = "; ".join(p.short() for p in self.examples)
        return (f"{self.file}: {self.invalid_rows} of {self.total} rows are invalid and were skipped "
                f"(problems: {counts}). First problems: {examples}")


def _reason_key(problem: str) -> str:
    """Count key of a `validate_row` message: the text before the first colon names the field."""
    return problem.split(":", 1)[0]


@dataclass
class BadLine:
    """A JSONL line that cannot be a row (not UTF-8, not JSON); `problem` says why."""

    problem: str


_UTF16_32 = (b"\xff\xfe", b"\xfe\xff")  # UTF-16/32 byte-order marks (UTF-32 LE starts like UTF-16 LE)


def read_records(path: str | Path) -> list[tuple[int, int | None, Any]]:
    """`(row index, line, record)` of a JSON list or JSONL file.

    A whole-file failure raises `DataFileError` naming the file and what is wrong: it cannot be read, it is
    not UTF-8, a JSON list is not valid JSON (line and column given), or the top-level value is neither a list
    of rows nor one object per line. In a JSONL file one bad line costs only its row: a line that is not UTF-8
    or not JSON gives a `BadLine` record (an invalid row for the caller) and the other lines are read.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:  # a directory, no permission, a broken disk...
        raise DataFileError(f"{path}: cannot read the data file ({type(e).__name__}: {e.strerror or e})") from e
    if raw.startswith(_UTF16_32):
        raise DataFileError(f"{path}: the file is UTF-16/32 encoded (byte-order mark); save it as UTF-8")
    raw = raw.removeprefix(b"\xef\xbb\xbf")  # UTF-8 byte-order mark
    try:
        text: str | None = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        text = None
        if raw.lstrip()[:1] == b"[":  # one JSON document: nothing can be read past a bad byte
            line = raw[: e.start].count(b"\n") + 1
            raise DataFileError(f"{path}: not UTF-8 text at line {line} (byte {e.start}: {e.reason}); "
                                "save the file as UTF-8") from e
    if text is not None:
        whole = _whole_document(path, text)
        if whole is not None:
            return whole
    return _jsonl_records(raw)


def _whole_document(path: Path, text: str) -> list[tuple[int, int | None, Any]] | None:
    """Records of a file that is one JSON document; None when it is JSON Lines (several documents)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip()[:1] == "[":
            raise DataFileError(f"{path}: not valid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
        return None  # JSON Lines (or garbage): read line by line
    except RecursionError as e:
        raise DataFileError(f"{path}: JSON nested too deeply to read") from e
    if isinstance(data, list):
        return [(i, None, rec) for i, rec in enumerate(data)]
    if isinstance(data, dict) and len([ln for ln in text.splitlines() if ln.strip()]) == 1:
        return [(0, next(i for i, ln in enumerate(text.splitlines(), 1) if ln.strip()), data)]  # one JSONL row
    if isinstance(data, dict):
        raise DataFileError(f"{path}: the file is one JSON object (keys {sorted(data)[:5]}), expected a list of "
                            "rows or JSON Lines (one row object per line)")
    raise DataFileError(f"{path}: the top-level JSON value is a {type(data).__name__}, expected a list of rows "
                        "or JSON Lines (one row object per line)")


def _jsonl_records(raw: bytes) -> list[tuple[int, int | None, Any]]:
    out: list[tuple[int, int | None, Any]] = []
    for lineno, line in enumerate(raw.split(b"\n"), start=1):  # only \n ends a JSONL line (not U+2028 etc.)
        if not line.strip():
            continue
        try:
            rec: Any = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            rec = BadLine(f"line is not UTF-8 text: byte {e.start} of the line, {e.reason}")
        except json.JSONDecodeError as e:
            rec = BadLine(f"line is not valid JSON: {e.msg} (column {e.colno})")
        except RecursionError:
            rec = BadLine("line is not readable JSON: nested too deeply")
        out.append((len(out), lineno, rec))
    return out


def row_problems(record: Any, require_process: bool = False) -> list[str]:
    """Schema problems of one record, each naming its field (`[]` for a good row)."""
    if isinstance(record, BadLine):
        return [record.problem]
    if not isinstance(record, dict):
        return [f"row is a {type(record).__name__}, expected an object"]
    problems = validate_row(record)
    if record.get("path") == "":
        problems.append("field 'path': empty")
    if require_process:
        process = record.get("process")
        if process is None:
            problems.append("missing field 'process'")
        elif not isinstance(process, str) or "<think>" not in process or "</think>" not in process:
            problems.append(f"field 'process': expected a string holding <think>...</think>, got {process!r:.80}")
    return problems


def load_rows(path: str | Path, *, strict: bool = False, require_process: bool = False,
              data_types: Sequence[str] | None = None, max_invalid_fraction: float = 1.0
              ) -> tuple[list[dict], LoadReport]:
    """Valid rows of one data file and a report of what was dropped.

    Raises `DataFileError` on the first invalid row when `strict`, or when more than `max_invalid_fraction` of
    the rows are invalid; otherwise logs one warning listing the counts by reason and the first problems.
    """
    report = LoadReport(file=str(path))
    rows: list[dict] = []
    ids: dict[str, list[int]] = {}  # problem_id (as JSON) -> file rows holding it
    for index, line, record in read_records(path):
        report.total += 1
        problems = row_problems(record, require_process)
        for problem in problems:
            found = RowProblem(str(path), index, line, problem, _reason_key(problem))
            if strict:
                raise DataFileError(f"{found} (strict=True; set strict=False to skip and count invalid rows)")
            report.invalid[found.key] += 1
            if len(report.examples) < MAX_EXAMPLES:
                report.examples.append(found)
        if problems:
            report.invalid_rows += 1
            continue
        if data_types is not None and record["data_type"] not in data_types:
            report.filtered += 1
            continue
        rows.append(SourcedRow.of(record, f"{path} row {index}" + (f" (line {line})" if line is not None else "")))
        if record.get("problem_id") is not None:
            ids.setdefault(json.dumps(record["problem_id"], sort_keys=True), []).append(index)
    report.kept = len(rows)
    report.duplicates = {k: v for k, v in ids.items() if len(v) > 1}
    if report.duplicates:
        log.warning(report.duplicates_summary())
    if report.invalid_rows:
        if report.invalid_rows > max_invalid_fraction * report.total:
            raise DataFileError(f"{report.summary()}. That is more than max_skip_fraction="
                                f"{max_invalid_fraction:g} of the file: is it in the Video-R1 schema?")
        log.warning(report.summary())
    return rows, report


def resolve_media_path(path: str, media_root: str | Path) -> Path:
    """Where a row's `path` points: absolute paths as they are, relative ones under `media_root`.

    `./LLaVA-Video-178K/a.mp4` under `/data` is `/data/LLaVA-Video-178K/a.mp4`. When `media_root` itself ends
    with the path's first component (`/data/LLaVA-Video-178K`) and the plain join does not exist, the
    repeated component is dropped (`/data/LLaVA-Video-178K/a.mp4`, not `.../LLaVA-Video-178K/LLaVA-Video-178K/`).

    >>> str(resolve_media_path("./LLaVA-Video-178K/a.mp4", "/data"))
    '/data/LLaVA-Video-178K/a.mp4'
    """
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    root = Path(media_root).expanduser()
    parts = PurePosixPath(path.replace("\\", "/")).parts  # "./a/b" -> ("a", "b")
    if not parts:
        raise ValueError(f"field 'path': empty media path {path!r}")
    direct = root.joinpath(*parts)
    if len(parts) > 1 and parts[0] == root.name and not direct.exists():
        stripped = root.joinpath(*parts[1:])
        if stripped.exists():
            return stripped
    return direct


def split_rows(rows: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Deterministic held-out split: `round(val_fraction * n)` rows (at least 1) drawn with `seed`.

    Both parts keep the file order.
    """
    if not rows:
        return [], []
    n_val = max(1, round(val_fraction * len(rows)))
    if n_val >= len(rows):
        raise ValueError(f"val_fraction={val_fraction} leaves no training rows out of {len(rows)}")
    held = set(random.Random(seed).sample(range(len(rows)), n_val))
    return ([r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held])


class VideoR1DataModule(BaseDataModule):
    """Any JSON or JSONL file in the Video-R1 schema plus a media root (e.g. Video-R1-260k).

    Rows are read, validated and split at `setup` (or on the first `train_rows()` call); the number of rows
    dropped at load time is in `self.reports` (one `LoadReport` per file).
    """

    require_process: bool = False
    """Rows must carry `process` (`<think>...</think>`) and the SFT target is `process + "\\n" + solution`."""
    expected_rows: int | None = None
    """Rows of the released file; a different count is warned about (wrong file?)."""

    def __init__(self, train_file: str, media_root: str | None = None, val_file: str | None = None,
                 val_fraction: float = 0.0, data_types: list[DataTypeName] | None = None,
                 max_samples: int | None = None, strict: bool = False, **kwargs) -> None:
        """
        Args:
            train_file: JSON list or JSONL of training rows.
            media_root: directory that rows' relative `path` values start from; default: train_file's directory.
            val_file: JSON/JSONL of validation rows (same media root).
            val_fraction: hold out this fraction of train_file's rows for validation instead (not with val_file).
            data_types: keep only these data types (`image`, `video`); default both.
            max_samples: keep only the first this many valid (and type-filtered) training rows, before the split.
            strict: raise on the first invalid row (naming file, row, field) instead of skipping and counting.
            **kwargs: see BaseDataModule (batch sizes, workers, video/image settings, max_skip_fraction, ...).
        """
        super().__init__(**kwargs)
        for name, f in (("train_file", train_file), ("val_file", val_file)):
            if f is not None and not Path(f).is_file():
                raise FileNotFoundError(f"{name}: data file {f!r} not found")
        if media_root is not None and not Path(media_root).is_dir():
            raise FileNotFoundError(f"media_root: directory {media_root!r} not found")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if val_file is not None and val_fraction > 0:
            raise ValueError("give either val_file or val_fraction, not both")
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        self.train_file, self.val_file, self.val_fraction = train_file, val_file, val_fraction
        self.media_root = Path(media_root) if media_root is not None else Path(train_file).parent
        self.data_types, self.max_samples, self.strict = data_types, max_samples, strict
        self.reports: list[LoadReport] = []
        self._train: list[dict] | None = None
        self._val: list[dict] = []

    def _read(self, path: str) -> list[dict]:
        rows, report = load_rows(path, strict=self.strict, require_process=self.require_process,
                                 data_types=self.data_types, max_invalid_fraction=self.max_skip_fraction)
        self.reports.append(report)
        if self.expected_rows is not None and path == self.train_file and report.total != self.expected_rows:
            log.warning("%s has %d rows; the released %s file has %d: is it the intended file?",
                        path, report.total, type(self).__name__, self.expected_rows)
        return rows

    def _load(self) -> None:
        if self._train is not None:
            return
        rows = self._read(self.train_file)
        if self.max_samples is not None:
            rows = rows[: self.max_samples]
        if self.val_file is not None:
            self._val = self._read(self.val_file)
        elif self.val_fraction > 0:
            rows, self._val = split_rows(rows, self.val_fraction, self.seed)
        if not rows:
            raise DataFileError(f"{self.train_file}: no usable training rows (data_types={self.data_types})")
        self._train = rows

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        self._load()
        if self.trainer is not None and self.wants_sft_targets() and not self.require_process:
            raise ValueError(f"{type(self).__name__} has no SFT targets; for supervised fine-tuning use "
                             "ktr.data.videor1.VideoR1COTDataModule (rows with a `process` field)")

    def load_metrics(self) -> dict[str, float]:
        """What loading dropped, summed over the files: `data/invalid_rows`, `data/invalid/<reason>`,
        `data/duplicate_problem_ids`, `data/rows_read`."""
        out = {"data/rows_read": 0.0, "data/invalid_rows": 0.0, "data/duplicate_problem_ids": 0.0}
        for r in self.reports:
            out["data/rows_read"] += r.total
            out["data/invalid_rows"] += r.invalid_rows
            out["data/duplicate_problem_ids"] += len(r.duplicates)
            for reason, n in r.invalid.items():
                key = "data/invalid/" + re.sub(r"[^A-Za-z0-9_.-]+", "_", reason).strip("_")
                out[key] = out.get(key, 0.0) + n
        return out

    def train_rows(self) -> Sequence[dict]:
        self._load()
        return self._train

    def val_rows(self) -> Sequence[dict]:
        self._load()
        return self._val

    def load_media(self, row: dict) -> Media:
        """Decode the row's image or video (runs in DataLoader workers); raises on missing/undecodable media."""
        path = str(resolve_media_path(row["path"], self.media_root))
        if row["data_type"] == "video":
            return decode_video_file(path, self.video)
        return decode_image_file(path, self.image)

    def sft_target(self, row: dict, index: int) -> str:
        """`process + "\\n" + solution` (Video-R1's SFT target: reasoning, then the answer tag)."""
        if "process" not in row:
            raise ValueError(f"row {index} ({row.get('path')!r}) has no 'process' field, so no SFT target")
        return row["process"] + "\n" + row["solution"]


class Holmes16kDataModule(VideoR1DataModule):
    """Video-R1-Holmes-16k, the released Video-KTR training set: 16,916 rows (8,765 image, 8,151 video), a
    subsample of Video-R1-260k plus ~1,551 Video-Holmes training questions. Media under Video-R1's data root."""

    expected_rows = 16_916


class VideoR1COTDataModule(VideoR1DataModule):
    """Video-R1-COT-165k for the SFT stage: the Video-R1 schema plus `process` (`<think>...</think>`);
    rows without a valid `process` are invalid at load time. Target: `process + "\\n" + solution`."""

    require_process = True
