"""Visual-aware probe: `s_V = log p(y | video) - log p(y | video hidden)` (layer L2, docs/method.md section 1.1).

Perturbations (registry `VISUAL_PERTURBATIONS`) edit a copy of the sequence view; the vision features are
reused, so this probe never calls the vision tower.
- `attention_mask` (released): attention mask 0 on every vision placeholder; 3D positions are recomputed from
  the mask, so the text after the media is re-indexed as if the media were absent. By default
  (`key_tokens.visual_hidden: drop`) the hidden tokens are then removed from the rows instead of masked, the text
  keeping those positions, in the packed split layout (`ktr.model.prefix.pack_split`) and the naive one
  (`ktr.model.prefix.drop_hidden`): the pass runs the ~200-token text prompt only. On attention-only decoders
  that equals masking up to rounding (no token may attend to a hidden one, nothing reads a hidden token's output);
  on Qwen3.5's DeltaNet layers it is the clean counterfactual that masking is not. `visual_hidden: mask` runs the
  released masked pass literally (naive layout).
  The text around the media stays visible, so on Qwen3-VL the `<t seconds>` timestamps and the per-frame vision
  start/end tokens stay (they carry no visual content; this is the default).
- `attention_mask_block`: as `attention_mask`, but the whole media block the processor laid out is hidden
  (`PromptBatch.media_block`; Qwen3-VL: the timestamps and per-frame start/end tokens too; Qwen2.5-VL: the
  vision start/end pair), positions recomputed the same way (and dropped from the split row the same way).
- `zero_embeddings`: vision embeddings set to zero, mask and positions kept (Qwen3-VL: the deepstack features
  at those positions are zeroed too, by the family's `decoder_kwargs`).
- `random_half`: a random half of each row's vision tokens masked out, positions kept.
- `swap_media`: each prompt's media replaced by another prompt's of the same kind and grid in the batch (the
  features are read through a permuted `prompt_index`: a rotation among the prompts sharing a grid), text, mask
  and positions kept, so the model sees a real clip of the right shape, only the wrong one: the in-distribution
  counterfactual of "what does the video say". Prompts without such a partner (e.g. one prompt per rank) get
  `zero_embeddings` instead. Draw d (`draws` > 1) rotates by 1 + d modulo (set size - 1): each draw another clip.
- `identity`: nothing hidden (scores are exactly zero; for tests and sanity checks).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from torch import Tensor, nn

from ktr.config import DEFAULT_CHUNK_SIZE
from ktr.model.forward import SequenceView, VisionFeatures, completion_hidden, rope_positions
from ktr.probes.compare import compare_passes
from ktr.types import PromptBatch

# view, model, batch, generator, draw -> (perturbed view, zero-vision mask [N, S] or None); `draw` (0, 1, ...)
# numbers the draws of one probe (`SignalConfig.draws`): only `swap_media` reads it
VisualPerturbation = Callable[[SequenceView, nn.Module, PromptBatch, torch.Generator | None, int],
                              tuple[SequenceView, Tensor | None]]


def _identity(view, model, batch, gen, draw=0):
    return view, None


def _attention_mask(view, model, batch, gen, draw=0):
    mask = view.attention_mask.masked_fill(view.mm_token_type_ids > 0, 0)  # [N, S]
    pos = rope_positions(model, view.input_ids, view.mm_token_type_ids, mask, batch, view.prompt_index)
    return replace(view, attention_mask=mask, position_ids=pos), None


def _attention_mask_block(view, model, batch, gen, draw=0):
    if batch.media_block is None:
        raise ValueError("attention_mask_block needs PromptBatch.media_block (set by VisionLanguageProcessor.collate)")
    block = torch.zeros_like(view.attention_mask, dtype=torch.bool)  # [N, S]
    block[:, : batch.media_block.shape[1]] = batch.media_block[view.prompt_index]  # prompt part; completions: none
    block |= view.mm_token_type_ids > 0
    mask = view.attention_mask.masked_fill(block, 0)
    pos = rope_positions(model, view.input_ids, view.mm_token_type_ids, mask, batch, view.prompt_index)
    return replace(view, attention_mask=mask, position_ids=pos), None


def _zero_embeddings(view, model, batch, gen, draw=0):
    return view, view.mm_token_type_ids > 0


def _random_half(view, model, batch, gen, draw=0):
    is_vision = view.mm_token_type_ids > 0  # [N, S]
    noise = torch.rand(is_vision.shape, generator=gen, device="cpu").to(is_vision.device)
    noise = noise.masked_fill(~is_vision, 2.0)
    # hide exactly floor(n/2) vision tokens per row: the lowest-noise half
    n_hide = is_vision.sum(-1, keepdim=True) // 2  # [N, 1]
    rank = noise.argsort(-1).argsort(-1)  # [N, S] rank of each position's noise
    hide = is_vision & (rank < n_hide)
    return replace(view, attention_mask=view.attention_mask.masked_fill(hide, 0)), None


def _swap_media(view, model, batch, gen, draw=0):
    b = len(batch.media)
    key = [(m.kind, tuple(batch.grid_thw[i].tolist())) for i, m in enumerate(batch.media)]
    other = list(range(b))
    for k in set(key):  # rotate each set of same-shaped prompts by 1 + draw (never 0): another prompt's media
        members = [i for i in range(b) if key[i] == k]
        if len(members) < 2:
            continue
        shift = 1 + draw % (len(members) - 1)
        for i, j in zip(members, members[shift:] + members[:shift]):
            other[i] = j
    other_t = torch.tensor(other, device=view.prompt_index.device)
    alone = (other_t == torch.arange(b, device=other_t.device))[view.prompt_index]  # [N] no partner
    zero = (view.mm_token_type_ids > 0) & alone.unsqueeze(-1) if bool(alone.any()) else None
    return replace(view, prompt_index=other_t[view.prompt_index]), zero


PER_ROW_PERTURBATIONS = frozenset({"random_half"})
"""Perturbations drawn per row, not per prompt: completions of one context get different perturbations there."""

VISUAL_PERTURBATIONS: dict[str, VisualPerturbation] = {
    "attention_mask": _attention_mask,
    "attention_mask_block": _attention_mask_block,
    "zero_embeddings": _zero_embeddings,
    "random_half": _random_half,
    "swap_media": _swap_media,
    "identity": _identity,
}


def get_visual_perturbation(name: str) -> VisualPerturbation:
    if name not in VISUAL_PERTURBATIONS:
        raise ValueError(f"unknown visual perturbation {name!r}; valid: {sorted(VISUAL_PERTURBATIONS)}")
    return VISUAL_PERTURBATIONS[name]


@torch.no_grad()
def visual_scores(model: nn.Module, batch: PromptBatch, view: SequenceView, features: VisionFeatures,
                  completion_ids: Tensor, valid: Tensor, base_logps: Tensor, perturbation: str = "attention_mask",
                  chunk_size: int | None = DEFAULT_CHUNK_SIZE, generator: torch.Generator | None = None,
                  score: str = "logp_diff",
                  base_hidden: Tensor | None = None, draws: int = 1, hidden: str = "drop") -> Tensor:
    """`s_V` `[N, T]` (0 outside `valid`). `base_logps` `[N, T]` are the policy's log-probs with the media seen;
    `score` names the comparison (`ktr.probes.scores`), `base_hidden` `[N, T, H]` is needed for a distance.
    `draws` > 1 averages the score over that many draws of the perturbation (one decoder pass each). `hidden`:
    `drop` removes the hidden tokens from the rows, `mask` masks them in the naive layout (the released pass)."""
    if hidden not in ("drop", "mask"):
        raise ValueError(f"hidden must be 'drop' or 'mask', got {hidden!r}")
    total = None
    for d in range(draws):
        perturbed, zero_vision = get_visual_perturbation(perturbation)(view, model, batch, generator, d)
        if hidden == "mask":
            perturbed = replace(perturbed, shared_prefix=False, drop_hidden=False)
        states = completion_hidden(model, perturbed, features, completion_ids.shape[1], zero_vision=zero_vision)
        s = compare_passes(model, score, base_logps, base_hidden, states, completion_ids, valid, chunk_size)
        total = s if total is None else total + s
    return total / draws
