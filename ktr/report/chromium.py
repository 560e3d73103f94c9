"""Render a report page with headless Chromium: a PNG screenshot, the page's console messages and every
network request the page made (layer L2, stdlib + Pillow).

Chromium runs with `--headless --no-sandbox --disable-gpu` and a fresh profile, `--enable-logging=stderr`
(console messages appear on stderr as `CONSOLE` lines, Content-Security-Policy refusals included) and
`--log-net-log` (a JSON log of every URL request). A request counts as the page's when its network isolation
key names the page's site (`file://`); the browser's own background traffic (update checks, sign-in) is
keyed otherwise and ignored. Host names resolve to nothing (`--host-resolver-rules`), so nothing leaves the
machine even if a page asked.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
         "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-default-apps",
         "--host-resolver-rules=MAP * ~NOTFOUND", "--enable-logging=stderr", "--v=0")
_CONSOLE = re.compile(r":CONSOLE[:(]\d*\)?\]\s*(.*)")


class ChromiumMissing(RuntimeError):
    """No Chromium executable on PATH (or at $KTR_CHROMIUM)."""


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome executable: $KTR_CHROMIUM if set, else the first of CANDIDATES on PATH."""
    env = os.environ.get("KTR_CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageRender:
    """What loading one page produced."""

    png: Path | None
    console: list[str] = field(default_factory=list)  # console messages (errors, CSP refusals, logs)
    requests: list[str] = field(default_factory=list)  # URLs the page requested (not file: or data:)
    returncode: int = 0
    stderr: str = ""


def page_requests(netlog: dict) -> list[str]:
    """URLs of the requests a `file://` page made, from a Chromium NetLog (browser background traffic excluded)."""
    types = {v: k for k, v in netlog.get("constants", {}).get("logEventTypes", {}).items()}
    out = []
    for ev in netlog.get("events", []):
        if types.get(ev.get("type")) != "URL_REQUEST_START_JOB":
            continue
        p = ev.get("params") or {}
        url = str(p.get("url", ""))
        if "file://" in str(p.get("network_isolation_key", "")) and not url.startswith(("file:", "data:")):
            out.append(url)
    return out


def _read_netlog(path: Path) -> dict:
    text = path.read_text() if path.is_file() else ""
    if not text.strip():
        return {}
    try:
        return json.loads(text)
    except json.JSONDecodeError:  # the browser was killed before closing the log: close the events list
        return json.loads(text.rstrip().rstrip(",") + "]}")


def render(html: str | Path, png: str | Path | None, width: int = 1100, height: int = 1400,
           timeout: float = 90.0, executable: str | None = None) -> PageRender:
    """Load `html` (a file) in headless Chromium; screenshot to `png` when given. Raises ChromiumMissing."""
    exe = executable or find_chromium()
    if exe is None:
        raise ChromiumMissing("Chromium is not installed (looked for " + ", ".join(CANDIDATES) + " on PATH and "
                              "$KTR_CHROMIUM); on Debian/Ubuntu: apt-get install chromium")
    url = Path(html).resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="ktr-chromium-") as tmp:
        netlog = Path(tmp) / "netlog.json"
        cmd = [exe, *FLAGS, f"--user-data-dir={tmp}/profile", f"--log-net-log={netlog}",
               f"--window-size={width},{height}"]
        if png is not None:
            cmd.append(f"--screenshot={Path(png).resolve()}")
        else:
            cmd.append("--dump-dom")
        proc = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=timeout,
                              check=False)  # the caller reads the return code and stderr
        console = [m.group(1) for line in proc.stderr.splitlines() if (m := _CONSOLE.search(line))]
        requests = page_requests(_read_netlog(netlog))
    shot = Path(png) if png is not None and Path(png).is_file() else None
    return PageRender(shot, console, requests, proc.returncode, proc.stderr)


def trim_png(path: str | Path, margin: int = 12) -> None:
    """Crop a screenshot to its content (plus `margin` pixels) against the page's white background."""
    from PIL import Image, ImageChops

    img = Image.open(path).convert("RGB")
    bbox = ImageChops.difference(img, Image.new("RGB", img.size, (255, 255, 255))).getbbox()
    if bbox is None:
        return
    left, top, right, bottom = bbox
    img.crop((max(0, left - margin), max(0, top - margin), min(img.width, right + margin),
              min(img.height, bottom + margin))).save(path, optimize=True)
