"""Key-token reports: readable pieces, HTML spans equal to the masks, self-contained pages, statistics."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import pytest
import torch

from ktr.config import SIGNALS, KeyTokenConfig
from ktr.probes.keytokens import KeyTokens, select_key_tokens
from ktr.report.html import excerpt, markdown_summary, render_figure, render_index, render_page
from ktr.report.record import StepRecord, report_data, thumbnails
from ktr.report.stats import REGIONS, completion_words, token_statistics, venn_png, write_statistics
from ktr.report.tokens import readable_pieces
from ktr.report.write import write_index, write_report
from ktr.types import Media, PromptBatch, Rollout


@pytest.fixture(scope="module")
def tok():
    from ktr.model.tokenizer import build_qwen2_tokenizer

    return build_qwen2_tokenizer()


# Texts whose characters the Qwen tokenizer splits across tokens: 𝔘 (3 tokens), ñ after a space (2 tokens),
# a zero-width joiner sequence; plus CJK and an emoji that are whole tokens.
TEXTS = ["<think>𝔘nicode ñ 中文</think>", "<answer>B</answer> 🤷🏽‍♀️ done", "plain words only", "x\n\ny"]


def test_pieces_decode_to_the_text_and_group_split_characters(tok) -> None:
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        pieces = readable_pieces(tok, ids)
        assert "".join(p.text for p in pieces) == text
        assert [q for p in pieces for q in p.positions] == list(range(len(ids)))  # every token once, in order
        assert "\ufffd" not in "".join(p.text for p in pieces)
    ids = tok(" 𝔘", add_special_tokens=False)["input_ids"]
    assert len(ids) == 3 and [p.positions for p in readable_pieces(tok, ids)] == [(0, 1, 2)]


def test_special_tokens_are_hidden_and_stray_bytes_shown_as_replacement(tok) -> None:
    end = tok.convert_tokens_to_ids("<|im_end|>")
    ids = tok("ok", add_special_tokens=False)["input_ids"] + [end]
    pieces = readable_pieces(tok, ids)
    assert "".join(p.text for p in pieces) == "ok" and all(len(ids) - 1 not in p.positions for p in pieces)
    lead = tok(" 𝔘", add_special_tokens=False)["input_ids"][0]  # ' \xf0\x9d': a character's first bytes only
    a = tok("a", add_special_tokens=False)["input_ids"]
    pieces = readable_pieces(tok, [lead] + a)
    assert [p.text for p in pieces] == [" \ufffd", "a"]  # as tok.decode shows it
    assert tok.decode([lead] + a) == " \ufffda"


def _record(tok, texts: list[str], masks: dict[str, torch.Tensor] | None = None, group_size: int = 2,
            seed: int = 0) -> StepRecord:
    """A record of len(texts) completions (one <|im_end|> each) of len(texts)/G prompts; masks by selection
    of random scores unless given."""
    end = tok.convert_tokens_to_ids("<|im_end|>")
    seqs = [tok(t, add_special_tokens=False)["input_ids"] + [end] for t in texts]
    n, t = len(seqs), max(len(s) for s in seqs) + 2
    ids = torch.full((n, t), tok.pad_token_id)
    valid = torch.zeros((n, t), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], valid[i, : len(s)] = torch.tensor(s), True
    g = torch.Generator().manual_seed(seed)
    scores = {s: torch.randn(n, t, generator=g).masked_fill(~valid, 0.0) for s in SIGNALS}
    b = n // group_size
    video = torch.ones(n, dtype=torch.bool)
    key = select_key_tokens(scores, valid, video, KeyTokenConfig(), group_size)
    if masks is not None:  # hand-set masks (thresholds kept from the selection: only shown in tips)
        key = KeyTokens(mask=torch.stack(list(masks.values())).any(0) & valid, masks=masks, scores=scores,
                        thresholds=key.thresholds)
    frames = torch.randint(0, 255, (4, 3, 28, 28), dtype=torch.uint8, generator=g)
    prompts = PromptBatch(rows=[{"problem": f"Q{i}?", "problem_type": "multiple choice", "options": ["A. x", "B. y"],
                                 "solution": "<answer>B</answer>", "problem_id": f"p{i}"} for i in range(b)],
                          input_ids=torch.zeros(b, 1, dtype=torch.long), attention_mask=torch.ones(b, 1),
                          mm_token_type_ids=torch.zeros(b, 1, dtype=torch.int),
                          media=[Media("video", frames, 2.0, "clip.mp4") for _ in range(b)],
                          pixel_values=torch.zeros(0, 1), grid_thw=torch.ones(b, 3, dtype=torch.long),
                          second_per_grid_ts=torch.ones(b))
    rollout = Rollout(group_size, ids, valid.long(), torch.zeros_like(ids, dtype=torch.int), ids, valid, texts)
    rewards = torch.arange(n, dtype=torch.float32)
    return StepRecord(step=7, prompts=prompts, rollout=rollout, key=key, rewards=rewards,
                      per_reward={"accuracy": rewards}, advantages=rewards - rewards.mean())


class _Spans(HTMLParser):
    """Token spans per completion article: (classes, positions, text)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.rows: dict[int, list] = {}
        self.row: int | None = None
        self.span: list | None = None
        self.notes: dict[int, list[str]] = {}
        self.in_note = False
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs) -> None:
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "article":
            self.row = int(a["data-row"])
            self.rows[self.row], self.notes[self.row] = [], []
        elif tag == "span" and "tok" in a.get("class", "").split() and self.row is not None:
            assert self.span is None, "token spans never nest"
            self.span = [set(a["class"].split()), [int(p) for p in a["data-pos"].split()], "", a]
        elif tag == "p" and a.get("class") == "note" and self.row is not None:
            self.in_note = True

    def handle_endtag(self, tag) -> None:
        if tag == "span" and self.span is not None:
            self.rows[self.row].append(self.span)
            self.span = None
        elif tag == "article":
            self.row = None
        elif tag == "p":
            self.in_note = False

    def handle_data(self, data) -> None:
        if self.span is not None:
            self.span[2] += data
        elif self.in_note:
            self.notes[self.row].append(data)


def _parse(html: str) -> _Spans:
    p = _Spans()
    p.feed(html)
    p.close()
    return p


def _check_spans_equal_masks(tok, record: StepRecord, html: str) -> _Spans:
    parsed = _parse(html)
    ro, key = record.rollout, record.key
    specials = set(tok.all_special_ids)
    for i in range(ro.completion_ids.shape[0]):
        spans = parsed.rows[i]
        ids = ro.completion_ids[i]
        shown = [t for t in range(ids.shape[0]) if ro.completion_mask[i, t] and int(ids[t]) not in specials]
        assert [p for _, pos, _, _ in spans for p in pos] == shown  # token boundaries: every shown token once
        assert "".join(text for _, _, text, _ in spans) == tok.decode(ids[ro.completion_mask[i]],
                                                                      skip_special_tokens=True)
        for classes, pos, text, attrs in spans:
            want = {f"s-{s}" for s in SIGNALS if any(bool(key.masks[s][i, p]) for p in pos)}
            assert {c for c in classes if c.startswith("s-")} == want, (i, pos, text)
            assert ("key" in classes) == any(bool(key.mask[i, p]) for p in pos)
            assert attrs["tabindex"] == "0" and attrs["data-tip"]  # keyboard focus shows the tip
            for s in SIGNALS:
                assert f"threshold {float(key.thresholds[s][i]):.4g}" in attrs["data-tip"]
                for p in pos:  # each token's raw score, compared with its pool's threshold
                    v, thr = float(key.scores[s][i, p]), float(key.thresholds[s][i])
                    line = f"{s:<8} {v:.4g} {'>=' if v >= thr else '<'} threshold {thr:.4g}"
                    assert line in attrs["data-tip"], (line, attrs["data-tip"])
    return parsed


def test_highlighted_spans_equal_the_selected_masks(tok) -> None:
    record = _record(tok, [TEXTS[0], TEXTS[1], TEXTS[2], TEXTS[3]])
    data = report_data(record, tok, KeyTokenConfig())
    html = render_page(data, [thumbnails(m) for m in record.prompts.media])
    parsed = _check_spans_equal_masks(tok, record, html)
    assert "<|im_end|>" not in "".join(t for r in parsed.rows.values() for _, _, t, _ in r)
    multi = [pos for r in parsed.rows.values() for _, pos, text, _ in r if text == "𝔘"]
    assert multi == [[3, 4]]  # 𝔘 is split over tokens 3 and 4: one span covers both


def test_no_key_token_and_all_three_overlapping(tok) -> None:
    texts = ["no key here", "all three here"]
    n = len(texts)
    record = _record(tok, texts, group_size=1)
    t = record.rollout.completion_ids.shape[1]
    masks = {s: torch.zeros(n, t, dtype=torch.bool) for s in SIGNALS}
    for s in SIGNALS:
        masks[s][1, 1] = True  # ' three' selected by every signal
    masks["visual"][1, 0] = True
    masks["entropy"][1, 3] = True  # the <|im_end|> (hidden) selected by entropy
    record = _record(tok, texts, masks=masks, group_size=1)
    html = render_page(report_data(record, tok, KeyTokenConfig()))
    parsed = _check_spans_equal_masks(tok, record, html)
    assert not any(c for classes, *_ in parsed.rows[0] for c in classes if c == "key" or c.startswith("s-"))
    assert any("No key token" in n for n in parsed.notes[0])
    assert not any("<|im_end|>" in n for n in parsed.notes[0])  # an unselected special token is not mentioned
    overlap = [(c, text) for c, _, text, _ in parsed.rows[1] if {"s-visual", "s-temporal", "s-entropy"} <= c]
    assert [text for _, text in overlap] == [" three"]
    assert any("<|im_end|>" in n and "entropy" in n for n in parsed.notes[1])  # hidden, but said


def test_excerpt_keeps_one_prompt_its_first_completions_and_shows_one_tooltip(tok) -> None:
    record = _record(tok, TEXTS[:4] + TEXTS[:2], group_size=3)  # 2 prompts of 3 completions
    page = render_page(report_data(record, tok, KeyTokenConfig()), [thumbnails(m) for m in record.prompts.media])
    short = excerpt(page, prompt=1, completions=2, tip=(4, 1))
    assert short.count('<section class="prompt"') == 1 and 'aria-label="Prompt 2"' in short
    assert [int(r) for r in re.findall(r'class="completion" data-row="(\d+)"', short)] == [3, 4]
    assert short.count("<img ") == page.count("<img ") // 2 and "Legend" in short
    shown = re.findall(r'<span class="([^"]*\bshown\b[^"]*)"[^>]*data-pos="([\d ]+)"', short)
    assert len(shown) == 1 and "1" in shown[0][1].split()
    assert ".tok.shown::after{" in short and short.endswith("</html>\n")
    assert _parse(short).rows.keys() == {3, 4}  # still a well-formed page
    assert "shown" not in excerpt(page, prompt=1, completions=2)
    with pytest.raises(ValueError, match="row 0"):
        excerpt(page, prompt=1, completions=2, tip=(0, 1))  # row 0 is prompt 1's
    with pytest.raises(ValueError, match="2 prompt"):
        excerpt(page, prompt=2)


def test_pages_are_self_contained(tok, tmp_path) -> None:
    record = _record(tok, TEXTS[:2])
    data = report_data(record, tok, KeyTokenConfig())
    page = write_report(data, [thumbnails(m) for m in record.prompts.media], tmp_path, "step_0000007")
    index = write_index(tmp_path)
    for html in (page.read_text(), index.read_text(), render_figure(data)):
        parsed = _parse(html)
        urls = [a.get(k) for tag, a in parsed.tags for k in ("src", "href") if a.get(k)]
        assert all(u.startswith("data:image/png;base64,") or not (":" in u or u.startswith("//")) for u in urls), urls
        assert not any(tag in ("script", "link", "iframe", "object") for tag, _ in parsed.tags)
        csp = [a for tag, a in parsed.tags if tag == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
        assert csp and csp[0]["content"].startswith("default-src 'none'")
    imgs = [a for tag, a in _parse(page.read_text()).tags if tag == "img"]
    assert len(imgs) == 4 and all(a["alt"] for a in imgs)  # the frame strip, described
    assert json.loads((tmp_path / "step_0000007.json").read_text()) == json.loads(json.dumps(data))
    assert 'href="step_0000007.html"' in index.read_text()


def test_markdown_summary_bolds_key_pieces(tok) -> None:
    n = 2
    record = _record(tok, ["alpha beta gamma", "x"], group_size=1)
    t = record.rollout.completion_ids.shape[1]
    masks = {s: torch.zeros(n, t, dtype=torch.bool) for s in SIGNALS}
    masks["visual"][0, 1] = masks["visual"][0, 2] = True  # ' beta', ' gamma'
    record = _record(tok, ["alpha beta gamma", "x"], masks=masks, group_size=1)
    text = markdown_summary(report_data(record, tok))
    assert "alpha **beta gamma**" in text and "key 2/4" in text


def _report(signal_sets: list[list[str]], words: list[str]) -> dict:
    """A minimal report JSON: one completion whose tokens are `words` with the given signals."""
    tokens = [{"pos": i, "id": i, "special": False, "key": bool(s), "signals": s, "scores": {}}
              for i, s in enumerate(signal_sets)]
    pieces = [{"text": w, "positions": [i]} for i, w in enumerate(words)]
    comp = {"row": 0, "tokens": tokens, "pieces": pieces}
    return {"format": "ktr.key_tokens/1", "kind": "train", "step": 0, "signals": list(SIGNALS),
            "prompts": [{"completions": [comp]}]}


def test_statistics_count_the_seven_regions(tmp_path) -> None:
    v, t, e = "visual", "temporal", "entropy"
    sets = [[v], [v], [t], [e], [v, t], [v, e], [t, e], [v, t, e], [], []]
    words = ["Red", " red", " first", " then", " blue", " sq", "uare", " moves", " left", "."]
    rep = _report(sets, words)
    stats = token_statistics([rep, rep])
    assert stats["valid_tokens"] == 20
    assert stats["regions"] == {"visual": 4, "temporal": 2, "entropy": 2, "visual+temporal": 2,
                                "visual+entropy": 2, "temporal+entropy": 2, "visual+temporal+entropy": 2, "none": 4}
    assert stats["fraction"]["visual"] == pytest.approx(10 / 20) and stats["fraction"]["key"] == pytest.approx(16 / 20)
    assert dict(stats["top_words"]["visual"])["red"] == 4  # 'Red' and ' red', twice each, lower-cased
    assert dict(stats["top_words"]["temporal"])["square"] == 2  # 'sq' + 'uare' is one word, selected via 'uare'
    assert ("square", {v, t, e, "key"}) in completion_words(rep["prompts"][0]["completions"][0])
    assert dict(stats["top_words"]["key"]).get("left") is None  # ' left' has no signal and is not key
    pos = stats["pos"]
    assert pos["available"] or "install" in pos["reason"] or "downloader" in pos["reason"]
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "r.json").write_text(json.dumps(rep))
    (tmp_path / "a" / "broken.json").write_text("{not json")
    out = write_statistics(tmp_path, tmp_path / "out")
    assert out["reports"] == 1 and len(out["skipped_files"]) == 1 and "broken.json" in out["skipped_files"][0]
    html = (tmp_path / "out" / "stats.html").read_text()
    assert "Word types per signal" in html and "broken.json" in html
    from PIL import Image

    img = Image.open(tmp_path / "out" / "venn.png")
    assert img.size == (640, 560) and len(set(img.convert("RGB").getdata())) > 10  # drawn, not blank
    with pytest.raises(FileNotFoundError, match="no key-token report"):
        write_statistics(tmp_path / "out")


def test_venn_regions_are_all_drawn(tmp_path) -> None:
    # Each region's count appears in a different place: a region with a count changes the picture there.
    base = venn_png({r: 0 for r in REGIONS}, tmp_path / "zero.png")
    from PIL import Image, ImageChops

    zero = Image.open(base).convert("RGB")
    boxes = []
    for r in REGIONS:
        other = Image.open(venn_png({q: (777 if q == r else 0) for q in REGIONS}, tmp_path / f"{r}.png"))
        boxes.append(ImageChops.difference(zero, other.convert("RGB")).getbbox())
    assert all(boxes) and len(set(boxes)) == 7


def test_index_lists_steps_in_order(tmp_path) -> None:
    html = render_index([{"href": "b.html", "step": 20, "kind": "train", "reward": 0.5, "key_fraction": 0.3,
                          "fractions": {"visual": 0.2}}])
    assert 'href="b.html"' in html and "0.300" in html


def test_vanilla_grpo_step_shows_every_token_trained(tok) -> None:
    record = _record(tok, ["a b", "c"], group_size=1)
    valid = record.rollout.completion_mask
    record.key = KeyTokens(mask=valid.clone(), masks={}, scores={})  # what `attribute` returns when disabled
    data = report_data(record, tok, KeyTokenConfig(enabled=False))
    html = render_page(data)
    assert data["signals"] == [] and "Key-token masking is off" in html
    spans = [s for r in _parse(html).rows.values() for s in r]
    assert spans and all("key" in c and not any(x.startswith("s-") for x in c) for c, *_ in spans)


def test_word_type_shares_per_signal() -> None:
    from ktr.report.stats import word_type_shares

    kinds = {"red": "adjective", "square": "noun", "moves": "verb"}
    words = [[("red", {"visual", "key"}), ("square", {"visual", "temporal", "key"}), ("moves", set())]]
    out = word_type_shares(words, (lambda ws: [kinds[w] for w in ws], "lookup"))
    assert out["available"] and out["tagger"] == "lookup"
    assert out["shares"]["visual"] == {"adjective": 0.5, "noun": 0.5}
    assert out["shares"]["temporal"] == {"noun": 1.0} and out["shares"]["entropy"] == {}
    assert out["shares"]["all"] == pytest.approx({"adjective": 1 / 3, "noun": 1 / 3, "verb": 1 / 3})


# ---------------------------------------------------------------------------------- explain's noise floor (issue 29)
FIFTEEN = "The red square moves to the left and then the blue one follows it"  # 14 tokens + <|im_end|>


def _explain_record(tok, scores_of, texts=(FIFTEEN,)):
    """An explain-style record (one prompt, G = len(texts)) whose signals' scores are `scores_of(name, valid)`,
    selected by the training rule, with explain's noise floor applied."""
    from dataclasses import replace

    from ktr.report.attribution import apply_noise_floor

    record = _record(tok, list(texts), group_size=len(texts))
    valid = record.rollout.completion_mask
    scores = {s: scores_of(s, valid).masked_fill(~valid, 0.0) for s in SIGNALS}
    key = select_key_tokens(scores, valid, torch.ones(valid.shape[0], dtype=torch.bool), KeyTokenConfig(),
                            len(texts))
    return apply_noise_floor(replace(record, key=key), KeyTokenConfig())


def test_explain_marks_nothing_when_every_score_is_tiny(tok) -> None:
    """One completion of 15 tokens, scores ~1e-5: the training rule still selects its top 20% (3 tokens per
    signal); explain marks none of them, and says why in each tooltip."""
    g = torch.Generator().manual_seed(0)
    record = _explain_record(tok, lambda s, v: 1e-5 * torch.rand(v.shape, generator=g))
    valid = record.rollout.completion_mask
    assert int(valid.sum()) == 15
    assert all(int(record.key.masks[s].sum()) == 3 for s in SIGNALS)  # training's rule, unchanged
    assert not record.floor.mask.any() and not any(m.any() for m in record.floor.masks.values())
    data = report_data(record, tok, KeyTokenConfig(), kind="explain")
    comp = data["prompts"][0]["completions"][0]
    assert comp["num_key"] == int(record.key.mask.sum()) > 0 and comp["num_marked"] == 0
    assert all(not t["signals"] and not t["marked"] for t in comp["tokens"])
    assert sum(bool(t["rule_signals"]) for t in comp["tokens"]) >= 3
    html = render_page(data)
    spans = [sp for r in _parse(html).rows.values() for sp in r]
    assert not any(c == "key" or c.startswith("s-") for classes, *_ in spans for c in classes)
    assert "below the noise floor: not marked" in html and "No token clears the noise floor" in html


def test_explain_never_marks_a_negative_score_as_a_dependence(tok) -> None:
    """Shuffling the frames raised every token's probability (temporal scores all negative): the rule's top 20%
    are negative, and explain marks none of them as temporal."""
    def scores(name, valid):
        n, t = valid.shape
        return -torch.linspace(3.0, 0.1, n * t).reshape(n, t) if name == "temporal" else torch.zeros(n, t)

    record = _explain_record(tok, scores)
    assert int(record.key.masks["temporal"].sum()) == 3  # training would still take them
    assert not record.floor.masks["temporal"].any()
    data = report_data(record, tok, KeyTokenConfig(), kind="explain")
    assert not any("temporal" in t["signals"] for t in data["prompts"][0]["completions"][0]["tokens"])
    assert "not positive: not a dependence" in render_page(data)


def test_explain_marks_the_scores_that_stand_clear_of_the_noise() -> None:
    from ktr.report.floor import noise_floor, pool_floors

    g = torch.Generator().manual_seed(1)
    n, t = 1, 80
    valid = torch.ones(n, t, dtype=torch.bool)
    noise = 0.02 * torch.linspace(-1, 1, t)[torch.randperm(t, generator=g)].reshape(n, t)  # the bulk: +-0.02 nats
    noise[0, [5, 40, 70]] = torch.tensor([1.5, 0.9, 2.0])  # three tokens that do depend on the video
    floor, count = pool_floors(noise, valid, 1)
    assert int(count) == 80 and 0.02 < float(floor) < 0.1  # median + 3 x 1.4826 x MAD: above the whole bulk
    rule = select_key_tokens({"visual": noise}, valid, torch.ones(n, dtype=torch.bool), KeyTokenConfig(), 1)
    assert int(rule.masks["visual"].sum()) == 16  # top 20% of 80
    marked = noise_floor(rule.masks, {"visual": noise}, valid, torch.ones(n, dtype=torch.bool), KeyTokenConfig(), 1)
    assert marked.masks["visual"][0].nonzero().flatten().tolist() == [5, 40, 70]
    assert marked.mask.equal(marked.masks["visual"])


def test_explain_page_names_its_checkpoint_and_warns_on_few_tokens(tok) -> None:
    g = torch.Generator().manual_seed(2)
    record = _explain_record(tok, lambda s, v: torch.randn(v.shape, generator=g))
    data = report_data(record, tok, KeyTokenConfig(), kind="explain")
    data["step"], data["checkpoint"] = None, "runs/demo/version_0/checkpoints/last.ckpt"
    assert data["noise_floor"]["smallest_pool"] == {"visual": 15, "temporal": 15, "entropy": 15}
    html = render_page(data)
    assert "step None" not in html and "explain page · checkpoint: runs/demo/version_0/checkpoints/last.ckpt" in html
    assert "these statistics rest on too few tokens" in html and "visual 15" in html
    assert "noise floor: max(0.01, median + 3 x 1.4826 x MAD" in html  # the legend says how marks are chosen
    long = _explain_record(tok, lambda s, v: torch.randn(v.shape, generator=g), texts=[FIFTEEN] * 4)
    data = report_data(long, tok, KeyTokenConfig(), kind="explain")  # a pool of 4 x 15 = 60 tokens
    assert data["noise_floor"]["smallest_pool"]["visual"] == 60
    assert "too few tokens" not in render_page(data)
    train = report_data(_record(tok, TEXTS[:2]), tok, KeyTokenConfig())  # training pages are unchanged
    assert "noise_floor" not in train and "num_marked" not in train["prompts"][0]["completions"][0]
