"""Aggregation of per-question records and ``predictions.jsonl`` I/O (layer L1: stdlib only).

A *record* is the dict :meth:`ktr.eval.base.Benchmark.evaluate` (answered) or
:meth:`~ktr.eval.base.Benchmark.skipped` (unreadable video) returns::

    {"qid", "prompt_hash", "output", "extracted", "step", "parsed", "score", "correct", "answer",
     "keys": {breakdown field: group}, "skipped": None | reason}

Multi-rank evaluation stays exact by gathering records (not partial means) and summarising once:
:func:`summarize` de-duplicates by ``qid`` (a distributed sampler pads ranks with repeated questions), so
the result does not depend on how questions were sharded.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ktr.eval.base import EvalItem


def prompt_hash(text: str) -> str:
    """Short, stable hash of a prompt (first 16 hex digits of SHA-256 of its UTF-8 bytes).

    >>> prompt_hash("abc")
    'ba7816bf8f01cfea'
    """
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _acc(total: float, n: int) -> float | None:
    return total / n if n else None


def dedupe(records: Iterable[Mapping[str, Any]]) -> tuple[list[Mapping[str, Any]], int]:
    """Records with the first occurrence of each ``qid`` kept, and the number of dropped repeats."""
    seen: dict[str, Mapping[str, Any]] = {}
    dropped = 0
    for rec in records:
        if rec["qid"] in seen:
            dropped += 1
        else:
            seen[rec["qid"]] = rec
    return list(seen.values()), dropped


def summarize(records: Iterable[Mapping[str, Any]], excluded: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Overall accuracy, breakdowns and counts of a set of records (accuracies are fractions in [0, 1]).

    Two denominators: ``overall`` divides the summed scores by every question (unparsable answers score 0;
    lmms-eval's convention), ``overall_answered`` by the questions whose answer could be extracted (the
    Video-MME official script's). A skipped question (video missing or unreadable, prompt too long) counts as
    wrong in ``overall`` and in each group's ``acc``, as the official scripts count a question that raised
    (the released Video-R1 evaluation scores it ``<answer>error</answer>``, Video-Holmes' "Wrong"); it is
    listed in ``skipped``, and ``overall_readable`` divides by the questions that were not skipped (what
    ``overall`` was before 2026-12-06). ``breakdown[field][group]`` has ``acc``, ``n``, ``acc_answered``,
    ``n_answered`` (``n`` counts skipped questions too). ``extraction_steps`` counts the rule step that decided
    each answer; ``n_unparsable`` counts records the rule read no answer from (``Benchmark.parsed``: for Video-R1
    multiple choice, no option letter, even when its whole output was scored). ``excluded`` counts rows left out
    at loading, by reason (e.g. an answer not among the options).

    >>> recs = [{"qid": "1", "score": 1.0, "parsed": True, "keys": {"d": "short"}, "skipped": None},
    ...         {"qid": "2", "score": 0.0, "parsed": False, "keys": {"d": "long"}, "skipped": None}]
    >>> s = summarize(recs); s["overall"], s["overall_answered"], s["breakdown"]["d"]["long"]["acc"]
    (0.5, 1.0, 0.0)
    >>> recs.append({"qid": "3", "score": None, "parsed": False, "keys": {"d": "long"}, "skipped": "no file"})
    >>> s = summarize(recs); s["overall"], s["overall_readable"], s["breakdown"]["d"]["long"]["n"]
    (0.3333333333333333, 0.5, 2)
    """
    unique, n_duplicates = dedupe(records)
    scored = [r for r in unique if not r.get("skipped")]
    skipped = [{"qid": r["qid"], "reason": r["skipped"]} for r in unique if r.get("skipped")]
    answered = [r for r in scored if r["parsed"]]
    groups: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0, 0.0, 0]))
    for r in unique:  # a skipped question counts in its groups' `n`, with score 0
        for name, group in r["keys"].items():
            cell = groups[name][group]  # [score sum, n, answered score sum, n answered]
            cell[0] += r["score"] or 0.0
            cell[1] += 1
            if r["parsed"]:
                cell[2] += r["score"]
                cell[3] += 1
    breakdown = {
        name: {g: {"acc": _acc(c[0], int(c[1])), "n": int(c[1]), "acc_answered": _acc(c[2], int(c[3])),
                   "n_answered": int(c[3])} for g, c in sorted(cells.items())}
        for name, cells in sorted(groups.items())
    }
    right = sum(r["score"] for r in scored)
    return {
        "overall": _acc(right, len(unique)),
        "overall_answered": _acc(sum(r["score"] for r in answered), len(answered)),
        "overall_readable": _acc(right, len(scored)),
        "breakdown": breakdown,
        "n_questions": len(unique),
        "n_scored": len(scored),
        "n_skipped": len(skipped),
        "n_unparsable": len(scored) - len(answered),
        "n_duplicates": n_duplicates,
        "extraction_steps": dict(sorted(Counter(str(r.get("step")) for r in scored).items())),
        "excluded": dict(excluded or {}),
        "skipped": sorted(skipped, key=lambda s: s["qid"]),
    }


# --------------------------------------------------------------------------------------- predictions.jsonl


def append_prediction(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Append one record as one JSON line, written and flushed in a single call.

    A process killed mid-write leaves at most one partial last line, which :func:`load_predictions`
    ignores (and ``repair=True`` removes) on resume.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, ensure_ascii=False) + "\n"
    with path.open("a", encoding="utf-8") as f:
        f.write(line)
        f.flush()


def load_predictions(path: str | os.PathLike, repair: bool = False) -> dict[str, dict[str, Any]]:
    """``{qid: record}`` of a predictions file (a later line for the same qid wins); ``{}`` when absent.

    A last line without its newline that is not valid JSON is a write cut short: it is ignored, and with
    ``repair=True`` cut from the file so that appending can go on. Any other invalid line raises
    ValueError naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        return {}
    data = path.read_bytes()
    lines = data.split(b"\n")  # the last element is b"" when the file ends with a newline
    complete, tail = lines[:-1], lines[-1]
    records: dict[str, dict[str, Any]] = {}
    for lineno, raw in enumerate(complete, start=1):
        if raw.strip():
            rec = _parse_line(raw, path, lineno)
            records[str(rec["qid"])] = rec
    if tail.strip():
        try:
            rec = _parse_line(tail, path, len(lines))
            records[str(rec["qid"])] = rec
            keep = len(data)
        except ValueError:
            keep = len(data) - len(tail)  # truncated write: drop it
        if repair:
            with path.open("r+b") as f:
                f.truncate(keep)
                if keep == len(data):
                    f.seek(keep)
                    f.write(b"\n")
    return records


def _parse_line(raw: bytes, path: Path, lineno: int) -> dict[str, Any]:
    try:
        rec = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: line {lineno}: invalid JSON: {err}") from None
    if not isinstance(rec, dict) or "qid" not in rec:
        raise ValueError(f"{path}: line {lineno}: expected an object with a 'qid'")
    return rec


def pending_items(items: Iterable[EvalItem], done: Mapping[str, Mapping[str, Any]]) -> list[EvalItem]:
    """Items still to generate: not in ``done``, skipped last time, or asked with a different prompt.

    Comparing prompt hashes keeps a resumed run from mixing answers to two prompt variants.
    """
    out = []
    for item in items:
        rec = done.get(item.qid)
        if rec is None or rec.get("skipped") or rec.get("prompt_hash") != prompt_hash(item.prompt_text):
            out.append(item)
    return out
