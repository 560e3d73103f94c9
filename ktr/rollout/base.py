"""Rollout: G sampled completions per prompt (layer L2).

Backends are looked up by name (`sampling.backend`, registry `ROLLOUT_BACKENDS`); an entry may be a dotted
`module:Class` path so that a heavy engine is imported only when it is chosen. `hf` is transformers'
`generate` (`generate` below), which also serves validation and evaluation; `shared` prefills each prompt
once and samples the G rows with ktr's own loop (`ktr.rollout.shared`); `vllm` is a colocated vLLM engine
(`ktr.rollout.vllm`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ktr.config import SamplingConfig
from ktr.data.processor import VisionLanguageProcessor
from ktr.model.families import core
from ktr.types import PromptBatch, Rollout


def end_of_sequence_ids(processor: VisionLanguageProcessor) -> list[int]:
    """Tokens that end a completion: end of turn and end of text."""
    tok = processor.tokenizer
    ids = {tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")}
    if tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    return sorted(i for i in ids if i is not None and i >= 0)


def completion_mask(completion_ids: Tensor, eos_ids: list[int]) -> Tensor:
    """`[N, T]` bool: tokens up to and including the first end-of-sequence token (all if none)."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))  # [N, T]
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # strictly after the first eos
    return ~after_eos


def check_prompt_lengths(batch: PromptBatch, cfg: SamplingConfig) -> None:
    """ValueError naming the samples whose prompt (tokens incl. vision placeholders) exceeds `max_prompt_length`."""
    too_long = [r.get("problem_id", i) for i, r in enumerate(batch.rows)
                if int(batch.attention_mask[i].sum()) > cfg.max_prompt_length]
    if too_long:
        raise ValueError(f"prompts of samples {too_long} exceed max_prompt_length={cfg.max_prompt_length}")


def suppressed_token_ids(model: nn.Module) -> list[int]:
    """Vision placeholder tokens, never sampled so that a completion can never be mistaken for media."""
    config = core(model).config
    return [config.image_token_id, config.video_token_id, config.vision_start_token_id,
            getattr(config, "vision_end_token_id", config.vision_start_token_id + 1)]


def assemble_rollout(batch: PromptBatch, completion: Tensor, group_size: int,
                     processor: VisionLanguageProcessor, eos: list[int]) -> Rollout:
    """The `Rollout` of `completion` `[N, T]` (rows grouped by prompt): tokens after the first end-of-sequence
    token become padding and leave the masks; prompts are repeated G times."""
    g = group_size
    valid = completion_mask(completion, eos)
    completion = completion.masked_fill(~valid, processor.pad_token_id)
    prompt_mask = batch.attention_mask.repeat_interleave(g, dim=0)
    prompt_types = batch.mm_token_type_ids.repeat_interleave(g, dim=0)
    return Rollout(
        group_size=g,
        input_ids=torch.cat([batch.input_ids.repeat_interleave(g, dim=0), completion], dim=1),
        attention_mask=torch.cat([prompt_mask, valid.long()], dim=1),
        mm_token_type_ids=torch.cat([prompt_types, torch.zeros_like(completion, dtype=prompt_types.dtype)], dim=1),
        completion_ids=completion,
        completion_mask=valid,
        texts=processor.tokenizer.batch_decode(completion, skip_special_tokens=True),
        opened=processor.opened_turn,
    )


def teacher_rollout(prompts: PromptBatch, processor) -> Rollout:
    """The prompts followed by their SFT targets, shaped like a rollout with G = 1."""
    target, valid = prompts.target_ids, prompts.target_mask
    return Rollout(group_size=1, input_ids=torch.cat([prompts.input_ids, target], 1),
                   attention_mask=torch.cat([prompts.attention_mask, valid.long()], 1),
                   mm_token_type_ids=torch.cat([prompts.mm_token_type_ids,
                                                torch.zeros_like(target, dtype=torch.int)], 1),
                   completion_ids=target, completion_mask=valid)


class RolloutBackend:
    """Samples G completions per prompt. One instance per training module."""

    def generate(self, model: nn.Module, processor: VisionLanguageProcessor, batch: PromptBatch,
                 cfg: SamplingConfig, group_size: int | None = None, greedy: bool = False) -> Rollout:
        raise NotImplementedError

    def on_weights_updated(self, model: nn.Module) -> None:
        """Called after every optimizer step: a backend holding its own copy of the weights syncs them here."""

    def release(self) -> None:
        """Hand the backend's memory back until its next `generate` or sync (vLLM: the engine sleeps). Called by
        the module after a step's rollouts and by evaluators after their last batch."""

    def metrics(self) -> dict[str, float]:
        """Figures of the backend since the last call (the vLLM engine's memory per phase), logged by the module."""
        return {}


# name -> backend class, or "module:Class" imported on first use
ROLLOUT_BACKENDS: dict[str, type[RolloutBackend] | str] = {
    "hf": "ktr.rollout.hf:HFBackend",  # every backend module imports this one: dotted entries avoid the cycle
    "shared": "ktr.rollout.shared:SharedPrefixBackend",
    "vllm": "ktr.rollout.vllm:VLLMBackend",  # vLLM is imported on the first generate (`pip install 'ktr[vllm]'`)
}


def rollout_backend(name: str) -> RolloutBackend:
    """A new instance of the backend registered as `name`; ValueError listing the registered names."""
    if name not in ROLLOUT_BACKENDS:
        raise ValueError(f"unknown rollout backend {name!r}; expected one of {sorted(ROLLOUT_BACKENDS)}")
    entry = ROLLOUT_BACKENDS[name]
    if isinstance(entry, str):
        import importlib

        module, _, attr = entry.partition(":")
        entry = getattr(importlib.import_module(module), attr)
    return entry()
