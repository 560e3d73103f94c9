"""Model-touching parts of the baselines (layer L2): T-GRPO's shuffled-frame rollout, TW-GRPO's weights.

The rules themselves are pure functions in `ktr.baselines`.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import torch
from torch import Tensor, nn

from ktr.baselines import tw_grpo_weights
from ktr.config import SamplingConfig
from ktr.data.processor import VisionLanguageProcessor
from ktr.forward import output_projection
from ktr.probes.temporal import get_temporal_perturbation
from ktr.rewards import compute_rewards
from ktr.types import PromptBatch


def shuffled_prompts(processor: VisionLanguageProcessor, batch: PromptBatch, perturbation: str = "shuffle",
                     generator: torch.Generator | None = None) -> tuple[PromptBatch, list[int]]:
    """The video prompts of `batch` with their decoded frames permuted before patching, and their indices.

    A batch without videos returns all its prompts unchanged (so that every rank makes one generate call per
    step whatever its media mix; their accuracies are then never used).
    """
    permute = get_temporal_perturbation(perturbation)
    idx = [i for i, m in enumerate(batch.media) if m.kind == "video"] or list(range(len(batch.media)))
    frames = [m.frames[permute(len(m.frames), generator)] if m.kind == "video" else m.frames
              for m in (batch.media[i] for i in idx)]
    sub = replace(batch, rows=[batch.rows[i] for i in idx], input_ids=batch.input_ids[idx],
                  attention_mask=batch.attention_mask[idx], mm_token_type_ids=batch.mm_token_type_ids[idx],
                  media=[batch.media[i] for i in idx], grid_thw=batch.grid_thw[idx],
                  second_per_grid_ts=batch.second_per_grid_ts[idx], target_ids=None, target_mask=None)
    pixels, _ = processor.repatch(sub, frames)
    return replace(sub, pixel_values=pixels.to(batch.pixel_values)), idx


def shuffled_accuracy(model: nn.Module, processor: VisionLanguageProcessor, backend, batch: PromptBatch,
                      sampling: SamplingConfig, group_size: int) -> Tensor:
    """Accuracy rewards `[B * group_size]` of completions sampled on frame-shuffled videos (0 on image rows)."""
    sub, idx = shuffled_prompts(processor, batch)
    rollout = backend.generate(model, processor, sub, sampling, group_size=group_size)
    rows = [r for r in sub.rows for _ in range(group_size)]
    _, per, _ = compute_rewards(rollout.texts, [r["solution"] for r in rows], [r["problem_type"] for r in rows],
                                ["accuracy"], [1.0], device=batch.input_ids.device)
    out = torch.zeros(len(batch.media), group_size, dtype=torch.float32, device=batch.input_ids.device)
    out[idx] = per["accuracy"].view(len(idx), group_size)
    return out.masked_fill(~batch.is_video.to(out.device).unsqueeze(-1), 0.0).reshape(-1)


@torch.no_grad()
def tw_weights(model: nn.Module, hidden: Tensor, valid: Tensor, group_size: int, alpha: float,
               chunk_size: int | None) -> Tensor:
    """TW-GRPO weights `[N, T]` from the policy pass's detached hidden states `[N, T, H]`."""
    from ktr import fused

    fn = partial(_tw, valid=valid, group_size=group_size, alpha=alpha, chunk_size=chunk_size or 512)
    return fused.call_with_head(output_projection(model), hidden, fn)


def _tw(h, weight, bias=None, *, valid, group_size, alpha, chunk_size):
    return tw_grpo_weights(h, weight, valid, group_size, alpha, bias=bias, chunk_size=chunk_size)
