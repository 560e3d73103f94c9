"""The `hf` rollout backend: transformers' `generate` with `num_return_sequences`; also serves validation and
evaluation (greedy)."""

from __future__ import annotations

import torch
from torch import nn

from ktr.config import SamplingConfig
from ktr.data.processor import VisionLanguageProcessor
from ktr.model.families import family_of
from ktr.rollout.base import (RolloutBackend, assemble_rollout, check_prompt_lengths, end_of_sequence_ids,
                              suppressed_token_ids)
from ktr.types import PromptBatch, Rollout


@torch.no_grad()
def generate(model: nn.Module, processor: VisionLanguageProcessor, batch: PromptBatch, cfg: SamplingConfig,
             group_size: int | None = None, greedy: bool = False) -> Rollout:
    """Sample `G` completions per prompt; rows `i*G .. i*G+G-1` belong to prompt `i`.

    Transformers encodes the media once per prompt before expanding to G rows, then prefills the G copies.
    """
    g = group_size or cfg.group_size
    check_prompt_lengths(batch, cfg)
    was_training = model.training
    model.eval()  # gradient checkpointing disables the KV cache in train mode
    try:
        seqs = model.generate(**hf_generate_kwargs(model, processor, batch, cfg, g, greedy))  # [N, L + T]
    finally:
        model.train(was_training)
    completion = seqs[:, batch.input_ids.shape[1]:]  # [N, T], T >= 1: generate always emits at least one token
    return assemble_rollout(batch, completion, g, processor, end_of_sequence_ids(processor))


def hf_generate_kwargs(model: nn.Module, processor: VisionLanguageProcessor, batch: PromptBatch,
                       cfg: SamplingConfig, group_size: int, greedy: bool) -> dict:
    """Everything `generate` passes to transformers' `model.generate` (inputs, media, sampling settings)."""
    sample = not greedy and cfg.temperature > 0
    kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, do_sample=sample,
                  max_new_tokens=cfg.max_new_tokens, num_return_sequences=group_size,
                  eos_token_id=end_of_sequence_ids(processor), pad_token_id=processor.pad_token_id,
                  suppress_tokens=suppressed_token_ids(model), use_cache=True)
    if sample:
        kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k or None)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    vision = batch.hf_vision_kwargs()
    if not family_of(model).video_time_scaling:  # Qwen2-VL has no temporal scaling of rotary positions
        vision.pop("second_per_grid_ts", None)
    return {**kwargs, **vision}


class HFBackend(RolloutBackend):
    """transformers' `generate` with `num_return_sequences` (module-level `generate`)."""

    def generate(self, model, processor, batch, cfg, group_size=None, greedy=False) -> Rollout:
        return generate(model, processor, batch, cfg, group_size=group_size, greedy=greedy)
