"""A report page in headless Chromium: it renders, logs nothing to the console and requests nothing.

Method: Chromium's console messages go to stderr (`--enable-logging=stderr`; Content-Security-Policy refusals
are console messages too) and every URL request to a NetLog (`--log-net-log`); requests keyed to the page's
site are the page's. Two control pages show that the check fails when it should: a remote image without the
CSP shows up as a request, the same image under the page's CSP as a console message.
"""

from __future__ import annotations

import pytest

from ktr.report.chromium import find_chromium, render

pytestmark = pytest.mark.skipif(find_chromium() is None, reason="Chromium is not installed (apt-get install "
                                "chromium; .ci/run installs it): the headless-browser check of report pages is skipped")


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    from ktr.config import KeyTokenConfig
    from ktr.model.tokenizer import build_qwen2_tokenizer
    from ktr.report.record import report_data, thumbnails
    from ktr.report.write import write_report
    from tests.test_report import TEXTS, _record

    tok = build_qwen2_tokenizer()
    record = _record(tok, TEXTS)
    data = report_data(record, tok, KeyTokenConfig())
    return write_report(data, [thumbnails(m) for m in record.prompts.media], tmp_path_factory.mktemp("r"), "step")


def test_report_renders_without_console_messages_or_requests(page, tmp_path) -> None:
    from PIL import Image

    shot = render(page, tmp_path / "shot.png", width=1000, height=900)
    assert shot.png is not None, shot.stderr[-2000:]
    assert shot.console == [], shot.console
    assert shot.requests == [], shot.requests
    img = Image.open(shot.png).convert("RGB")
    assert img.size == (1000, 900)
    colours = set(img.getdata())
    assert (0, 114, 178) in colours or len(colours) > 50  # drawn (signal colours, text), not a blank page


def test_the_check_catches_a_remote_resource(page, tmp_path) -> None:
    html = page.read_text()
    remote = '<img src="http://203.0.113.7/pixel.png" alt="remote">'
    no_csp = html.replace('<meta http-equiv="Content-Security-Policy"', '<meta name="x"').replace("</main>",
                                                                                                 remote + "</main>")
    (tmp_path / "no_csp.html").write_text(no_csp)
    got = render(tmp_path / "no_csp.html", None)
    assert got.requests == ["http://203.0.113.7/pixel.png"]
    (tmp_path / "csp.html").write_text(html.replace("</main>", remote + "</main>"))
    got = render(tmp_path / "csp.html", None)
    assert got.requests == [] and any("203.0.113.7" in m and "Content Security Policy" in m for m in got.console)
