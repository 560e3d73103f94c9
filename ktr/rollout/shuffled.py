"""T-GRPO's shuffled-frame rollout (layer L2): completions sampled on videos whose frames are permuted.

The rules themselves are pure functions in `ktr.baselines`.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from ktr.config import SamplingConfig
from ktr.data.processor import VisionLanguageProcessor
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
    _, per, _ = compute_rewards(rollout.assistant_texts, [r["solution"] for r in rows],
                                [r["problem_type"] for r in rows], ["accuracy"], [1.0], device=batch.input_ids.device)
    out = torch.zeros(len(batch.media), group_size, dtype=torch.float32, device=batch.input_ids.device)
    out[idx] = per["accuracy"].view(len(idx), group_size)
    return out.masked_fill(~batch.is_video.to(out.device).unsqueeze(-1), 0.0).reshape(-1)

