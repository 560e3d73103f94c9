"""The visual probe removes the media it hides from the rows (`key_tokens.visual_hidden: drop`, every family and
layout) instead of masking it (`mask`, the released pass): on attention-only decoders the two are equal to
rounding and select the same key tokens; on Qwen3.5's DeltaNet layers only removal is the clean counterfactual."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from ktr.model.forward import SequenceView, completion_hidden, completion_logps, encode_media
from ktr.model.prefix import drop_hidden
from ktr.probes.visual import get_visual_perturbation, visual_scores
from tests.helpers import rollout_for


@pytest.fixture(scope="module")
def tiny_qwen35():
    from ktr.config import PolicyConfig
    from ktr.model.policy import load_policy

    torch.set_num_threads(1)
    return load_policy(PolicyConfig(name_or_path="tiny-qwen35", attn_implementation="eager"))


@pytest.fixture(params=["tiny", "tiny-qwen3vl", "tiny-qwen35"])
def every_family(request):
    name = {"tiny": "tiny_policy", "tiny-qwen3vl": "tiny_qwen3vl", "tiny-qwen35": "tiny_qwen35"}[request.param]
    return request.getfixturevalue(name)


def _logps(model, view, feats, rollout):
    hidden = completion_hidden(model, view, feats, rollout.completion_ids.shape[1])
    return completion_logps(model, hidden, rollout.completion_ids, rollout.completion_mask, chunk_size=5)[0]


def _text_alone(model, view, rollout):
    """The oracle: each row's visible prompt tokens and its completion, run alone as a text-only sequence through
    the transformers model's own forward (its own 1D positions, no media, no padding): the model as if the media
    had never been in the prompt."""
    p, t = rollout.prompt_length, rollout.completion_ids.shape[1]
    rows = []
    for i in range(view.input_ids.shape[0]):
        ids = torch.cat([view.input_ids[i, :p][view.attention_mask[i, :p].bool()], rollout.completion_ids[i]])
        logits = model(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None]).logits[0].float()
        logps = logits[-t - 1:-1].log_softmax(-1).gather(-1, rollout.completion_ids[i, :, None])[:, 0]
        rows.append(logps.where(rollout.completion_mask[i], torch.zeros(())))
    return torch.stack(rows)


@torch.no_grad()
def test_removal_is_the_text_only_counterfactual_on_every_family(every_family) -> None:
    """The `attention_mask` probe's pass with the media removed equals the model run on the text alone (1e-5), in
    the naive layout (batched, left-padded) and the default one; masking equals it on the attention-only
    families and is measurably not it on Qwen3.5, where masked tokens still decay the DeltaNet state."""
    policy = every_family
    model = policy.model
    batch, rollout = rollout_for(policy, n_prompts=2, group_size=2, max_new_tokens=6, image_every=2)
    feats = encode_media(model, batch.pixel_values, batch.grid_thw)
    view, _ = get_visual_perturbation("attention_mask")(SequenceView.of(model, rollout, batch), model, batch, None, 0)
    oracle = _text_alone(model, view, rollout)
    naive = replace(view, shared_prefix=False)
    assert drop_hidden(naive.input_ids, naive.attention_mask, naive.mm_token_type_ids, naive.position_ids, None,
                       rollout.completion_ids.shape[1]) is not None
    dropped = _logps(model, naive, feats, rollout)
    torch.testing.assert_close(dropped, oracle, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_logps(model, view, feats, rollout), oracle, rtol=1e-5, atol=1e-5)
    masked = _logps(model, replace(naive, drop_hidden=False), feats, rollout)
    gap = (masked - oracle).abs().max().item()
    if model.config.model_type == "qwen3_5":
        assert gap > 1e-4, gap  # masking is not removal on a hybrid decoder
    else:
        assert gap < 1e-5, gap


@torch.no_grad()
def test_probe_scores_drop_equal_mask_on_attention_only_families(tiny_any) -> None:
    """`visual_scores` with `hidden="drop"` (naive and packed) equals the released masked pass."""
    model = tiny_any.model
    batch, rollout = rollout_for(tiny_any, n_prompts=2, group_size=3, max_new_tokens=6, image_every=2)
    feats = encode_media(model, batch.pixel_values, batch.grid_thw)
    view = SequenceView.of(model, rollout, batch)
    ids, valid = rollout.completion_ids, rollout.completion_mask
    base = _logps(model, view, feats, rollout)
    released = visual_scores(model, batch, view, feats, ids, valid, base, hidden="mask")
    assert released.abs().max() > 0
    for v in (view, replace(view, shared_prefix=False)):
        for pert in ("attention_mask", "attention_mask_block"):
            ref = visual_scores(model, batch, v, feats, ids, valid, base, pert, hidden="mask")
            got = visual_scores(model, batch, v, feats, ids, valid, base, pert, hidden="drop")
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5, msg=pert)
    with pytest.raises(ValueError, match="drop' or 'mask"):
        visual_scores(model, batch, view, feats, ids, valid, base, hidden="remove")


@torch.no_grad()
def test_every_draw_runs_the_layout_asked_for(every_family) -> None:
    """`draws` > 1 with `hidden="mask"`: every draw masks (the second draw once ran the drop layout, which on
    Qwen3.5 scores differently), so two draws of the deterministic perturbation equal one."""
    model = every_family.model
    batch, rollout = rollout_for(every_family, n_prompts=2, group_size=2, max_new_tokens=6)
    feats = encode_media(model, batch.pixel_values, batch.grid_thw)
    view = SequenceView.of(model, rollout, batch)
    args = (model, batch, view, feats, rollout.completion_ids, rollout.completion_mask, _logps(model, view, feats,
                                                                                              rollout))
    for hidden in ("mask", "drop"):
        one = visual_scores(*args, hidden=hidden)
        torch.testing.assert_close(visual_scores(*args, hidden=hidden, draws=2), one, rtol=1e-6, atol=1e-7)


def test_partial_hiding_and_padding_only_are_left_to_the_mask() -> None:
    """Nothing to remove (left padding only), a row hiding part of its media, or a hidden last prompt token: None
    (the pass masks); otherwise kept tokens keep their ids, positions and order, right-aligned."""
    ids = torch.tensor([[0, 5, 9, 9, 6, 7, 8], [4, 5, 9, 9, 6, 7, 8]])  # prompt 5 tokens + completion 2
    mm = (ids == 9).long()
    pos = torch.arange(7).expand(3, 2, 7) * 10
    pad_only = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0]])
    assert drop_hidden(ids, pad_only, mm, pos, None, 2) is None
    partial = torch.tensor([[0, 1, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    assert drop_hidden(ids, partial, mm, pos, None, 2) is None
    last_hidden = torch.tensor([[0, 1, 0, 0, 0, 1, 1], [1, 1, 0, 0, 1, 1, 1]])
    assert drop_hidden(ids, last_hidden, mm, pos, None, 2) is None
    media = torch.tensor([[0, 1, 0, 0, 1, 1, 0], [1, 1, 0, 0, 1, 1, 1]])
    out_ids, out_mask, out_mm, out_pos, _ = drop_hidden(ids, media, mm, pos, None, 2)
    assert out_ids.tolist() == [[0, 5, 6, 7, 8], [4, 5, 6, 7, 8]]
    assert out_mask.tolist() == [[0, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert not out_mm.any()
    assert out_pos[0].tolist() == [[0, 10, 40, 50, 60], [0, 10, 40, 50, 60]]


@pytest.mark.slow
def test_key_tokens_equal_under_drop_and_mask_on_shared_starts() -> None:
    """Completions that begin alike tie at their common start: removing the media must select exactly the tokens
    masking selects (rounding noise must not decide selection), naive layout."""
    from tests.test_prefix import _key_and_grads, _module, _shared_start_rollout

    module = _module()
    batch, rollout = _shared_start_rollout(module)
    keys = {}
    for hidden in ("mask", "drop"):
        module.key_cfg = replace(module.key_cfg, visual_hidden=hidden)
        keys[hidden], _ = _key_and_grads(module, batch, rollout, shared=False, tie=True)
    assert keys["drop"].masks.keys() == keys["mask"].masks.keys() and "visual" in keys["drop"].masks
    for name in keys["mask"].masks:
        assert torch.equal(keys["drop"].masks[name], keys["mask"].masks[name]), name
    assert torch.equal(keys["drop"].mask, keys["mask"].mask)
