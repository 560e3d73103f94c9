"""Text after a video resumes one past the video's largest rotary position (Qwen's reference, transformers 4.x,
vLLM), not at transformers 5's `start + max(h, w)`: hand-computed positions, padding, images, the switch back,
and every caller (the scoring passes' `rope_positions`, transformers' `generate`, the KL reference's copy)."""

from __future__ import annotations

import copy

import pytest
import torch

from ktr.config import PolicyConfig
from ktr.model.families import core
from ktr.model.policy import load_policy

VIDEO, IMAGE, START, END = 151656, 151655, 151652, 151653


def _row(media: int, n: int, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[pad x 0] + 2 text + <start> + n media tokens + <end> + 4 text: ids, token types, attention mask `[1, L]`."""
    ids = torch.tensor([0] * pad + [11, 12, START] + [media] * n + [END, 21, 22, 23, 24])[None]
    kinds = ((ids == VIDEO) * 2 + (ids == IMAGE) * 1).int()
    return ids, kinds, (torch.arange(ids.shape[1]) >= pad).long()[None]


@pytest.fixture(scope="module", params=["reference", "transformers"])
def inner(request):
    torch.set_num_threads(1)
    return request.param, core(load_policy(PolicyConfig(rope_after_media=request.param)).model).model


def test_text_after_a_video_resumes_past_its_temporal_extent(inner) -> None:
    """16 frames = 8 temporal groups at the released step (1 s per group, 2 positions per second: t = 0, 2, ..,
    14), a 4 x 6 merged grid, after 3 text tokens: the video spans 3..17 in time, so the reference resumes at 18,
    transformers 5 at 3 + max(4, 6) = 9 (inside the video's temporal span). Left padding changes nothing."""
    rule, m = inner
    want = 18 if rule == "reference" else 9
    for pad in (0, 5):
        ids, kinds, mask = _row(VIDEO, 8 * 4 * 6, pad)
        pos, deltas = m.get_rope_index(ids, mm_token_type_ids=kinds, video_grid_thw=torch.tensor([[8, 8, 12]]),
                                       second_per_grid_ts=torch.tensor([1.0]), attention_mask=mask)
        after = pad + 3 + 8 * 4 * 6  # the <end> token
        assert pos[:, 0, after].tolist() == [want] * 3
        assert pos[:, 0, -1].tolist() == [want + 4] * 3  # the text runs on by one
        assert pos[0, 0, pad + 3:after].max().item() == 17 and pos[:, 0, pad:pad + 3].tolist() == [[0, 1, 2]] * 3
        # the first generated token goes one past the largest position: right after the prompt's last token under
        # the reference rule; under transformers 5's, past the video's span, 5 positions beyond that last token
        assert deltas.item() + ids.shape[1] - pad == (want + 4 + 1 if rule == "reference" else 17 + 1)


def test_images_and_short_videos_are_placed_alike_by_both_rules(inner) -> None:
    """An image (one temporal position) and a video shorter in time than its grid resume at start + max(h, w)."""
    _, m = inner
    ids, kinds, mask = _row(IMAGE, 4 * 6)
    pos, _ = m.get_rope_index(ids, mm_token_type_ids=kinds, image_grid_thw=torch.tensor([[1, 8, 12]]),
                              attention_mask=mask)
    assert pos[:, 0, 3 + 24].tolist() == [3 + 6] * 3
    ids, kinds, mask = _row(VIDEO, 2 * 4 * 6)
    pos, _ = m.get_rope_index(ids, mm_token_type_ids=kinds, video_grid_thw=torch.tensor([[2, 8, 12]]),
                              second_per_grid_ts=torch.tensor([1.0]), attention_mask=mask)
    assert pos[:, 0, 3 + 48].tolist() == [3 + 6] * 3  # t spans 3..5, the grid 3..8


def test_every_caller_and_the_reference_copy_use_the_rule() -> None:
    """The deep copy taken as the KL reference keeps the rule, and a batch's positions from
    `ktr.model.forward.rope_positions` (every scoring pass, the shared backend) are the method's."""
    torch.set_num_threads(1)
    policy = load_policy(PolicyConfig())
    ref = core(copy.deepcopy(policy.model)).model
    ids, kinds, mask = _row(VIDEO, 8 * 4 * 6)
    kw = dict(mm_token_type_ids=kinds, video_grid_thw=torch.tensor([[8, 8, 12]]),
              second_per_grid_ts=torch.tensor([1.0]), attention_mask=mask)
    assert ref.get_rope_index.__self__ is ref
    assert ref.get_rope_index(ids, **kw)[0][:, 0, 3 + 192].tolist() == [18] * 3
