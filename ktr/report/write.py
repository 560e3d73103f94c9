"""Write report pages, their JSON and the index of a report folder (layer L2)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ktr.config import SIGNALS
from ktr.report.html import render_index, render_page
from ktr.report.record import FORMAT


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_report(data: dict, thumbs: list[list[str]] | None, out_dir: str | Path, stem: str) -> Path:
    """`<stem>.html` (self-contained page) and `<stem>.json` (its data) in `out_dir`; returns the page path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / f"{stem}.json", json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n")
    page = out / f"{stem}.html"
    _atomic_write(page, render_page(data, thumbs))
    return page


def summary(data: dict) -> dict:
    """Mean reward, key fraction and per-signal fractions over the valid tokens of one report's completions."""
    comps = [c for p in data["prompts"] for c in p["completions"]]
    tokens = [t for c in comps for t in c["tokens"]]
    n = max(1, len(tokens))
    rewards = [c["reward"] for c in comps if c["reward"] is not None]
    return {"step": data["step"], "kind": data["kind"],
            "reward": sum(rewards) / len(rewards) if rewards else None,
            "key_fraction": sum(t["key"] for t in tokens) / n,
            "fractions": {s: sum(s in t["signals"] for t in tokens) / n for s in data["signals"] if s in SIGNALS}}


def write_index(out_dir: str | Path) -> Path:
    """`index.html` linking every report page of `out_dir` (found by their JSON), oldest step first."""
    out = Path(out_dir)
    entries = []
    for path in sorted(out.glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue  # a file being replaced by another process; the next index write lists it
        if isinstance(data, dict) and data.get("format") == FORMAT and path.with_suffix(".html").is_file():
            entries.append(summary(data) | {"href": path.with_suffix(".html").name})
    entries.sort(key=lambda e: (e["step"] if e["step"] is not None else -1, e["href"]))
    stats = (out / "stats.html").is_file()
    extra = '<p><a href="stats.html">Token statistics of these reports</a></p>\n' if stats else ""
    index = out / "index.html"
    _atomic_write(index, render_index(entries, extra=extra))
    return index
