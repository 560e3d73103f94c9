"""The one forward path every scoring and training pass goes through (layer L2).

Hugging Face's Qwen-VL forward encodes the media of every row, so G completions of one video re-encode it
G times. Here the vision tower runs once per pass on the B distinct media (images and videos in a single call,
so every rank makes the same calls whatever its mix), the features are scattered into the G rows that share
them, 3D rotary positions are computed from `mm_token_type_ids` (without it transformers silently falls back
to 1D positions), and only the decoder trunk runs on the N rows. Log-probs come from the final hidden states
through the chunked projection of `ktr.fused`, so no pass materialises `[N, T, V]` logits. What differs per
model family (deepstack features and their decoder arguments for Qwen3-VL) comes from `ktr.model.families`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Literal

import torch
from torch import Tensor, nn

from ktr.config import DEFAULT_CHUNK_SIZE
from ktr.model import attention, prefix
from ktr.model.families import core, family_of, row_features
from ktr.types import PromptBatch, Rollout, VisionFeatures


def encode_media(model: nn.Module, pixel_values: Tensor, grid_thw: Tensor) -> VisionFeatures:
    """Run the vision tower once on all media (`pixel_values` [sum P, D], `grid_thw` [B, 3]); the family says
    what comes back (Qwen3-VL: deepstack features too)."""
    return family_of(model).encode(model, pixel_values, grid_thw)


def rope_positions(model: nn.Module, input_ids: Tensor, mm_token_type_ids: Tensor, attention_mask: Tensor,
                   batch: PromptBatch, prompt_index: Tensor) -> Tensor:
    """3D rotary positions `[3, N, S]` for N rows whose media is `batch.media[prompt_index[i]]`.

    Tokens with attention mask 0 are skipped, so hiding every vision token re-indexes the text after it as if
    the media were absent (the released visual probe's behaviour).
    """
    m = core(model).model
    is_video = batch.is_video[prompt_index]  # [N]
    grids = batch.grid_thw[prompt_index]  # [N, 3]
    # Rows whose media tokens are all masked consume no grid, so only pass grids of rows that still see media.
    visible = ((mm_token_type_ids > 0) & attention_mask.bool()).any(-1)  # [N]
    img_rows, vid_rows = visible & ~is_video, visible & is_video
    kwargs = {}
    if img_rows.any():
        kwargs["image_grid_thw"] = grids[img_rows]
    if vid_rows.any():
        kwargs["video_grid_thw"] = grids[vid_rows]
        kwargs["second_per_grid_ts"] = batch.second_per_grid_ts[prompt_index][vid_rows]
    if not kwargs:  # no media visible anywhere: plain 1D positions over unmasked tokens
        pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return pos.unsqueeze(0).expand(3, -1, -1)
    if not hasattr(m, "get_rope_index"):
        raise TypeError(f"{type(m).__name__} has no get_rope_index; not a Qwen-VL model")
    pos, _ = m.get_rope_index(input_ids, mm_token_type_ids=mm_token_type_ids, attention_mask=attention_mask,
                              **kwargs)
    return pos


def sequence_embeddings(model: nn.Module, input_ids: Tensor, features: VisionFeatures, prompt_index: Tensor,
                        mm_token_type_ids: Tensor, zero_vision: Tensor | None = None) -> Tensor:
    """Token embeddings `[N, S, H]` with the vision placeholders replaced by vision features: `prompt_index` `[M]`
    names the prompt of each block of placeholders in row-major order (one per row for rows that all hold media;
    the packed split row holds several groups' blocks in one row, and none for a group whose media was dropped).

    `zero_vision` `[N, S]` bool zeroes those vision positions (the `zero_embeddings` perturbation).
    """
    embed = core(model).get_input_embeddings()
    embeds = embed(input_ids)  # [N, S, H]
    is_vision = (mm_token_type_ids > 0).unsqueeze(-1)  # [N, S, 1]
    if prompt_index.numel() == 0:
        if bool(is_vision.any()):
            raise ValueError(f"{int(is_vision.sum())} vision placeholders but no vision features")
        return embeds if zero_vision is None else embeds.masked_fill(zero_vision.unsqueeze(-1), 0.0)
    row_feats = row_features(features.per_prompt, prompt_index)  # [n_vision_tokens, H]
    if row_feats.shape[0] != int(is_vision.sum()):
        raise ValueError(f"{int(is_vision.sum())} vision placeholders but {row_feats.shape[0]} vision features")
    embeds = embeds.masked_scatter(is_vision, row_feats.to(embeds.dtype))
    if zero_vision is not None:
        embeds = embeds.masked_fill(zero_vision.unsqueeze(-1), 0.0)
    return embeds


Layout = Literal["naive", "dense", "split"]
"""How a scoring pass lays out its N rows: `naive` (N whole rows, as released), `dense` (one packed row per group
with a `[W, W]` mask, `ktr.model.prefix.pack_groups`), `split` (all groups in one packed row, attention split per
group with no mask, `ktr.model.prefix.pack_split` and `ktr.model.attention`)."""

PrefixAttention = Literal["split", "dense"]


@dataclass
class SequenceView:
    """What a pass sees of the N sequences: ids, masks and positions (perturbations edit copies of these)."""

    input_ids: Tensor  # [N, S]
    attention_mask: Tensor  # [N, S]
    mm_token_type_ids: Tensor  # [N, S]
    position_ids: Tensor  # [3, N, S]
    prompt_index: Tensor  # [N]
    shared_prefix: bool = True  # run each group's prompt once (`ktr.model.prefix`) where the pass allows it
    prefix_attention: PrefixAttention = "split"  # with SDPA: split attention (default) or the dense mask (comparison)
    drop_hidden: bool = True  # naive layout: prompt tokens the pass hides are removed from the rows, not masked

    @classmethod
    def of(cls, model: nn.Module, rollout: Rollout, batch: PromptBatch, shared_prefix: bool = True,
           prefix_attention: PrefixAttention = "split") -> SequenceView:
        pos = rope_positions(model, rollout.input_ids, rollout.mm_token_type_ids, rollout.attention_mask, batch,
                             rollout.prompt_index)
        return cls(rollout.input_ids, rollout.attention_mask, rollout.mm_token_type_ids, pos, rollout.prompt_index,
                   shared_prefix, prefix_attention)

    def rows(self, rows: slice) -> SequenceView:
        """The view of a slice of the rows (a micro-batch), same settings."""
        return replace(self, input_ids=self.input_ids[rows], attention_mask=self.attention_mask[rows],
                       mm_token_type_ids=self.mm_token_type_ids[rows], position_ids=self.position_ids[:, rows],
                       prompt_index=self.prompt_index[rows])


@dataclass
class PolicyPass:
    """One scoring pass of the policy over a rollout: what the probes, the loss and the baselines read."""

    view: SequenceView
    features: VisionFeatures  # with grad when the vision tower trains
    logps: Tensor  # [N, T] policy log-probs of the completion tokens, no grad
    entropy: Tensor | None = None  # [N, T] full-vocabulary entropy, no grad (the entropy signal)
    hidden: Tensor | None = None  # [N, T, H] with grad (one micro-batch) or None (recomputed per micro-batch)
    ref_logps: Tensor | None = None  # [N, T] reference log-probs (the KL term)
    base_hidden: Tensor | None = None  # [N, T, H] detached hidden states (distribution scores, TW-GRPO)


def completion_hidden(model: nn.Module, view: SequenceView, features: VisionFeatures, completion_length: int,
                      zero_vision: Tensor | None = None) -> Tensor:
    """Final hidden states `[N, T, H]` at the positions that predict the T completion tokens.

    With `view.shared_prefix` (the default) each group's prompt runs once, its completions packed after it
    (`ktr.model.prefix`), when the rows of every group share their prompt part; otherwise every row runs whole
    (the naive layout, as released). `prefix_layout` decides how. Prompt tokens a pass hides (the visual probe's
    media) are removed from the rows in every layout but the dense-mask oracle (`prefix.drop_hidden`,
    `prefix.pack_split`), unless `view.drop_hidden` is off (the released masking, naive layout).
    """
    packed = shared_layout(model, view, completion_length, zero_vision)
    if packed is not None:
        hidden = decoder_hidden(model, packed.input_ids, packed.attention_mask, packed.position_ids,
                                packed.mm_token_type_ids, packed.media_index, features, packed.zero_vision,
                                split=packed.split)
        return hidden.flatten(0, 1)[packed.gather]  # [N, T, H]
    ids, mask, mm, pos = view.input_ids, view.attention_mask, view.mm_token_type_ids, view.position_ids
    dropped = prefix.drop_hidden(ids, mask, mm, pos, zero_vision, completion_length) if view.drop_hidden else None
    if dropped is not None:  # the visual probe's hidden media removed from the rows, not masked
        ids, mask, mm, pos, zero_vision = dropped
    media = view.prompt_index[(mm > 0).any(-1)]
    hidden = decoder_hidden(model, ids, mask, pos, mm, media, features, zero_vision)  # [N, S, H]
    s = hidden.shape[1]
    return hidden[:, s - completion_length - 1: s - 1]


def prefix_layout(model: nn.Module, view: SequenceView) -> Layout:
    """The layout a pass over `view` asks for (the one place that decides; `shared_layout` may still run a pass
    naive when its rows do not share their prompts). Eager attention packs with the dense mask (the test oracle of
    split attention); SDPA splits (or, with `view.prefix_attention = "dense"`, packs with the dense mask, for
    comparison); flash-attention 2 splits when `flash_attn` is importable; anything else runs naive."""
    if not view.shared_prefix or not family_of(model).shared_prefix_exact:  # Qwen3.5: a state runs along the row
        return "naive"
    impl = _attention(model)
    if impl == "eager":
        return "dense"
    if impl in attention.SPLIT_SDPA:
        return view.prefix_attention
    return "split" if attention.splits(impl) else "naive"


def shared_layout(model: nn.Module, view: SequenceView, completion_length: int,
                  zero_vision: Tensor | None = None) -> prefix.PackedRows | None:
    """The packed shared-prefix rows of `view`, or None where the pass runs naive (see `completion_hidden`)."""
    layout = prefix_layout(model, view)
    if layout == "naive":
        return None
    runs = prefix.group_runs(view.prompt_index)
    if int(runs[1].max()) == 1:
        return None  # one row per prompt (SFT, G = 1): nothing to share
    p = view.input_ids.shape[1] - completion_length
    if not prefix.prompts_shared(view.input_ids, view.attention_mask, view.mm_token_type_ids, view.position_ids,
                                 zero_vision, runs, p):
        return None
    pack = prefix.pack_split if layout == "split" else prefix.pack_groups
    return pack(view.input_ids, view.attention_mask, view.mm_token_type_ids, view.position_ids, zero_vision,
                view.prompt_index, runs, completion_length)


class MicroBatches:
    """The gradient pass's final hidden states `[m, T, H]` in micro-batches of `size` rows (`loss.micro_batch_size`),
    each prompt run once per group even when a micro-batch holds only part of its group.

    With split attention (`prefix_layout` "split" with SDPA) one pass runs the prompts alone and records their keys
    and values at every layer (`ktr.model.attention.PromptCache`); each micro-batch then runs its completions alone,
    attending to those keys and values (leaves) and taking the first token's state from the prompts' pass (a leaf
    too); `finish()`, after the last micro-batch's backward, sends the leaves' accumulated gradients back through
    the prompts' pass once. Exact: every completion sees the same keys, values and positions as in one pass. Any
    other layout runs each micro-batch's rows on their own (`completion_hidden`; a packed micro-batch repeats its
    prompt).

        micro = MicroBatches(model, view, features, T, size)
        for rows, hidden in micro:  # rows: a slice of the N rows
            loss(hidden, rows).backward()
        micro.finish()
    """

    def __init__(self, model: nn.Module, view: SequenceView, features: VisionFeatures, completion_length: int,
                 size: int) -> None:
        self.model, self.view, self.features, self.t, self.size = model, view, features, completion_length, size
        self.cache: attention.PromptCache | None = None
        n = view.input_ids.shape[0]
        if size >= n or prefix_layout(model, view) != "split" or _attention(model) not in attention.SPLIT_SDPA:
            return
        runs = prefix.group_runs(view.prompt_index)
        p = view.input_ids.shape[1] - completion_length
        comp = view.attention_mask[:, p:].bool()
        if completion_length > 1 and bool((comp[:, 1:] & ~comp[:, :-1]).any()):
            return  # a completion hides a token before a visible one: its micro-batch runs on its own
        if int(runs[1].max()) == 1 or not prefix.prompts_shared(view.input_ids, view.attention_mask,
                                                                 view.mm_token_type_ids, view.position_ids, None,
                                                                 runs, p):
            return
        prompts = prefix.pack_split(view.input_ids, view.attention_mask, view.mm_token_type_ids, view.position_ids,
                                    None, view.prompt_index, runs, completion_length, part="prompts")
        if prompts is None:
            return
        self.cache = attention.PromptCache()
        split = replace(prompts.split, cache=self.cache)
        hidden = decoder_hidden(model, prompts.input_ids, None, prompts.position_ids, prompts.mm_token_type_ids,
                                prompts.media_index, features, split=split)
        self.cache.freeze()
        self.last = hidden[0, prompts.gather[:, 0]]  # [B', H] each prompt's last state (predicts token 0)
        self.last_leaf = self.last.detach().requires_grad_(self.last.requires_grad)
        self.group_of_row = torch.repeat_interleave(torch.arange(runs[0].shape[0], device=runs[0].device),
                                                    runs[1])  # [N]

    def __iter__(self):
        n = self.view.input_ids.shape[0]
        for start in range(0, n, self.size):
            rows = slice(start, start + self.size)
            view = self.view.rows(rows)
            if self.cache is None:
                yield rows, completion_hidden(self.model, view, self.features, self.t)
                continue
            group = self.group_of_row[rows]  # [m] global group of each row
            runs = prefix.group_runs(group)
            packed = prefix.pack_split(view.input_ids, view.attention_mask, view.mm_token_type_ids,
                                       view.position_ids, None, view.prompt_index, runs, self.t, part="completions",
                                       cached=group[runs[0]].tolist())
            assert packed is not None  # (completion masks checked in __init__)
            split = replace(packed.split, cache=self.cache)
            hidden = decoder_hidden(self.model, packed.input_ids, None, packed.position_ids,
                                    packed.mm_token_type_ids, packed.media_index, self.features, split=split)
            rest = hidden.flatten(0, 1)[packed.gather[:, 1:]]  # [m, T - 1, H]
            yield rows, torch.cat([self.last_leaf[group].unsqueeze(1), rest], 1)

    def finish(self) -> None:
        """Backward through the prompts' pass of the gradients its leaves received (no-op without a cache)."""
        if self.cache is None:
            return
        tensors, grads = self.cache.gradients()
        if self.last_leaf.grad is not None:
            tensors.append(self.last)
            grads.append(self.last_leaf.grad)
        if tensors:
            torch.autograd.backward(tensors, grads)
        self.cache = None


def _attention(model: nn.Module) -> str:
    return core(model).model.language_model.config._attn_implementation


def decoder_hidden(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor,
                   mm_token_type_ids: Tensor, media_index: Tensor, features: VisionFeatures,
                   zero_vision: Tensor | None = None, split: prefix.SplitLayout | None = None) -> Tensor:
    """The decoder trunk's final hidden states `[R, S, H]` for R rows: `attention_mask` `[R, S]`, or a 4D bool
    mask `[R, 1, S, S]` (True = attend), or None with a `split` layout (one packed row, `ktr.model.attention`).
    The vision placeholders take the features of `media_index` `[M]` (the prompt of each block, in order)."""
    embeds = sequence_embeddings(model, input_ids, features, media_index, mm_token_type_ids, zero_vision)
    lm = core(model).model.language_model
    extra = {}
    if media_index.numel():
        extra = family_of(model).decoder_kwargs(model, mm_token_type_ids, media_index, features, zero_vision)
    if split is not None:
        attention.install()
        attention_mask = attention.split_marker(embeds.device)
        extra[attention.SPLIT_KWARG] = split
    elif attention_mask.dim() == 4 and _attention(model) == "eager":
        attention_mask = prefix.additive_mask(attention_mask, embeds.dtype)
    out = lm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
             **extra)
    return out.last_hidden_state


def output_projection(model: nn.Module) -> nn.Module:
    """The `lm_head` module (its weight may be sharded or 4-bit; callers go through ktr.fused)."""
    return core(model).lm_head


_FLOAT32_LOGITS = "ktr_float32_logits"  # attribute of the output projection module (`policy.head_logits`)


def set_head_logits(model: nn.Module, mode: str) -> None:
    """`policy.head_logits` on `model`: `float32` rounds the output projection's low-precision (bf16) product to
    float32 only, `compute` to the compute dtype first, as transformers' `lm_head` (and the released code) does.
    Kept on the projection module, so that the reference copy, LoRA wrapping and FSDP2 sharding carry it."""
    if mode not in ("float32", "compute"):
        raise ValueError(f"policy.head_logits must be float32 or compute, got {mode!r}")
    setattr(output_projection(model), _FLOAT32_LOGITS, mode == "float32")


def float32_logits(model: nn.Module) -> bool:
    """Whether ktr's log-prob and score projections of `model` round to float32 only (`set_head_logits`); a model
    ktr did not load computes them as `F.linear` does."""
    return bool(getattr(output_projection(model), _FLOAT32_LOGITS, False))


def completion_logps(model: nn.Module, hidden: Tensor, completion_ids: Tensor, valid: Tensor,
                     chunk_size: int | None = DEFAULT_CHUNK_SIZE,
                     with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """Log-probs `[N, T]` of the sampled tokens (and full-vocabulary entropy `[N, T]`, no grad) from `hidden`.

    `chunk_size=None` is the naive path (full logits), kept for comparison and tests; otherwise the output
    projection runs in token chunks (`ktr.fused`), only on `valid` tokens, never materialising `[N, T, V]`.
    The logits' rounding follows `policy.head_logits` (`float32_logits`).
    Positions outside `valid` hold 0.
    """
    from ktr import fused

    head, f32 = output_projection(model), float32_logits(model)
    if chunk_size is None:
        logps, ent = fused.naive_token_logps_entropy(hidden, head.weight, completion_ids, bias=head.bias,
                                                     with_entropy=with_entropy, float32_logits=f32)
        zero = torch.zeros((), dtype=logps.dtype, device=logps.device)
        return logps.where(valid, zero), (ent.where(valid, zero) if ent is not None else None)
    fn = partial(fused.token_logps_entropy, tokens=completion_ids, mask=valid, chunk_size=chunk_size,
                 with_entropy=with_entropy, float32_logits=f32)
    return fused.call_with_head(head, hidden, fn)
