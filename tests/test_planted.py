"""Planted ground truth for probe accuracy (ktr.data.planted) and the `third` synthetic kind."""

from __future__ import annotations

import pytest

from ktr.data.planted import all_clips, planted_target, token_labels
from ktr.data.synthetic import COLOURS, SyntheticSpec, make_item


def _words(text: str) -> list[int]:
    """A word-level 'tokenizer' whose ids are readable: each word (punctuation split off) hashed to an id."""
    return [hash(w) for w in text.replace(",", " ,").replace(".", " .").replace(">", "> ").split()]


def _named(colours, tokenize, text_tokens):
    labels = token_labels(colours, tokenize)
    return list(zip(text_tokens, labels["content"], labels["order"]))


def test_planted_target_lists_sorted_then_frame_order_and_answers_third() -> None:
    target = planted_target(("red", "blue", "green"))
    assert target == "<think>colours: blue, green, red. order: red, blue, green.</think><answer>B</answer>"
    assert list(COLOURS).index("green") == 1  # B is green among the options
    with pytest.raises(ValueError, match="distinct"):
        planted_target(("red", "red", "blue"))


def test_word_labels_content_only_order_and_neither() -> None:
    colours = ("red", "blue", "green")
    words = planted_target(colours).replace(",", " ,").replace(".", " .").replace(">", "> ").split()
    got = {(i, w): (c, o) for i, (w, c, o) in enumerate(_named(colours, _words, words))}
    by_word = [(w, c, o) for (i, w), (c, o) in sorted(got.items())]
    colour_rows = [r for r in by_word if r[0] in COLOURS]
    # alphabetical list: blue, green, red -> video content only (the set is unknown from the prompt)
    assert colour_rows[:3] == [("blue", True, False), ("green", True, False), ("red", True, False)]
    # frame-order list: red, blue are order-dependent; green is fixed by the set and the first two
    assert colour_rows[3:] == [("red", True, True), ("blue", True, True), ("green", False, False)]
    others = [r for r in by_word if r[0] not in COLOURS]
    assert all(not c and not o for _, c, o in others)  # template words and the answer letter: neither


def test_determined_colour_in_sorted_list_is_not_content() -> None:
    # blue, red -> the third in alphabetical order can only be yellow (green would sort before red)
    labels = token_labels(("yellow", "red", "blue"), _words)
    words = planted_target(("yellow", "red", "blue")).replace(",", " ,").replace(".", " .").replace(">", "> ").split()
    colour_flags = [(w, c) for w, c in zip(words, labels["content"]) if w in COLOURS]
    assert colour_flags[:3] == [("blue", True), ("red", True), ("yellow", False)]


def test_order_implies_content_and_lengths_with_end_token() -> None:
    for clip in all_clips()[:6]:
        labels = token_labels(clip, _words, end_ids=[-1])
        assert len(labels["content"]) == len(_words(planted_target(clip))) + 1
        assert labels["content"][-1] is False and labels["order"][-1] is False
        assert all(c or not o for c, o in zip(labels["content"], labels["order"]))


def test_labels_with_the_qwen_tokenizer(tiny_policy) -> None:
    tok = tiny_policy.processor.tokenizer
    clip = ("red", "blue", "green")
    ids = tok(planted_target(clip), add_special_tokens=False)["input_ids"]
    labels = token_labels(clip, lambda t: tok(t, add_special_tokens=False)["input_ids"])
    content = [tok.decode([i]).strip() for i, c in zip(ids, labels["content"]) if c]
    order = [tok.decode([i]).strip() for i, o in zip(ids, labels["order"]) if o]
    assert content == ["blue", "green", "red", "red", "blue"]
    assert order == ["red", "blue"]


def test_third_kind_renders_colours_in_frame_order_and_keeps_other_kinds() -> None:
    spec = SyntheticSpec(kinds=("third",), num_frames=6)
    row, frames = make_item(0, 3, spec)
    shown = row["colours"]
    assert len(set(shown)) == 3 and row["problem"] == "Which colour appears third?"
    assert row["solution"] == f"<answer>{'ABCD'[list(COLOURS).index(shown[2])]}</answer>"
    for block, name in enumerate(shown):  # frames 2k, 2k+1 show colour k (corner pixel, away from the dark square)
        corner = {tuple(frames[f, :, y, x].tolist()) for f in (2 * block, 2 * block + 1) for y, x in
                  [(0, 0), (0, 55), (55, 0), (55, 55)]}
        assert tuple(COLOURS[name]) in corner
    # the demo's kinds draw exactly as before: the new kind is only chosen when listed
    order_row, _ = make_item(0, 3, SyntheticSpec(kinds=("order",)), render=False)
    assert "colours" not in order_row and order_row["problem"] == "Which colour appears first?"
