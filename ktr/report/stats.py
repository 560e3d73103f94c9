"""Token statistics over every report of a run, as the paper's figures show them (layer L2).

From the report JSON files (`ktr.report.record.FORMAT`): the fraction of valid tokens each signal selects,
the seven-region overlap of the three signals (the paper's Venn figure, drawn as a PNG with Pillow), the most
frequent selected words per signal, and word-type (part-of-speech) shares per signal when a tagger is
installed (spaCy with `en_core_web_sm`, or NLTK with its `averaged_perceptron_tagger_eng` data); otherwise
that panel says so. Words are `\\w+` runs of the readable text; a word counts as selected by a signal when
any of its tokens is. Fractions and regions count every valid completion token, as `train/ktr/frac_*` does.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from collections import Counter
from html import escape
from pathlib import Path

from ktr.config import SIGNALS
from ktr.report.html import _TAIL, _head
from ktr.report.record import FORMAT

log = logging.getLogger(__name__)

REGIONS = ("visual", "temporal", "entropy", "visual+temporal", "visual+entropy", "temporal+entropy",
           "visual+temporal+entropy")
_WORD = re.compile(r"\w+")
# Penn Treebank tag prefix -> coarse word type
_COARSE = (("NNP", "proper noun"), ("NN", "noun"), ("VB", "verb"), ("MD", "verb"), ("JJ", "adjective"),
           ("RB", "adverb"), ("PRP", "pronoun"), ("WP", "pronoun"), ("CD", "number"), ("IN", "function word"),
           ("DT", "function word"), ("CC", "function word"), ("TO", "function word"), ("RP", "function word"),
           ("WDT", "function word"), ("WRB", "adverb"), ("EX", "function word"), ("PDT", "function word"))
_SPACY_COARSE = {"NOUN": "noun", "PROPN": "proper noun", "VERB": "verb", "AUX": "verb", "ADJ": "adjective",
                 "ADV": "adverb", "PRON": "pronoun", "NUM": "number", "ADP": "function word", "DET": "function word",
                 "CCONJ": "function word", "SCONJ": "function word", "PART": "function word"}


def find_reports(run_dir: str | Path) -> tuple[list[dict], list[str]]:
    """Every report JSON under `run_dir` (sorted by path), and the files that could not be read (path: reason)."""
    reports, bad = [], []
    for path in sorted(Path(run_dir).rglob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            bad.append(f"{path}: {type(err).__name__}: {err}")
            continue
        if isinstance(data, dict) and data.get("format") == FORMAT:
            reports.append(data)
    return reports, bad


def completion_words(completion: dict) -> list[tuple[str, set[str]]]:
    """(word, signals selecting any of its tokens, plus "key" when one of them is key) per word of the text."""
    by_pos = {t["pos"]: t for t in completion["tokens"]}
    spans, text = [], ""
    for piece in completion["pieces"]:
        toks = [by_pos[p] for p in piece["positions"]]
        sig = set().union(*(t["signals"] for t in toks)) | ({"key"} if any(t["key"] for t in toks) else set())
        spans.append((len(text), len(text) + len(piece["text"]), sig))
        text += piece["text"]
    out = []
    for m in _WORD.finditer(text):
        sig = set().union(*(s for a, b, s in spans if a < m.end() and b > m.start()))
        out.append((m.group(0), sig))
    return out


def _tagger():
    """A function words -> coarse word types, and a description; (None, reason) when no tagger is installed."""
    try:
        import spacy

        nlp = spacy.load("en_core_web_sm")
        from spacy.tokens import Doc

        def tag_spacy(words: list[str]) -> list[str]:
            doc = nlp(Doc(nlp.vocab, words=words))
            return [_SPACY_COARSE.get(t.pos_, "other") for t in doc]

        return tag_spacy, "spaCy en_core_web_sm"
    except (ImportError, OSError):
        pass
    try:
        import nltk

        nltk.pos_tag(["test"])
    except ImportError:
        return None, "no part-of-speech tagger installed (pip install spacy + en_core_web_sm, or nltk + its data)"
    except LookupError:
        return None, ("NLTK is installed but its tagger data is not: python -m nltk.downloader "
                      "averaged_perceptron_tagger_eng (or install spaCy with en_core_web_sm)")

    def tag_nltk(words: list[str]) -> list[str]:
        return [next((c for p, c in _COARSE if tag.startswith(p)), "other") for _, tag in nltk.pos_tag(words)]

    return tag_nltk, "NLTK averaged perceptron"


def token_statistics(reports: list[dict], top_k: int = 15) -> dict:
    """Fractions, Venn regions, top words and word-type shares over all completions of `reports`."""
    valid, per_signal, regions = 0, Counter(), Counter()
    words: dict[str, Counter] = {s: Counter() for s in (*SIGNALS, "key")}
    all_words: list[list[tuple[str, set[str]]]] = []
    n_completions, key = 0, 0
    for rep in reports:
        for p in rep["prompts"]:
            for c in p["completions"]:
                n_completions += 1
                for t in c["tokens"]:
                    valid += 1
                    key += t["key"]
                    sig = set(t["signals"])
                    per_signal.update(sig)
                    regions["+".join(s for s in SIGNALS if s in sig) or "none"] += 1
                cw = completion_words(c)
                all_words.append(cw)
                for w, sig in cw:
                    for s in sig:
                        words[s][w.lower()] += 1
    n = max(1, valid)
    out = {"reports": len(reports), "completions": n_completions, "valid_tokens": valid,
           "fraction": {s: per_signal[s] / n for s in SIGNALS} | {"key": key / n},
           "regions": {r: regions[r] for r in (*REGIONS, "none")},
           "top_words": {s: words[s].most_common(top_k) for s in words}}
    out["pos"] = word_type_shares(all_words)
    return out


def word_type_shares(all_words: list[list[tuple[str, set[str]]]], tagger=None) -> dict:
    """Share of each coarse word type among the words each signal selects (and among all words).

    `tagger`: (function words -> word types, its name); default: the installed one (spaCy, NLTK) or none.
    """
    tag, source = tagger or _tagger()
    if tag is None:
        return {"available": False, "reason": source}
    counts: dict[str, Counter] = {s: Counter() for s in ("all", *SIGNALS)}
    for cw in all_words:
        if not cw:
            continue
        for (_, sig), kind in zip(cw, tag([w for w, _ in cw]), strict=True):
            counts["all"][kind] += 1
            for s in sig & set(SIGNALS):
                counts[s][kind] += 1
    shares = {s: {k: v / max(1, sum(c.values())) for k, v in c.most_common()} for s, c in counts.items()}
    return {"available": True, "tagger": source, "shares": shares}


def venn_png(regions: dict[str, int], path: str | Path, size: tuple[int, int] = (640, 560)) -> Path:
    """The seven-region overlap of the three signals as a Venn picture (counts and % of selected tokens)."""
    from PIL import Image, ImageDraw, ImageFont

    w, h = size
    colours = {"visual": (0, 114, 178), "temporal": (213, 94, 0), "entropy": (0, 158, 115)}
    r, cx, cy = 150, w // 2, 250
    centres = {"visual": (cx - 90, cy - 50), "entropy": (cx + 90, cy - 50), "temporal": (cx, cy + 106)}
    img = Image.new("RGBA", size, (255, 255, 255, 255))
    for s, (x, y) in centres.items():
        layer = Image.new("RGBA", size, (0, 0, 0, 0))
        ImageDraw.Draw(layer).ellipse((x - r, y - r, x + r, y + r), fill=(*colours[s], 60),
                                      outline=(*colours[s], 255), width=4)
        img = Image.alpha_composite(img, layer)
    draw = ImageDraw.Draw(img)
    try:
        font, small = ImageFont.load_default(size=18), ImageFont.load_default(size=15)
    except TypeError:  # Pillow without FreeType: the bitmap font
        font = small = ImageFont.load_default()
    total = max(1, sum(regions.get(k, 0) for k in REGIONS))
    spots = {"visual": (cx - 150, cy - 90), "entropy": (cx + 150, cy - 90), "temporal": (cx, cy + 190),
             "visual+entropy": (cx, cy - 110), "visual+temporal": (cx - 85, cy + 55),
             "temporal+entropy": (cx + 85, cy + 55), "visual+temporal+entropy": (cx, cy + 5)}
    for k, (x, y) in spots.items():
        n = regions.get(k, 0)
        draw.text((x, y), f"{n}\n{n / total:.0%}", fill=(0, 0, 0), font=font, anchor="mm", align="center")
    names = {"visual": (cx - 200, cy - 215), "entropy": (cx + 200, cy - 215), "temporal": (cx, cy + 275)}
    for s, (x, y) in names.items():
        draw.text((x, y), s, fill=colours[s], font=font, anchor="mm")
    draw.text((10, h - 24), f"selected tokens: {total}; selected by none: {regions.get('none', 0)}",
              fill=(40, 40, 40), font=small)
    path = Path(path)
    img.convert("RGB").save(path, optimize=True)
    return path


def render_stats_page(stats: dict, venn: Path, bad: list[str]) -> str:
    """The statistics as one self-contained HTML page (the Venn PNG inline)."""
    uri = "data:image/png;base64," + base64.b64encode(Path(venn).read_bytes()).decode("ascii")
    rows = "".join(f"<tr><td>{s}</td><td>{f:.3f}</td></tr>" for s, f in stats["fraction"].items())
    body = [(f"<h1>Token statistics</h1><p class=\"meta\">{stats['reports']} report(s), {stats['completions']} "
             f"completion(s), {stats['valid_tokens']} valid tokens</p>"),
            (f"<h2>Selected fraction per signal</h2><table><tr><th>signal</th><th>fraction of valid tokens</th></tr>"
             f"{rows}</table>"),
            (f'<h2>Overlap of the signals</h2><img src="{uri}" alt="Venn diagram of selected tokens: '
             + escape(", ".join(f"{k} {v}" for k, v in stats["regions"].items())) + '">'),
            "<h2>Most frequent selected words</h2>"]
    for s, top in stats["top_words"].items():
        cells = ", ".join(f"{escape(w)} ({c})" for w, c in top) or "none"
        body.append(f"<p><strong>{s}</strong>: {cells}</p>")
    pos = stats["pos"]
    body.append("<h2>Word types per signal</h2>")
    if not pos["available"]:
        body.append(f'<p class="note">Not available: {escape(pos["reason"])}.</p>')
    else:
        kinds = sorted({k for sh in pos["shares"].values() for k in sh})
        head = "".join(f"<th>{escape(k)}</th>" for k in kinds)
        trs = "".join(f"<tr><td>{s}</td>" + "".join(f"<td>{sh.get(k, 0):.2f}</td>" for k in kinds) + "</tr>"
                      for s, sh in pos["shares"].items())
        body.append(f"<p class=\"note\">Tagger: {escape(pos['tagger'])}</p><table><tr><th>words</th>{head}</tr>"
                    f"{trs}</table>")
    if bad:
        body.append("<h2>Unreadable files (skipped)</h2><ul>" + "".join(f"<li>{escape(b)}</li>" for b in bad) +
                    "</ul>")
    return _head("Token statistics") + "\n".join(body) + _TAIL


def write_statistics(run_dir: str | Path, out_dir: str | Path | None = None, top_k: int = 15) -> dict:
    """Statistics of every report under `run_dir` -> `stats.json`, `venn.png`, `stats.html` in `out_dir`."""
    reports, bad = find_reports(run_dir)
    for b in bad:
        log.warning("skipped unreadable report file %s", b)
    if not reports:
        raise FileNotFoundError(f"no key-token report (JSON with format {FORMAT!r}) under {run_dir}")
    out = Path(out_dir) if out_dir is not None else Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats = token_statistics(reports, top_k) | {"skipped_files": bad}
    (out / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    venn = venn_png(stats["regions"], out / "venn.png")
    (out / "stats.html").write_text(render_stats_page(stats, venn, bad), encoding="utf-8")
    return stats
