"""Where text resumes after media in Qwen2-VL / Qwen2.5-VL's 3D rotary positions (layer L2).

Qwen's reference code, transformers 4.x (which the released Video-KTR run and the Video-R1 SFT checkpoint it
starts from used) and vLLM start every segment of a prompt, text or media, one past the largest position so far:
after a video of `T` temporal groups spaced `interval` apart that is `start + max((T-1) * interval, h-1, w-1) + 1`.
transformers 5.3 and later continue at `start + max(h, w)` (merged grid), leaving out the video's temporal extent:
on a 16-frame video at the released temporal step the question and every completion token sit 1 to 4 positions
lower on 4:3 and square frames, and about 24 lower at the sampled step (`video.rope_time: sampled`). ktr takes
transformers' positions and moves each segment after a media block up to the reference's start, so that every
pass, the `shared` backend and transformers' own `generate` (which calls the same method) place them as the
reference does. Images (one temporal group) come out the same under both rules.
"""

from __future__ import annotations

import inspect
import types

import torch
from torch import Tensor, nn


def restart_after_media(positions: Tensor, mm_token_type_ids: Tensor, keep: Tensor) -> Tensor:
    """`positions` `[3, B, S]` with every segment after a media block moved to start one past the largest position
    before it (the reference rule). `mm_token_type_ids` `[B, S]` (0 text, else media), `keep` `[B, S]` bool: the
    attended tokens (padding keeps its position). Segments are runs of text or of one media type; Qwen prompts wrap
    each media block in vision start/end text tokens, so two blocks never touch."""
    out = positions.clone()
    for b in range(positions.shape[1]):
        idx = keep[b].nonzero().squeeze(-1)  # [L]
        kinds = mm_token_type_ids[b, idx]  # [L]
        if not bool((kinds > 0).any()):
            continue
        row = out[:, b, idx]  # [3, L]
        cuts = (kinds[1:] != kinds[:-1]).nonzero().squeeze(-1) + 1
        bounds = [0, *cuts.tolist(), idx.numel()]
        shift, top = 0, -1  # positions are >= 0
        for s, e in zip(bounds[:-1], bounds[1:]):
            seg = row[:, s:e] + shift
            if s > 0 and kinds[s - 1] > 0 and int(seg.min()) <= top:  # the segment right after a media block
                step = top + 1 - int(seg.min())
                seg, shift = seg + step, shift + step
            row[:, s:e] = seg
            top = max(top, int(seg.max()))
        out[:, b, idx] = row
    return out


def _reference_rope_index(self, input_ids: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
    """transformers' `get_rope_index`, then the reference's restarts after media; `rope_deltas` `[B, 1]` to match
    (largest position + 1 - attended tokens, transformers' definition)."""
    method = type(self).get_rope_index
    positions, deltas = method(self, input_ids, *args, **kwargs)
    given = inspect.signature(method).bind(self, input_ids, *args, **kwargs).arguments
    types_, mask = given.get("mm_token_type_ids"), given.get("attention_mask")
    if types_ is None and input_ids is not None:  # transformers versions that find media by token id
        config = self.config
        types_ = (input_ids == config.image_token_id).int() + 2 * (input_ids == config.video_token_id).int()
    if types_ is None or positions.dim() != 3 or not bool((types_ > 0).any()):
        return positions, deltas
    keep = mask.bool() if mask is not None else torch.ones_like(types_, dtype=torch.bool)  # [B, S]
    fixed = restart_after_media(positions, types_, keep)
    top = fixed.masked_fill(~keep.unsqueeze(0), -1).amax(dim=(0, 2))  # [B]
    return fixed, (top + 1 - keep.sum(-1)).unsqueeze(1).to(deltas)


def use_reference_positions(model: nn.Module) -> None:
    """Make `model`'s (the inner `*Model` that owns `get_rope_index`) positions follow the reference rule, for
    every caller; a deep copy (the KL reference) keeps it."""
    if not hasattr(model, "get_rope_index"):
        raise TypeError(f"{type(model).__name__} has no get_rope_index")
    model.get_rope_index = types.MethodType(_reference_rope_index, model)
