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
    kwargs.update(checkpoint_generation_reset(model, kwargs))
    vision = batch.hf_vision_kwargs()
    if not family_of(model).video_time_scaling:  # Qwen2-VL has no temporal scaling of rotary positions
        vision.pop("second_per_grid_ts", None)
    return {**kwargs, **vision}


_TOKEN_SETTINGS = {"bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "transformers_version",
                   "_from_model_config"}


def checkpoint_generation_reset(model: nn.Module, kwargs: dict) -> dict:
    """`generate` settings that undo what the checkpoint's `generation_config.json` sets beyond `kwargs`.

    transformers fills every setting a `generate` call leaves out from the checkpoint's generation config:
    Qwen2.5-VL-7B-Instruct's (which fine-tuned checkpoints such as the released SFT start inherit) sets
    `repetition_penalty: 1.05`, so ktr's rollouts and greedy evaluations applied a repetition penalty that no
    setting of ktr named. The released trainer built a fresh `GenerationConfig` (its rollouts sampled with
    transformers 4.x's `top_k` 50, not the checkpoint's 1), so every such setting is reset here to transformers'
    global default; the special-token ids are kept."""
    from transformers import GenerationConfig

    fresh = GenerationConfig()
    defaults = fresh._get_default_generation_params() if hasattr(fresh, "_get_default_generation_params") else {}
    config = getattr(model, "generation_config", None)
    if config is None:
        return {}
    return {key: defaults.get(key, getattr(fresh, key, None)) for key in config.to_diff_dict()
            if key not in kwargs and key not in _TOKEN_SETTINGS and hasattr(fresh, key)}


class HFBackend(RolloutBackend):
    """transformers' `generate` with `num_return_sequences` (module-level `generate`)."""

    def generate(self, model, processor, batch, cfg, group_size=None, greedy=False) -> Rollout:
        return generate(model, processor, batch, cfg, group_size=group_size, greedy=greedy)
