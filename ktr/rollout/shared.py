"""Shared-prefix rollout: each prompt runs through the decoder once, not G times (layer L2).

`generate` (transformers, `num_return_sequences`) expands the B prompts to N = B x G rows before the prefill,
so the decoder processes every prompt G times. Here the vision tower runs once on the B prompts' media
(`ktr.model.forward.encode_media`), the decoder prefills the B prompts once, the cache is repeated to the
N rows (`ModelFamily.repeat_cache`: keys/values, and a hybrid decoder's recurrent states), and a small loop
samples the G continuations, applying the same logits processing as `generate`
(`ktr.rollout.sampling.process_logits`; top-p through the exact candidate-set `nucleus_filter`) and, by
default, the same multinomial draw, so it samples from the same distribution per step and, with one seed, the
same tokens. `sampling.draw: inverse_cdf` keeps the distribution but draws one uniform number per row instead of
an exponential variate per vocabulary entry (`ktr.rollout.sampling.draw_inverse_cdf`; the laptop demo's choice).

Decode loop (issue 27): after the repeat, every full-attention layer's cache is swapped for preallocated
`[N, kv_heads, L + max_new_tokens, head_dim]` buffers (`ktr.rollout.kv_cache.preallocate`): the prompt's keys
and values are copied in once, each step writes one token's key/value at its index and attends to a view of the
filled part, and the attention mask is a slice of one `[N, L + max_new_tokens]` buffer. transformers'
`DynamicCache` instead concatenates every layer's whole cache on every token (allocation and copy growing with
the position; `prefill` without `new_tokens` keeps that loop for the benchmark, `scripts/bench_rollout.py`).
The views hold the same values at the same length under the same mask, so tokens and processed logits are
`generate`'s (tests/test_rollout_shared.py). A hybrid decoder's DeltaNet layers keep their fixed-size states.
`sampling.compile_decode` (CUDA only; ignored with a warning on CPU) compiles the step over transformers'
`StaticLayer` (fixed shapes; the buffer length rounded up to `STATIC_BUCKET`).

Not done: the G rows of a prompt still hold G copies of its keys/values (the repeat). Attending to one shared
copy of the prompt plus each row's own completion (two attention calls merged by their log-sum-exp, as
`ktr.model.attention` does for the scoring passes) would divide the prompt's cache by G (7/8 of a 1k-token
prompt's K/V at G = 8) and its per-step reads likewise; it needs an attention function of its own in the
decoder, which transformers' cache interface alone does not give.

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

import warnings
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


STATIC_BUCKET = 256
"""The static (compiled) cache's length is rounded up to a multiple of this."""


@dataclass
class DecodeState:
    """The N rows' decoding state after the shared prefill."""

    cache: object  # transformers cache: [N, kv_heads, L + t, head_dim] keys/values per attention layer
    attention_mask: Tensor  # [N, L + t] long (a view of `mask_buffer` when the cache is preallocated)
    next_positions: Tensor  # [3, N, 1] rotary positions of the next token
    logits: Tensor  # [N, V] float32 next-token logits
    mask_buffer: Tensor | None = None  # [N, L + T] long, ones after the prompt: the mask of every later step
    static: bool = False  # fixed-shape steps (transformers' StaticLayer; the compiled decode step)


def _head_logits(model: nn.Module, hidden: Tensor) -> Tensor:
    """`[R, V]` float32 logits of hidden states `[R, H]` (through the head module, so FSDP hooks fire)."""
    return core(model).lm_head(hidden).float()


def prefill(model: nn.Module, batch: PromptBatch, group_size: int, new_tokens: int | None = None,
            static: bool = False) -> DecodeState:
    """Run the B prompts through the decoder once and expand their cache to the N = B x G rows.

    With `new_tokens`, the attention layers' cache and the mask are then preallocated for that many more tokens
    (`ktr.rollout.kv_cache.preallocate`; `static`: fixed shapes for a compiled step); without it the cache
    stays transformers' `DynamicCache`, which concatenates on every token (the loop before issue 27, kept for
    `scripts/bench_rollout.py`'s comparison).
    """
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
    mask = batch.attention_mask.repeat_interleave(g, dim=0)  # [N, L]
    state = DecodeState(cache=cache, attention_mask=mask,
                        next_positions=(positions[:, :, -1:] + 1).repeat_interleave(g, dim=1),  # [3, N, 1]
                        logits=logits.repeat_interleave(g, dim=0))  # [N, V]
    if new_tokens is not None:
        from ktr.rollout.kv_cache import preallocate

        room = new_tokens
        if static:  # a capacity from a few sizes, so that a compiled step recompiles rarely across prompt lengths
            room = -(-(mask.shape[1] + new_tokens) // STATIC_BUCKET) * STATIC_BUCKET - mask.shape[1]
        preallocate(cache, room, static=static)
        state.mask_buffer = torch.cat([mask, mask.new_ones((mask.shape[0], room))], dim=1)  # [N, L + room]
        state.static = static
    return state


def _next_mask(state: DecodeState) -> Tensor:
    """The attention mask `[N, L + t + 1]` of the step feeding token t + 1 (the full buffer when static)."""
    width = state.attention_mask.shape[1] + 1
    if state.mask_buffer is None:
        return torch.cat([state.attention_mask, state.attention_mask.new_ones((state.attention_mask.shape[0], 1))],
                         dim=1)
    return state.mask_buffer if state.static else state.mask_buffer[:, :width]


def _step_logits(model: nn.Module, tokens: Tensor, mask: Tensor, positions: Tensor, cache) -> Tensor:
    """`[N, V]` float32 next-token logits after feeding `tokens` `[N]` at `positions` `[3, N, 1]` with `mask`."""
    embeds = core(model).get_input_embeddings()(tokens[:, None])  # [N, 1, H]
    out = language_model(model)(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache,
                                use_cache=True)
    return _head_logits(model, out.last_hidden_state[:, -1])


def decode_step(model: nn.Module, state: DecodeState, tokens: Tensor, step_fn=None) -> None:
    """Feed `tokens` `[N]` (one per row) and update `state` in place with the next logits.

    `step_fn`: the function computing the logits (`_step_logits`, the default, or its compiled version)."""
    mask = _next_mask(state)
    state.logits = (step_fn or _step_logits)(model, tokens, mask, state.next_positions, state.cache)  # [N, V]
    width = state.attention_mask.shape[1] + 1
    state.attention_mask = mask[:, :width]  # [N, L + t + 1]
    state.next_positions = state.next_positions + 1


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
                pad_id: int, sample: bool, step_fn=None) -> Tensor:
    """Completion tokens `[N, T]`, T <= max_new_tokens; rows that ended hold `pad_id` after their EOS."""
    n = state.logits.shape[0]
    unfinished = torch.ones(n, dtype=torch.bool, device=state.logits.device)  # [N]
    synced = _synced(model)
    tokens: list[Tensor] = []
    local_steps = 0  # steps until this rank's own rows all ended
    for step in range(cfg.max_new_tokens):
        scores = sampling.process_logits(state.logits, suppress, sample, cfg.temperature, cfg.top_k, cfg.top_p)
        nxt = sampling.choose_tokens(scores, sample, cfg.draw)  # [N]
        nxt = torch.where(unfinished, nxt, torch.full_like(nxt, pad_id))
        tokens.append(nxt)
        if unfinished.any():
            local_steps = step + 1
        unfinished = unfinished & ~torch.isin(nxt, eos)
        if step + 1 == cfg.max_new_tokens or not _anyone_unfinished(unfinished, synced):
            break
        decode_step(model, state, nxt, step_fn)
    return torch.stack(tokens[:local_steps], dim=1)  # [N, T]


_COMPILED: dict[str, object] = {}
"""`torch.compile` backend -> the compiled `_step_logits` (dynamo guards on the model it is given and
recompiles for another; the shapes are fixed over a rollout, so one model compiles once)."""


def compiled_step(backend: str = "inductor"):
    """`_step_logits` under `torch.compile` (fixed shapes: use with a static `prefill`)."""
    if backend not in _COMPILED:
        _COMPILED[backend] = torch.compile(_step_logits, backend=backend, dynamic=False)
    return _COMPILED[backend]


def use_compiled_step(cfg: SamplingConfig, device: torch.device) -> bool:
    """Whether `cfg.compile_decode` applies on `device`: CUDA only (ignored with a warning elsewhere: inductor's
    CPU code for one decode token is not faster than eager here and needs a C++ compiler)."""
    if not cfg.compile_decode:
        return False
    if device.type != "cuda":
        warnings.warn(f"sampling.compile_decode is ignored on {device.type} (CUDA only): decoding eagerly",
                      stacklevel=3)
        return False
    return True


@torch.no_grad()
def generate_shared(model: nn.Module, processor: VisionLanguageProcessor, batch: PromptBatch, cfg: SamplingConfig,
                    group_size: int | None = None, greedy: bool = False, *, _grow_by_concat: bool = False,
                    _compile_backend: str | None = None) -> Rollout:
    """Sample `G` completions per prompt with one prefill per prompt; the `Rollout` of `ktr.rollout.hf.generate`.

    Rows `i*G .. i*G+G-1` belong to prompt `i`. Greedy decoding when `greedy` or `cfg.temperature == 0`.
    `_grow_by_concat`: the loop before issue 27 (transformers' `DynamicCache` concatenated every token), for
    `scripts/bench_rollout.py`. `_compile_backend`: compile the step with this `torch.compile` backend on any
    device (tests use "eager" on CPU); otherwise `cfg.compile_decode` decides (CUDA, inductor).
    """
    g = group_size or cfg.group_size
    check_prompt_lengths(batch, cfg)
    device = batch.input_ids.device
    eos_ids = end_of_sequence_ids(processor)
    suppress = torch.tensor(suppressed_token_ids(model), device=device)
    eos = torch.tensor(eos_ids, device=device)
    sample = not greedy and cfg.temperature > 0
    compiled = _compile_backend is not None or use_compiled_step(cfg, device)
    step_fn = compiled_step(_compile_backend or "inductor") if compiled else None
    was_training = model.training
    model.eval()  # no dropout; gradient checkpointing stays out of the way of the cache
    try:
        state = prefill(model, batch, g, None if _grow_by_concat else cfg.max_new_tokens, static=compiled)
        completion = sample_loop(model, state, cfg, suppress, eos, processor.pad_token_id, sample, step_fn)  # [N, T]
    finally:
        model.train(was_training)
    return assemble_rollout(batch, completion, g, processor, eos_ids)


class SharedPrefixBackend(RolloutBackend):
    """One decoder prefill per prompt, the cache repeated to the G rows, ktr's own sampling loop."""

    def generate(self, model, processor, batch, cfg, group_size=None, greedy=False) -> Rollout:
        return generate_shared(model, processor, batch, cfg, group_size=group_size, greedy=greedy)
