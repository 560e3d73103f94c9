"""The README's picture of a key-token report: one prompt of a demo run's report page, a few completions, one
token's tooltip shown as hovering it shows it.

    ktr fit --config configs/demo.yaml
    python scripts/report_screenshot.py runs/demo/version_0 --step 90 --out docs/key_tokens_report.png

`--tip ROW:POS` picks the token (the completion's `data-row` and one of the token's `data-pos` in the page);
without it, the token that the most signals selected, first in a completion with a negative advantage (else in
any completion shown). The candidates are printed either way. Needs headless Chromium (`apt-get install chromium`).
"""

from __future__ import annotations

import argparse
import html as html_text
import re
import tempfile
from pathlib import Path

from ktr.report.chromium import render, trim_png
from ktr.report.html import excerpt

_SPAN = re.compile(r'<span class="[^"]*" tabindex="0" role="note" data-pos="([\d ]+)" data-signals="([^"]*)"'
                   r'.*?>(.*?)</span>', re.S)


def candidates(page: str) -> list[tuple[int, int, float, list[str], str]]:
    """(row, position, advantage, signals, text) of every token that two or more signals selected."""
    out = []
    for article in re.findall(r'<article class="completion" data-row="(\d+)">(.*?)</article>', page, re.S):
        row, body = int(article[0]), article[1]
        adv = re.search(r"advantage ([+-]\d+\.\d+)", body)
        for pos, signals, text in _SPAN.findall(body):
            if len(signals.split()) >= 2:
                out.append((row, int(pos.split()[0]), float(adv.group(1)) if adv else 0.0, signals.split(),
                            html_text.unescape(text)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a run's folder (the one holding key_tokens/) or one report page")
    ap.add_argument("--step", type=int, default=90, help="the report of this step (a run folder given)")
    ap.add_argument("--prompt", type=int, default=0, help="which prompt of the page (0-based)")
    ap.add_argument("--completions", type=int, default=4, help="how many of its completions to show")
    ap.add_argument("--tip", default=None, help="ROW:POS of the token whose tooltip is shown")
    ap.add_argument("--width", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=Path("docs/key_tokens_report.png"))
    args = ap.parse_args()

    if args.run.is_file():
        page_path = args.run
    else:
        pages = sorted(args.run.rglob(f"key_tokens/step_{args.step:07d}*.html"))
        if not pages:
            raise SystemExit(f"no report page of step {args.step} under {args.run}/**/key_tokens/")
        page_path = pages[0]
    page = page_path.read_text()
    short = excerpt(page, args.prompt, args.completions)
    found = candidates(short)
    for row, pos, adv, signals, text in found:
        print(f"  row {row} pos {pos}: {text!r} advantage {adv:+.3f} signals {'+'.join(signals)}")
    if args.tip:
        row, pos = map(int, args.tip.split(":"))
    elif found:
        row, pos = min(found, key=lambda c: (c[2] >= 0, -len(c[3])))[:2]  # min: the first of the best
    else:
        raise SystemExit("no token selected by two or more signals in the completions shown; pass --tip ROW:POS")
    with tempfile.TemporaryDirectory(prefix="ktr-shot-") as tmp:
        html = Path(tmp) / "page.html"
        html.write_text(excerpt(page, args.prompt, args.completions, tip=(row, pos)))
        shot = render(html, args.out, width=args.width, height=2000)
    if shot.png is None:
        raise SystemExit(f"Chromium wrote no picture (exit {shot.returncode}):\n{shot.stderr[-2000:]}")
    trim_png(args.out)
    from PIL import Image

    with Image.open(args.out) as img:  # few colours on a page: a 256-colour palette, a third of the size
        small = img.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT)
    small.save(args.out, optimize=True)
    print(f"{page_path} (prompt {args.prompt + 1}, {args.completions} completions, tooltip of row {row} "
          f"position {pos}) -> {args.out}")


if __name__ == "__main__":
    main()
