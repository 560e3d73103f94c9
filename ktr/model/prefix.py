"""Shared prompt prefix for the scoring passes: each prompt is run once per group, not G times (layer L1).

The naive layout runs the decoder on N = B*G rows of L + T tokens, so every pass computes each prompt G
times. Here the rows of one group are packed after one copy of their prompt:

    [ prompt (L) | completion 1 (T) | completion 2 (T) | ... | completion G (T) ]

Every token keeps its naive 3D rotary position (the prompt's from the group's first row, completion g's from
row g). The prompt attends causally to its visible tokens once; a token of completion g attends to the prompt's
visible tokens and to the earlier tokens of completion g only, exactly the keys and values it sees in the naive
layout, so log-probs and gradients are equal up to floating-point rounding. The decoder processes B*L + N*T
tokens instead of N*(L + T). Two forms, index maths only here:

- `pack_split` (the default with SDPA or flash-attention): all groups one after another in ONE row, the prompt
  reduced to its visible tokens (left padding and tokens hidden by the pass, e.g. the visual probe's media, are
  dropped, not masked: nobody may attend to them and nothing reads their outputs). No mask is built: a
  `SplitLayout` (offsets, Python ints) tells `ktr.model.attention` where each group's prompt and completions are,
  and attention runs per group as a causal prompt block plus each completion against [prompt K/V; its own K/V]
  (lower-right causal), so its cost is the pairs needed, P^2/2 + G*T*(P + T/2) per group, whatever the mix of
  prompt lengths in the batch.
- `pack_groups` (eager attention, the test oracle; or SDPA with `SequenceView.prefix_attention = "dense"`, for
  comparison): one row per group of width W = L + K*T (prompts left-padded to the batch's L) and a dense
  `[W, W]` mask; attention computes all W^2 pairs and drops the masked ones.

Both are one ordinary forward over the packed rows (no key/value cache is threaded through the model), so
gradient checkpointing, FSDP2 sharding, LoRA/QLoRA and the chunked output projection see a plain forward and
need nothing special; autograd sums the prompt's key/value gradients over its completions.

A pass shares only when the rows of each group have identical prompt parts (ids, mask, positions, zeroed
vision): true for the policy, reference, temporal and the `attention_mask`/`zero_embeddings` visual probes;
`random_half` hides a different half per row and so runs naive. Micro-batches smaller than a group
(`loss.micro_batch_size` < G) run each prompt once with split attention (`pack_split(part="prompts")`, then
`part="completions"` per micro-batch reading the prompts' cached keys and values: `ktr.model.forward.MicroBatches`);
in the dense layout each micro-batch packs its own copy of the prompt (G/m copies per group).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

@dataclass(frozen=True)
class SplitGroup:
    """One group in a split packed row: `prompt` visible prompt tokens from `start`, then `completions` x `length`.
    `cached` >= 0: the prompt is not in the row (`prompt` 0); its keys and values at every layer are entry `cached`
    of the layout's `cache` (`ktr.model.attention.PromptCache`, a micro-batch after the prompts' own pass)."""

    start: int
    prompt: int
    completions: int
    length: int
    cached: int = -1

    @property
    def end(self) -> int:
        return self.start + self.prompt + self.completions * self.length


@dataclass(frozen=True)
class SplitLayout:
    """Where each group of the one packed row lies (Python ints: the attention reads them without a device sync)."""

    groups: tuple[SplitGroup, ...]
    cache: Any = field(default=None, compare=False)  # a `ktr.model.attention.PromptCache` (records or serves K/V)

    @property
    def width(self) -> int:
        return self.groups[-1].end if self.groups else 0

    def dense_mask(self, device: torch.device | str = "cpu") -> Tensor:
        """`[W, W]` bool (True = attend): the same attention as a dense mask (tests, benchmarks)."""
        if any(g.cached >= 0 for g in self.groups):
            raise ValueError("a layout whose prompts are cached has no dense form")
        w = self.width
        segment = torch.full((w,), -1, dtype=torch.long)  # -1: prompt; m: completion m of its group
        group = torch.zeros(w, dtype=torch.long)
        for i, g in enumerate(self.groups):
            group[g.start:g.end] = i
            c = g.start + g.prompt
            segment[c:g.end] = torch.arange(g.completions).repeat_interleave(g.length)
        pos = torch.arange(w)
        causal = pos.unsqueeze(1) >= pos.unsqueeze(0)
        same = (group.unsqueeze(1) == group.unsqueeze(0)) & ((segment.unsqueeze(0) == -1)
                                                               | (segment.unsqueeze(0) == segment.unsqueeze(1)))
        return (causal & same).to(device)

    def pairs(self) -> int:
        """Query-key pairs the split attention computes (causal pairs only)."""
        return sum(g.prompt * (g.prompt + 1) // 2 + g.completions * (g.length * g.prompt + g.length * (g.length + 1)
                                                                     // 2) for g in self.groups)


@dataclass
class PackedRows:
    """R packed rows and how to read the N rows back: R = B' rows of width L + K*T with a dense mask
    (`pack_groups`), or one row of all groups with a `SplitLayout` and no mask (`pack_split`)."""

    input_ids: Tensor  # [R, W]
    mm_token_type_ids: Tensor  # [R, W]
    position_ids: Tensor  # [3, R, W]
    attention_mask: Tensor | None  # [R, 1, W, W] bool, True = attend (dense); None (split)
    prompt_index: Tensor  # [B'] the prompt of each group, in packed order
    media_index: Tensor  # [M] the prompt whose vision features fill each block of placeholders, in packed order
    zero_vision: Tensor | None  # [R, W] bool or None
    gather: Tensor  # [N, T] long: flat index into [R * W] of the hidden state predicting each completion token
    split: SplitLayout | None = None

    @property
    def tokens(self) -> int:
        """Positions the decoder runs on (padding of the packed layout included)."""
        return self.input_ids.numel()


def group_runs(prompt_index: Tensor) -> tuple[Tensor, Tensor]:
    """Start row `[B']` and size `[B']` of each run of consecutive rows with the same prompt."""
    n = prompt_index.shape[0]
    change = torch.ones(n, dtype=torch.bool, device=prompt_index.device)
    change[1:] = prompt_index[1:] != prompt_index[:-1]
    starts = change.nonzero().flatten()  # [B']
    ends = torch.cat([starts[1:], starts.new_tensor([n])])
    return starts, ends - starts


Runs = tuple[Tensor, Tensor]  # (start row [B'], size [B']) of each run, from `group_runs`


def prompts_shared(input_ids: Tensor, attention_mask: Tensor, mm_token_type_ids: Tensor, position_ids: Tensor,
                   zero_vision: Tensor | None, runs: Runs, prompt_length: int) -> bool:
    """Whether every row's prompt part (first `prompt_length` tokens) equals its run's first row's."""
    starts, sizes = runs
    first = torch.repeat_interleave(starts, sizes)  # [N] first row of each row's run
    p = prompt_length
    same = [(t[:, :p] == t[first, :p]).all() for t in (input_ids, attention_mask, mm_token_type_ids)]
    same.append((position_ids[:, :, :p] == position_ids[:, first, :p]).all())
    if zero_vision is not None:
        same.append((zero_vision[:, :p] == zero_vision[first, :p]).all())
    return bool(torch.stack(same).all())


def pack_groups(input_ids: Tensor, attention_mask: Tensor, mm_token_type_ids: Tensor, position_ids: Tensor,
                zero_vision: Tensor | None, prompt_index: Tensor, runs: Runs, completion_length: int) -> PackedRows:
    """Pack N rows `[N, S]` (S = L + T; prompt parts equal within each of the `runs`, see `prompts_shared`) into
    B' rows of width W = L + K*T with a dense `[W, W]` mask (hidden keys masked, not dropped)."""
    n, s = input_ids.shape
    t = completion_length
    p = s - t
    starts, sizes = runs
    b, k = starts.shape[0], int(sizes.max())
    w = p + k * t
    dev = input_ids.device
    member = torch.arange(n, device=dev) - torch.repeat_interleave(starts, sizes)  # [N] place in its run
    run = torch.repeat_interleave(torch.arange(b, device=dev), sizes)  # [N] packed row of each row

    def pack(x: Tensor, fill) -> Tensor:  # x [N, S, ...] -> [B', W, ...]
        out = x.new_full((b, w) + x.shape[2:], fill)
        out[:, :p] = x[starts, :p]
        seg = out[:, p:].view((b, k, t) + x.shape[2:])
        seg[run, member] = x[:, p:]
        return out

    visible = pack(attention_mask.bool(), False)  # [B', W] keys that may be attended to
    segment = torch.full((w,), -1, dtype=torch.long, device=dev)  # -1: prompt; g: completion g
    segment[p:] = torch.arange(k, device=dev).repeat_interleave(t)
    pos = torch.arange(w, device=dev)
    causal = pos.unsqueeze(1) >= pos.unsqueeze(0)  # [W(q), W(k)]
    same_seg = (segment.unsqueeze(0) == -1) | (segment.unsqueeze(0) == segment.unsqueeze(1))
    allowed = (causal & same_seg).unsqueeze(0) & visible.unsqueeze(1)  # [B', W, W]
    allowed |= torch.eye(w, dtype=torch.bool, device=dev)  # every query sees itself: no empty rows, no NaN
    packed_pos = position_ids.new_zeros((3, b, w))
    packed_pos[:, :, :p] = position_ids[:, starts, :p]
    packed_pos[:, :, p:].view(3, b, k, t)[:, run, member] = position_ids[:, :, p:]
    # completion token j is predicted at the prompt's last position (j = 0) or at completion position j - 1
    j = torch.arange(t, device=dev)
    col = torch.where(j == 0, p - 1, p + member.unsqueeze(1) * t + j - 1)  # [N, T]
    has_media = (mm_token_type_ids[starts, :p] > 0).any(-1)  # [B'] groups whose prompt holds placeholders
    return PackedRows(input_ids=pack(input_ids, 0), mm_token_type_ids=pack(mm_token_type_ids, 0),
                      position_ids=packed_pos, attention_mask=allowed.unsqueeze(1),
                      prompt_index=prompt_index[starts], media_index=prompt_index[starts][has_media],
                      zero_vision=None if zero_vision is None else pack(zero_vision, False),
                      gather=run.unsqueeze(1) * w + col)


def additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A bool mask (True = attend) as the additive float mask eager attention adds to its scores."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


PackPart = Literal["both", "prompts", "completions"]


def pack_split(input_ids: Tensor, attention_mask: Tensor, mm_token_type_ids: Tensor, position_ids: Tensor,
               zero_vision: Tensor | None, prompt_index: Tensor, runs: Runs, completion_length: int,
               part: PackPart = "both", cached: list[int] | None = None) -> PackedRows | None:
    """Pack N rows `[N, S]` (prompt parts equal within each of the `runs`) into one row: per group its visible
    prompt tokens, then its completions of T tokens each; `split` says where each group lies.

    `part="prompts"`: the prompts only (each group with no completion; `gather` `[B', 1]` is each prompt's last
    position, the state that predicts a completion's first token). `part="completions"`: the completions only,
    run `b`'s prompt being entry `cached[b]` of a `PromptCache` filled by a prompts pass (`gather`'s column 0,
    that prompt's last state, is not in the row: the caller fills it).

    None where dropping hidden tokens would not be exact: a completion whose mask is not a visible prefix (the
    causal block would see a hidden token), a group whose last prompt token (it predicts the first completion
    token) is hidden, or a group that hides only part of its media (its vision features could not be split).
    """
    n, s = input_ids.shape
    t = completion_length
    p = s - t
    dev = input_ids.device
    mask = attention_mask.bool()
    comp = mask[:, p:]
    with_prompts, with_completions = part != "completions", part != "prompts"
    if with_completions and t > 1 and bool((comp[:, 1:] & ~comp[:, :-1]).any()):
        return None
    starts, sizes = runs
    keep = mask[starts, :p]  # [B', P] visible prompt tokens of each group
    vision = mm_token_type_ids[starts, :p] > 0
    seen, hidden = (vision & keep).any(-1), (vision & ~keep).any(-1)  # [B']
    if with_prompts and (not bool(keep[:, -1].all()) or bool((seen & hidden).any())):
        return None
    lengths = keep.sum(-1) if with_prompts else torch.zeros_like(sizes)  # [B'] prompt tokens in the row
    cols = torch.arange(p, device=dev)
    tail = torch.arange(p, s, device=dev)
    pieces, groups, offset = [], [], 0
    for b, (r0, k, length) in enumerate(zip(starts.tolist(), sizes.tolist(), lengths.tolist())):
        if with_prompts:
            pieces.append(r0 * s + cols[keep[b]])
        if with_completions:
            pieces.append((torch.arange(r0, r0 + k, device=dev).unsqueeze(1) * s + tail).flatten())
        k = k if with_completions else 0
        groups.append(SplitGroup(offset, length, k, t, -1 if with_prompts else cached[b]))
        offset += length + k * t
    src = torch.cat(pieces)  # [W] flat index into [N * S]

    def pack(x: Tensor) -> Tensor:  # [N, S] -> [1, W]
        return x.flatten(0, 1)[src].unsqueeze(0)

    first = torch.tensor([g.start + g.prompt for g in groups], device=dev)  # [B'] first completion position
    if not with_completions:
        gather = (first - 1).unsqueeze(1)  # [B', 1]
    else:
        member = torch.arange(n, device=dev) - torch.repeat_interleave(starts, sizes)  # [N] place in its run
        base = torch.repeat_interleave(first, sizes).unsqueeze(1)  # [N, 1]
        j = torch.arange(t, device=dev)
        gather = torch.where(j == 0, base - 1, base + member.unsqueeze(1) * t + j - 1).clamp(min=0)  # [N, T]
    has_media = seen if with_prompts else torch.zeros_like(seen)
    return PackedRows(input_ids=pack(input_ids), mm_token_type_ids=pack(mm_token_type_ids),
                      position_ids=position_ids.flatten(1, 2)[:, src].unsqueeze(1), attention_mask=None,
                      prompt_index=prompt_index[starts], media_index=prompt_index[starts][has_media],
                      zero_vision=None if zero_vision is None else pack(zero_vision), gather=gather,
                      split=SplitLayout(tuple(groups)))


def drop_hidden(input_ids: Tensor, attention_mask: Tensor, mm_token_type_ids: Tensor, position_ids: Tensor,
                zero_vision: Tensor | None, completion_length: int
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None] | None:
    """The naive layout's N rows with the prompt tokens a pass hides removed rather than masked (the visual probe's
    media): each row's visible prompt tokens, left-padded to the longest, then its completion part unchanged; every
    kept token keeps its position (the perturbation's re-indexed one). Returns `(input_ids, attention_mask,
    mm_token_type_ids, position_ids, zero_vision)` or None where nothing is hidden after a visible token (left
    padding only), or where dropping would not be exact: a row whose last prompt token is hidden (its output
    predicts the first completion token) or that hides only part of its media (its vision features could not be
    split).

    On an attention-only decoder removing a masked token changes nothing (no query attends to it, nothing reads its
    output) beyond rounding; on a decoder whose layers carry a state along the row (Qwen3.5's Gated DeltaNet) a
    masked token is not absent (it still decays the state and enters the short convolution), so removal is what
    makes the counterfactual clean (docs/qwen35.md).
    """
    s = input_ids.shape[1]
    p = s - completion_length
    keep = attention_mask[:, :p].bool()  # [N, P]
    hidden_inside = keep.long().cummax(-1).values.bool() & ~keep  # [N, P] hidden after a visible token
    if not bool(hidden_inside.any()):
        return None
    vision = mm_token_type_ids[:, :p] > 0
    partial = (vision & keep).any(-1) & (vision & ~keep).any(-1)  # [N]
    if not bool(keep[:, -1].all()) or bool(partial.any()):
        return None
    counts = keep.sum(-1)  # [N]
    width = int(counts.max())
    n = input_ids.shape[0]
    rows = torch.arange(n, device=input_ids.device).unsqueeze(1).expand(n, p)[keep]  # [K] row of each kept token
    cols = (width - counts).unsqueeze(1) + keep.long().cumsum(-1) - 1  # [N, P] its column in the new prompt part
    cols = cols[keep]  # [K]

    def compact(x: Tensor, fill) -> Tensor:  # x [N, S, ...] -> [N, width + T, ...]
        out = x.new_full((n, width, *x.shape[2:]), fill)
        out[rows, cols] = x[:, :p][keep]
        return torch.cat([out, x[:, p:]], 1)

    mask = torch.cat([torch.arange(width, device=keep.device).unsqueeze(0) >= (width - counts).unsqueeze(1),
                      attention_mask[:, p:].bool()], 1).to(attention_mask.dtype)
    pos = compact(position_ids.permute(1, 2, 0), 0).permute(2, 0, 1)  # [3, N, width + T]
    return (compact(input_ids, 0), mask, compact(mm_token_type_ids, 0), pos,
            None if zero_vision is None else compact(zero_vision, False))
