"""Self-contained HTML pages of key-token reports (layer L2, stdlib only).

Every page is one file: CSS inline, frame thumbnails as `data:` URIs, no script, no font or image from
anywhere else; a Content-Security-Policy meta tag (`default-src 'none'`) makes the browser refuse, and
report, any request a future edit might add. Each signal has its own line style, so overlaps combine
visibly and the page reads without colour: visual = solid underline, temporal = dashed overline, entropy =
hatched background; key tokens (those that get gradient) are bold; a token of only whitespace shows a
marker (a middle dot, or a return arrow for a line break) drawn by CSS, so the page's text stays the answer's
text. Every token is focusable (Tab): hover or
focus shows its raw scores and its pool's thresholds. Special tokens are hidden (listed under the answer
when they were selected). An explain page (a report with a `noise_floor`, `ktr.report.floor`) marks only
tokens that clear the noise floor, says so in its legend, shows the floor in every tooltip, and warns when
its pools hold too few tokens for steady statistics.
"""

from __future__ import annotations

import re
from html import escape

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

SIGNAL_STYLE = {
    "visual": ("solid underline", "depends on the video (hiding it lowers the token's log-probability)"),
    "temporal": ("dashed overline", "depends on frame order (shuffling the frames lowers it)"),
    "entropy": ("hatched background", "the policy was uncertain here (high entropy)"),
}

CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;color:#111;
  background:#fff}
main{max-width:1100px;margin:0 auto;padding:16px 20px}
h1{font-size:1.35em;margin:.2em 0}h2{font-size:1.15em;margin:1.2em 0 .3em}h3{font-size:1em;margin:.2em 0}
.meta,.stats{color:#333;font-size:.92em}
.legend{border:1px solid #bbb;border-radius:6px;padding:8px 12px;margin:10px 0}
.legend ul{margin:.2em 0;padding-left:1.2em;line-height:2.2}
.frames{display:flex;flex-wrap:wrap;gap:4px;margin:6px 0}
.frames figure{margin:0;text-align:center;font-size:.75em;color:#333}
.frames img{display:block;image-rendering:pixelated;border:1px solid #999}
.question{white-space:pre-wrap;background:#f4f4f4;padding:6px 10px;border-radius:4px}
.completion{border-top:1px solid #ddd;padding:6px 0}
.answer{white-space:pre-wrap;line-height:2.3;font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:.95em}
.tok{position:relative;padding:1px 0;border-top:3px solid transparent;border-bottom:3px solid transparent}
.tok:focus{outline:2px solid #000;outline-offset:1px}
.s-visual{border-bottom:3px solid #0072B2}
.s-temporal{border-top:3px dashed #D55E00}
.s-entropy{background-image:repeating-linear-gradient(135deg,rgba(0,158,115,.55) 0 2px,transparent 2px 5px)}
.key{font-weight:700}
.ws::before{content:"\00B7";color:#777}.ws-nl::before{content:"\21B5";color:#777}
.tok:hover::after,.tok:focus::after{content:attr(data-tip);position:absolute;left:0;top:2.1em;z-index:10;
  white-space:pre;background:#222;color:#fff;font:12px/1.4 ui-monospace,"DejaVu Sans Mono",monospace;
  font-weight:400;padding:5px 7px;border-radius:4px;pointer-events:none}
.note{color:#555;font-style:italic;font-size:.9em}
table{border-collapse:collapse;font-size:.92em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}
"""


def _head(title: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n")


_TAIL = "</main>\n</body>\n</html>\n"


def _fmt(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{x:+.3f}" if signed else f"{x:.3f}"


def fmt_score(x: float | None) -> str:
    """A raw score or threshold: 4 significant digits (visual scores of a tiny model are ~1e-3)."""
    return "n/a" if x is None else f"{x:.4g}"


def legend(signals: list[str], config: dict | None, floor: dict | None = None) -> str:
    """The legend: one sample per signal, one of all three overlapping, and how to read scores (and, on an
    explain page, the noise floor that marks must clear)."""
    ratios = (config or {}).get("ratios", {})
    items = []
    for s in signals:
        style, meaning = SIGNAL_STYLE[s]
        ratio = f" (top {ratios[s]:.0%} of its pool" + (", above the noise floor)" if floor else ")") \
            if s in ratios else (" (above the noise floor)" if floor else "")
        items.append(f'<li><span class="tok key s-{s}">{s}</span>: {style}; {escape(meaning)}{escape(ratio)}</li>')
    if len(signals) > 1:
        all_cls = " ".join(f"s-{s}" for s in signals)
        items.append(f'<li><span class="tok key {all_cls}">overlap</span>: the styles combine '
                     f'(a token selected by several signals shows each one)</li>')
    if floor:
        items.append('<li><span class="tok key">bold</span>: marked by the signals combined (above the noise '
                     'floor); the tooltip also says whether training would give it gradient</li>')
    else:
        items.append('<li><span class="tok key">bold</span>: key token (receives policy gradient); plain: no '
                     'gradient</li>')
    scope = (config or {}).get("scope")
    pool = f" Thresholds are per {escape(scope)} pool." if scope else ""
    rule = f"<p class=\"note\">{escape(floor_rule(floor))}</p>" if floor else ""
    return ('<section class="legend" aria-label="Legend"><strong>Legend</strong><ul>' + "".join(items) +
            f"</ul><p class=\"note\">Hover a token, or focus it with Tab, to see its raw scores and the "
            f"thresholds.{pool} Special tokens are hidden.</p>{rule}</section>\n")


def floor_rule(floor: dict) -> str:
    """How an explain page chose its marks, in words (`ktr.report.floor`)."""
    return (f"A token is marked for a signal only when the training rule selects it (the top ratio of its pool), "
            f"its score is positive (a perturbation that raised the token's probability is not a dependence), "
            f"and the score clears the pool's noise floor: max({floor['min_score']:g}, median + "
            f"{floor['mads']:g} x 1.4826 x MAD of the pool's scores), i.e. more than {floor['mads']:g} robust "
            f"standard deviations above the pool's typical token. Training itself keeps its rule (top ratio).")


def few_tokens_note(floor: dict) -> str | None:
    """The warning of a page whose pools hold fewer than `min_pool_tokens` tokens (None when they do not)."""
    few = {s: n for s, n in (floor.get("smallest_pool") or {}).items() if n < floor["min_pool_tokens"]}
    if not few:
        return None
    sizes = ", ".join(f"{s} {n}" for s, n in few.items())
    return (f"Few tokens: these statistics rest on too few tokens (smallest pool per signal: {sizes}; steady "
            f"from about {floor['min_pool_tokens']}). The top-ratio threshold and the noise floor are rough "
            f"here: read the marks as a hint, or sample more answers (--samples 8 --temperature 1.0) or a longer "
            f"one for a steadier page.")


def _tip(tokens: list[dict], thresholds: dict, n_tokens: int, floors: dict | None = None) -> str:
    lines = []
    for tok in tokens:
        if n_tokens > 1:
            lines.append(f"token at position {tok['pos']} (one of {n_tokens} forming this text)")
        for s, v in tok["scores"].items():
            thr = thresholds.get(s)
            if thr is None:
                lines.append(f"{s:<8} {fmt_score(v)}  (no pool: not selectable)")
                continue
            rel = ">=" if v is not None and v >= thr else "<"
            if floors is None:
                mark = "  selected" if s in tok["signals"] else ""
                lines.append(f"{s:<8} {fmt_score(v)} {rel} threshold {fmt_score(thr)}{mark}")
                continue
            floor = floors.get(s)
            above = v is not None and floor is not None and v >= floor
            if s in tok["signals"]:
                mark = "marked"
            elif s in tok.get("rule_signals", []):
                mark = "top ratio, but not positive: not a dependence" if v is not None and v <= 0 and s != \
                    "entropy" else "top ratio, but below the noise floor: not marked"
            else:
                mark = "not marked"
            lines.append(f"{s:<8} {fmt_score(v)} {rel} threshold {fmt_score(thr)}, {'>=' if above else '<'} "
                         f"noise floor {fmt_score(floor)}: {mark}")
        if floors is None:
            lines.append("key token: gets gradient" if tok["key"] else "not key: no gradient")
        else:
            lines.append(("marked" if tok.get("marked") else "not marked") + "; training would "
                         + ("give it gradient (key token)" if tok["key"] else "not give it gradient"))
    return "\n".join(lines)


def answer_spans(completion: dict) -> str:
    """The completion's readable pieces as focusable spans carrying their signals (special tokens hidden)."""
    by_pos = {t["pos"]: t for t in completion["tokens"]}
    out = []
    for piece in completion["pieces"]:
        toks = [by_pos[p] for p in piece["positions"]]
        signals = [s for s in SIGNAL_STYLE if any(s in t["signals"] for t in toks)]
        key = any(t.get("marked", t["key"]) for t in toks)  # explain pages: bold = marked
        ws = [] if piece["text"].strip() else ["ws-nl" if "\n" in piece["text"] else "ws"]  # shown by a marker
        cls = " ".join(["tok"] + ws + (["key"] if key else []) + [f"s-{s}" for s in signals])
        tip = _tip(toks, completion["thresholds"], len(toks), completion.get("floors"))
        label = f"{piece['text'].strip() or 'space'}: " + (", ".join(signals) if signals else "no signal")
        out.append(f'<span class="{cls}" tabindex="0" role="note" data-pos="{" ".join(map(str, piece["positions"]))}" '
                   f'data-signals="{" ".join(signals)}" data-tip="{escape(tip)}" aria-label="{escape(label)}">'
                   f"{escape(piece['text'])}</span>")
    return "".join(out)


def _completion(c: dict, rank: int) -> str:
    reward = _fmt(c["reward"])
    parts = ", ".join(f"{k} {_fmt(v)}" for k, v in c["rewards"].items())
    stats = (f"reward {reward}" + (f" ({parts})" if parts else "") + f" · advantage {_fmt(c['advantage'], True)}"
             f" · key tokens {c['num_key']}/{c['num_valid']} ({c['key_fraction']:.0%})")
    if "num_marked" in c:  # explain page
        stats += f" · marked (above the noise floor) {c['num_marked']}/{c['num_valid']}"
    hidden = [t for t in c["tokens"] if t["special"] and (t["key"] or t["signals"])]  # selected, yet not shown
    notes = []
    if c.get("num_marked") == 0:
        notes.append("No token clears the noise floor: no score of this answer stands out from the rest of its "
                     "pool (the tooltips show each score against the floor), so nothing is marked.")
    elif c["num_key"] == 0:
        notes.append("No key token: this completion receives no policy gradient.")
    for t in hidden:
        sel = ", ".join(t["signals"]) if t["signals"] else "none"
        notes.append(f"Hidden special token {t.get('token', t['id'])} at position {t['pos']}: "
                     f"{'key' if t['key'] else 'not key'} (selected by: {sel}).")
    note = "".join(f'<p class="note">{escape(n)}</p>' for n in notes)
    return (f'<article class="completion" data-row="{c["row"]}"><h3>Completion {rank + 1}</h3>'
            f'<p class="stats">{escape(stats)}</p><p class="answer">{answer_spans(c)}</p>{note}</article>\n')


def _frames(thumbs: list[str], media: dict) -> str:
    if not thumbs:
        return ""
    n = len(thumbs)
    figs = "".join(f'<figure><img src="{u}" alt="frame {i + 1} of {n}"><figcaption>{i + 1}</figcaption></figure>'
                   for i, u in enumerate(thumbs))
    what = f"{media['kind']}, {media['frames']} frame(s) sampled" + (
        f" at {media['sample_fps']:.2f} fps" if media.get("sample_fps") else "")
    return f'<div class="frames" role="group" aria-label="{escape(what)}">{figs}</div>\n'


def render_page(data: dict, thumbs: list[list[str]] | None = None) -> str:
    """One report page from :func:`ktr.report.record.report_data`'s dictionary and per-prompt thumbnails."""
    head = _head(data["title"])
    cfg = data.get("config") or {}
    floor = data.get("noise_floor")
    meta = f"{_when(data)} · {data['group_size']} completion(s) per prompt"
    if cfg:
        meta += f" · pool: {cfg['scope']} · combine: {cfg['combine']}"
    body = [f"<h1>{escape(data['title'])}</h1>\n<p class=\"meta\">{escape(meta)}</p>\n"]
    few = few_tokens_note(floor) if floor else None
    if few:
        body.append(f'<p class="note" role="alert">{escape(few)}</p>\n')
    if data["signals"]:
        body.append(legend(data["signals"], cfg, floor))
    else:
        body.append('<p class="note">Key-token masking is off (vanilla GRPO): every valid token gets gradient; '
                    "no signal was computed.</p>\n")
    for k, p in enumerate(data["prompts"]):
        body.append(f'<section class="prompt" aria-label="Prompt {k + 1}"><h2>Prompt {k + 1}'
                    f"{' · ' + escape(str(p['problem_id'])) if p.get('problem_id') else ''}</h2>\n")
        body.append(_frames((thumbs or [])[k] if thumbs and k < len(thumbs) else [], p["media"]))
        body.append(f'<p class="question">{escape(p["question"])}</p>\n')
        if p.get("solution"):
            body.append(f'<p class="meta">Reference: {escape(str(p["solution"]))}</p>\n')
        body.extend(_completion(c, r) for r, c in enumerate(p["completions"]))
        body.append("</section>\n")
    return head + "".join(body) + _TAIL


def _when(data: dict) -> str:
    """`<kind> · step N` of a training report; a page without a step (`ktr explain`) names what it explains."""
    if data.get("step") is not None:
        return f"{data['kind']} · step {data['step']}"
    source = data.get("checkpoint")
    return f"{data['kind']} page" + (f" · checkpoint: {source}" if source else "")


_HOVER_TIP = ".tok:hover::after,.tok:focus::after{"


def excerpt(page: str, prompt: int = 0, completions: int = 4, tip: tuple[int, int] | None = None) -> str:
    """A shorter copy of a report page, for a picture of it: the header and legend, prompt `prompt` (0-based) with
    its first `completions` completions; `tip` = (row, position) also shows that token's tooltip as hovering it
    does (the row is the completion's `data-row`, the position one of the token's `data-pos`)."""
    sections = re.findall(r'<section class="prompt".*?</section>\n', page, re.S)
    if not 0 <= prompt < len(sections):
        raise ValueError(f"the page has {len(sections)} prompt(s); prompt {prompt} asked for")
    section = sections[prompt]
    articles = re.findall(r'<article class="completion".*?</article>\n', section, re.S)[:completions]
    if tip is not None:
        row, pos = tip
        found = [i for i, a in enumerate(articles) if f'data-row="{row}"' in a]
        span = re.compile(r'<span class="([^"]*)"(?= tabindex="0" role="note" data-pos="(?:\d+ )*' + str(pos) +
                          r'(?: \d+)*")')
        if not found or not span.search(articles[found[0]]):
            raise ValueError(f"no token at row {row}, position {pos} among the completions kept")
        articles[found[0]] = span.sub(lambda m: f'<span class="{m.group(1)} shown"', articles[found[0]], count=1)
        if _HOVER_TIP not in page:
            raise ValueError("the page's style has no tooltip rule: not a ktr report page")
        page = page.replace(_HOVER_TIP, _HOVER_TIP[:-1] + ",.tok.shown::after{", 1)
    head = page[:page.index('<section class="prompt"')]
    return head + section[:section.index("<article")] + "".join(articles) + "</section>\n" + _TAIL


def render_index(entries: list[dict], title: str = "Key-token reports", extra: str = "") -> str:
    """Index of every report: `entries` of {href, step, kind, key_fraction, reward, fractions: {signal: f}}."""
    signals = [s for s in SIGNAL_STYLE if any(s in e.get("fractions", {}) for e in entries)]
    head_cells = "".join(f"<th>{s}</th>" for s in signals)
    rows = []
    for e in entries:
        cells = "".join(f"<td>{_fmt(e['fractions'].get(s))}</td>" for s in signals)
        when = f"step {e['step']}" if e.get("step") is not None else "explain page"
        rows.append(f'<tr><td><a href="{escape(e["href"])}">{when} ({escape(e["kind"])})</a></td>'
                    f"<td>{_fmt(e.get('reward'))}</td><td>{_fmt(e.get('key_fraction'))}</td>{cells}</tr>")
    table = ("<table><thead><tr><th>report</th><th>mean reward</th><th>key fraction</th>" + head_cells +
             "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>\n")
    note = '<p class="note">Fractions are of the valid tokens of the completions shown in each report.</p>\n'
    return _head(title) + f"<h1>{escape(title)}</h1>\n" + extra + (table if entries else
                                                                   "<p>No report yet.</p>\n") + note + _TAIL


def markdown_summary(data: dict, max_completions: int = 4) -> str:
    """A compact text version for TensorBoard's text tab: key pieces in bold, one line per completion."""

    def md(text: str) -> str:
        text = escape(text.replace("\n", " "), quote=False)
        for ch in "\\`*_[]#|":
            text = text.replace(ch, "\\" + ch)
        return text

    def bold(text: str) -> str:  # whitespace stays outside the markers, or markdown shows them literally
        core = text.strip()
        if not core:
            return md(text)
        lead, trail = text[: len(text) - len(text.lstrip())], text[len(text.rstrip()):]
        return f"{md(lead)}**{md(core)}**{md(trail)}"

    lines = [f"**{md(data['title'])}** (signals: {', '.join(data['signals']) or 'none'})", ""]
    for k, p in enumerate(data["prompts"]):
        lines.append(f"*Prompt {k + 1}*: {md(p['question'].splitlines()[0] if p['question'] else '')}")
        lines.append("")
        for c in p["completions"][:max_completions]:
            by_pos = {t["pos"]: t for t in c["tokens"]}
            runs: list[list] = []  # [is_key, text]: consecutive key pieces share one pair of markers
            for pc in c["pieces"]:
                is_key = any(by_pos[q]["key"] for q in pc["positions"])
                if runs and runs[-1][0] == is_key:
                    runs[-1][1] += pc["text"]
                else:
                    runs.append([is_key, pc["text"]])
            text = "".join(bold(t) if k else md(t) for k, t in runs)
            lines.append(f"- reward {_fmt(c['reward'])}, advantage {_fmt(c['advantage'], True)}, "
                         f"key {c['num_key']}/{c['num_valid']}: {text}")
        lines.append("")
    return "\n".join(lines)


def render_figure(data: dict) -> str:
    """A compact page for papers and slides: the legend and the highlighted answers only (no frames, no tips)."""
    body = [f"<h1>{escape(data['title'])}</h1>\n"]
    if data["signals"]:
        body.append(legend(data["signals"], data.get("config"), data.get("noise_floor")))
    for p in data["prompts"]:
        body.append(f'<p class="question">{escape(p["question"])}</p>\n')
        body.extend(f'<p class="answer">{answer_spans(c)}</p>\n' for c in p["completions"])
    return _head(data["title"]) + "".join(body) + _TAIL
