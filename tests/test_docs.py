"""The project documents itself: no reference to documents outside the repository, and every section that code,
configs, tests or docs cite (``docs/method.md section 1.2``, ``docs/benchmarks.md sections 2-6``) exists."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve()
DOCS = {"method": ROOT / "docs" / "method.md", "benchmarks": ROOT / "docs" / "benchmarks.md"}

# The method spec and the benchmark notes that used to live outside the repository (and their folder).
OUTSIDE = re.compile(r"(?i:KTR[_ ]SPEC)|BENCHMARKS\.md|shared/docs/")
# `docs/method.md section 1.2`, ``docs/benchmarks.md`` (sections 1.3 and 2-6), `docs/method.md` section 7, ...
NUMBER = r"\d+(?:\.\d+)*"
CITATION = re.compile(rf"docs/(method|benchmarks)\.md[`'\"]*[\s(]+sections?\s+({NUMBER}(?:\s*(?:-|,|and|or|to)\s*"
                      rf"{NUMBER})*)")
HEADING = re.compile(rf"^#{{2,6}}\s+({NUMBER})\.?\s", re.MULTILINE)
_SKIP_DIRS = {"__pycache__", "runs", "node_modules", "build", "dist"}


def _files() -> list[Path]:
    """Files of the repository: tracked plus untracked-but-not-ignored (git), else a walk that skips dot folders."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, check=True).stdout
        paths = [ROOT / p for p in out.decode().split("\0") if p]
    except (OSError, subprocess.CalledProcessError):  # no git, or not a checkout (e.g. an sdist)
        paths = []
        for folder, dirs, files in os.walk(ROOT):
            dirs[:] = [d for d in dirs if not d.startswith(".") and d not in _SKIP_DIRS and not d.endswith(".egg-info")]
            paths += [Path(folder) / f for f in files]
    return sorted(p for p in paths if p.is_file() and p.resolve() != THIS)


def _texts() -> dict[Path, str]:
    texts = {}
    for path in _files():
        data = path.read_bytes()
        if b"\0" not in data[:8192]:  # text files only
            texts[path] = data.decode("utf-8", errors="replace")
    return texts


def _sections(doc: Path) -> list[str]:
    return HEADING.findall(doc.read_text())


def test_no_reference_to_documents_outside_the_repository() -> None:
    hits = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
            for path, text in _texts().items()
            for n, line in enumerate(text.splitlines(), start=1) if OUTSIDE.search(line)]
    assert not hits, ("cite docs/method.md or docs/benchmarks.md (by section) instead of documents outside the "
                      "repository:\n" + "\n".join(hits))


def test_documents_have_unique_numbered_sections() -> None:
    for name, doc in DOCS.items():
        assert doc.is_file(), f"{doc.relative_to(ROOT)} is missing"
        sections = _sections(doc)
        assert len(sections) >= 5, f"{name}: expected numbered headings such as '## 1. ...', got {sections}"
        repeated = sorted({s for s in sections if sections.count(s) > 1})
        assert not repeated, f"{doc.relative_to(ROOT)}: section numbers used twice: {repeated}"


def test_every_cited_section_exists() -> None:
    known = {name: set(_sections(doc)) for name, doc in DOCS.items()}
    cited, wrong = 0, []
    for path, text in _texts().items():
        for match in CITATION.finditer(text):
            doc, numbers = match.group(1), re.findall(NUMBER, match.group(2))
            cited += len(numbers)
            line = text.count("\n", 0, match.start()) + 1
            wrong += [f"{path.relative_to(ROOT)}:{line}: docs/{doc}.md has no section {n}"
                      for n in numbers if n not in known[doc]]
    assert cited >= 20, f"only {cited} section citations found: has the citation form changed?"
    assert not wrong, "\n".join(wrong)


def test_citation_pattern_reads_the_forms_in_use() -> None:
    forms = {
        "(layer L2, docs/method.md section 1.2)": ("method", ["1.2"]),
        "(layer L2, docs/method.md sections 1-2)": ("method", ["1", "2"]),
        "``docs/benchmarks.md`` (sections 1.3 and 2-6)": ("benchmarks", ["1.3", "2", "6"]),
        "`docs/method.md` section 7.": ("method", ["7"]),
        "docs/method.md\n    section 5.4)": ("method", ["5.4"]),
    }
    for text, (doc, numbers) in forms.items():
        match = CITATION.search(text)
        assert match is not None and match.group(1) == doc, text
        assert re.findall(NUMBER, match.group(2)) == numbers, text
