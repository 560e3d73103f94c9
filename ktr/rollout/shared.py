"""Shared-prefix rollout: each prompt runs through the decoder once, not G times (layer L2).

`generate` (transformers, `num_return_sequences`) expands the B prompts to N = B x G rows before the prefill,
so the decoder processes every prompt G times. Here the vision tower runs once on the B prompts' media
(`ktr.model.forward.encode_media`), the decoder prefills the B prompts once, the cache is repeated to the
N rows (`ModelFamily.repeat_cache`: keys/values, and a hybrid decoder's recurrent states), and a small loop
samples the G continuations, applying the same logits processing as `generate`
(`ktr.rollout.sampling.process_logits`; top-p through the exact candidate-set `nucleus_filter`) and the same
multinomial draw, so it samples from the same distribution per step.

Positions: the prompt's 3D rotary positions come from `ktr.model.forward.rope_positions` (as every scoring pass);
each generated token's position is the previous token's plus one, in all three sections. That is what
transformers' `generate` does in this version (it extends explicit `position_ids` by one each step; the
`rope_deltas` path of `Qwen2_5_VLModel` is only used without them), and what `rope_positions` gives the
completion tokens when the scoring passes index the whole sequence, since the prompt ends in text.
Left-padded prompts of different lengths share one batch: padding is masked out of attention and positions.

Under FSDP2 every rank keeps stepping until all ranks' rows have ended (the forward calls stay matched, as
transformers' `synced_gpus`); tokens produced after a rank's own rows have all ended are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ktr.config import SamplingConfig
from ktr.data.processor import VisionLanguageProcessor
from ktr.model.families import core, family_of, language_model
from ktr.model.forward import encode_media, rope_positions, sequence_embeddings
from ktr.rollout import sampling
from ktr.rollout.base import (RolloutBackend, assemble_rollout, check_prompt_lengths, end_of_sequence_ids,
                              suppressed_token_ids)
from ktr.types import PromptBatch, Rollout


@dataclass
class DecodeState:
    """The N rows' decoding state after the shared prefill."""

    cache: object  # transformers DynamicCache holding [N, kv_heads, L + t, head_dim] per layer
    attention_mask: Tensor  # [N, L + t] long
    next_positions: Tensor  # [3, N, 1] rotary positions of the next token
    logits: Tensor  # [N, V] float32 next-token logits


def _head_logits(model: nn.Module, hidden: Tensor) -> Tensor:
    """`[R, V]` float32 logits of hidden states `[R, H]` (through the head module, so FSDP hooks fire)."""
    return core(model).lm_head(hidden).float()


def prefill(model: nn.Module, batch: PromptBatch, group_size: int) -> DecodeState:
    """Run the B prompts through the decoder once and expand their cache to the N = B x G rows."""
    from transformers import DynamicCache

    lm = language_model(model)
    b = batch.input_ids.shape[0]
    prompt_index = torch.arange(b, device=batch.input_ids.device)  # [B]: each prompt its own media
    features = encode_media(model, batch.pixel_values, batch.grid_thw)
    embeds = sequence_embeddings(model, batch.input_ids, features, prompt_index, batch.mm_token_type_ids)  # [B, L, H]
    positions = rope_positions(model, batch.input_ids, batch.mm_token_type_ids, batch.attention_mask, batch,
                               prompt_index)  # [3, B, L]
    extra = family_of(model).decoder_kwargs(model, batch.mm_token_type_ids, prompt_index, features, None)  # deepstack
    cache = DynamicCache(config=lm.config)
    out = lm(inputs_embeds=embeds, attention_mask=batch.attention_mask, position_ids=positions, cache=cache,
             use_cache=True, **extra)
    logits = _head_logits(model, out.last_hidden_state[:, -1])  # [B, V]; prompts are left-padded
    family_of(model).repeat_cache(cache, group_size)  # [N, kv_heads, L, head_dim] per layer (+ recurrent states)
    g = group_size
    return DecodeState(cache=cache,
                       attention_mask=batch.attention_mask.repeat_interleave(g, dim=0),  # [N, L]
                       next_positions=(positions[:, :, -1:] + 1).repeat_interleave(g, dim=1),  # [3, N, 1]
                       logits=logits.repeat_interleave(g, dim=0))  # [N, V]


def decode_step(model: nn.Module, state: DecodeState, tokens: Tensor) -> None:
    """Feed `tokens` `[N]` (one per row) and update `state` in place with the next logits."""
    lm = language_model(model)
    embeds = core(model).get_input_embeddings()(tokens[:, None])  # [N, 1, H]
    mask = torch.cat([state.attention_mask, state.attention_mask.new_ones((tokens.shape[0], 1))], dim=1)
    out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=state.next_positions, cache=state.cache,
             use_cache=True)
    state.attention_mask = mask  # [N, L + t + 1]
    state.next_positions = state.next_positions + 1
    state.logits = _head_logits(model, out.last_hidden_state[:, -1])  # [N, V]


def _synced(model: nn.Module) -> bool:
    """Whether ranks must keep stepping together (an FSDP-managed model in an initialised process group)."""
    dist = torch.distributed
    return (getattr(core(model), "_is_fsdp_managed_module", False) and dist.is_available()
            and dist.is_initialized() and dist.get_world_size() > 1)


def _anyone_unfinished(unfinished: Tensor, synced: bool) -> bool:
    flag = unfinished.any().to(torch.float32).reshape(1)  # [1]
    if synced:
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item() > 0)


def sample_loop(model: nn.Module, state: DecodeState, cfg: SamplingConfig, suppress: Tensor, eos: Tensor,
                pad_id: int, sample: bool) -> Tensor:
    """Completion tokens `[N, T]`, T <= max_new_tokens; rows that ended hold `pad_id` after their EOS."""
    n = state.logits.shape[0]
    unfinished = torch.ones(n, dtype=torch.bool, device=state.logits.device)  # [N]
    synced = _synced(model)
    tokens: list[Tensor] = []
    local_steps = 0  # steps until this rank's own rows all ended
    for step in range(cfg.max_new_tokens):
        scores = sampling.process_logits(state.logits, suppress, sample, cfg.temperature, cfg.top_k, cfg.top_p)
        nxt = sampling.choose_tokens(scores, sample)  # [N]
        nxt = torch.where(unfinished, nxt, torch.full_like(nxt, pad_id))
        tokens.append(nxt)
        if unfinished.any():
            local_steps = step + 1
        unfinished = unfinished & ~torch.isin(nxt, eos)
        if step + 1 == cfg.max_new_tokens or not _anyone_unfinished(unfinished, synced):
            break
        decode_step(model, state, nxt)
    return torch.stack(tokens[:local_steps], dim=1)  # [N, T]


@torch.no_grad()
def generate_shared(model: nn.Module, processor: VisionLanguageProcessor, batch: PromptBatch, cfg: SamplingConfig,
                    group_size: int | None = None, greedy: bool = False) -> Rollout:
    """Sample `G` completions per prompt with one prefill per prompt; the `Rollout` of `ktr.rollout.hf.generate`.

    Rows `i*G .. i*G+G-1` belong to prompt `i`. Greedy decoding when `greedy` or `cfg.temperature == 0`.
    """
    g = group_size or cfg.group_size
    check_prompt_lengths(batch, cfg)
    device = batch.input_ids.device
    eos_ids = end_of_sequence_ids(processor)
    suppress = torch.tensor(suppressed_token_ids(model), device=device)
    eos = torch.tensor(eos_ids, device=device)
    sample = not greedy and cfg.temperature > 0
    was_training = model.training
    model.eval()  # no dropout; gradient checkpointing stays out of the way of the cache
    try:
        state = prefill(model, batch, g)
        completion = sample_loop(model, state, cfg, suppress, eos, processor.pad_token_id, sample)  # [N, T]
    finally:
        model.train(was_training)
    return assemble_rollout(batch, completion, g, processor, eos_ids)


class SharedPrefixBackend(RolloutBackend):
    """One decoder prefill per prompt, the cache repeated to the G rows, ktr's own sampling loop."""

    def generate(self, model, processor, batch, cfg, group_size=None, greedy=False) -> Rollout:
        return generate_shared(model, processor, batch, cfg, group_size=group_size, greedy=greedy)
