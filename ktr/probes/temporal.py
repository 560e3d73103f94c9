"""Temporal-aware probe: `s_T = log p(y | frames) - log p(y | perturbed frames)` (layer L2, docs/method.md section 1.2).

The decoded frames are permuted *before* patching (so the two frames of a temporal patch are mixed too) and
re-encoded by the vision tower: once per prompt, not once per completion. The prompt's text is untouched, so on
Qwen3-VL the `<t seconds>` timestamps stay in their original order while the frames under them move (the model
sees the wrong frame at each labelled time: the counterfactual for frame order), and the deepstack features
come from the same re-encoding as the main ones. Image rows get the identity and a
score of exactly 0 (they are excluded from temporal selection). Every call runs exactly one vision-tower
call and one decoder pass over all rows, whatever the mix of images and videos, so ranks stay in step.

Permutations (registry `TEMPORAL_PERTURBATIONS`) draw from the global torch RNG by default: one uniform
permutation per video per step, reproducible under `seed_everything`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from torch import Tensor, nn

from ktr.config import DEFAULT_CHUNK_SIZE
from ktr.data.processor import VisionLanguageProcessor
from ktr.model.forward import SequenceView, VisionFeatures, completion_hidden, encode_media
from ktr.probes.compare import compare_passes
from ktr.types import PromptBatch

# num_frames, generator -> permutation [F] long
FramePermutation = Callable[[int, torch.Generator | None], Tensor]


def _shuffle(n: int, gen: torch.Generator | None) -> Tensor:
    return torch.randperm(n, generator=gen)


def _reverse(n: int, gen: torch.Generator | None) -> Tensor:
    return torch.arange(n - 1, -1, -1)


def segment_permutation(n: int, gen: torch.Generator | None, segment: int = 4) -> Tensor:
    """Permute consecutive segments of `segment` frames (the last one may be shorter), order kept inside."""
    blocks = list(torch.arange(n).split(segment))
    order = torch.randperm(len(blocks), generator=gen).tolist()
    return torch.cat([blocks[i] for i in order])


def patch_permutation(n: int, gen: torch.Generator | None, patch: int = 2) -> Tensor:
    """Permute whole temporal patches (`patch` consecutive frames: 2 in Qwen2/2.5/3-VL), never the identity
    when there are two patches or more. Unlike `shuffle`, no patch mixes frames of different moments, so the
    perturbed clip is one the vision tower could have seen: only the order of what is shown changes."""
    blocks = list(torch.arange(n).split(patch))
    m = len(blocks)
    order = torch.randperm(m, generator=gen)
    if m > 1 and torch.equal(order, torch.arange(m)):  # a draw of the identity becomes the rotation by one patch
        order = torch.roll(order, 1)
    return torch.cat([blocks[i] for i in order.tolist()])


def _identity(n: int, gen: torch.Generator | None) -> Tensor:
    return torch.arange(n)


TEMPORAL_PERTURBATIONS: dict[str, FramePermutation] = {
    "shuffle": _shuffle,
    "reverse": _reverse,
    "segment_shuffle": segment_permutation,
    "patch_shuffle": patch_permutation,
    "identity": _identity,
}


def get_temporal_perturbation(name: str) -> FramePermutation:
    if name not in TEMPORAL_PERTURBATIONS:
        raise ValueError(f"unknown temporal perturbation {name!r}; valid: {sorted(TEMPORAL_PERTURBATIONS)}")
    return TEMPORAL_PERTURBATIONS[name]


def perturbed_features(model: nn.Module, processor: VisionLanguageProcessor, batch: PromptBatch,
                       features: VisionFeatures, perturbation: str,
                       generator: torch.Generator | None = None) -> VisionFeatures:
    """Features with every video's frames permuted and re-encoded; images keep their features.

    One vision-tower call: the permuted videos, or, on a batch without videos, the images (identity), so that
    every rank makes the same call.
    """
    permute = get_temporal_perturbation(perturbation)
    is_video = [m.kind == "video" for m in batch.media]
    chosen = [i for i, v in enumerate(is_video) if v] or list(range(len(batch.media)))
    frames = [batch.media[i].frames[permute(len(batch.media[i].frames), generator)] if is_video[i]
              else batch.media[i].frames for i in chosen]
    sub = _select(batch, chosen)
    pixels, grids = processor.repatch(sub, frames)
    fresh = encode_media(model, pixels.to(batch.pixel_values.device), grids.to(batch.grid_thw.device))
    return features.with_prompts(chosen, fresh)  # deepstack features (Qwen3-VL) replaced alongside


def _select(batch: PromptBatch, idx: list[int]) -> PromptBatch:
    return replace(batch, grid_thw=batch.grid_thw[idx], media=[batch.media[i] for i in idx])


@torch.no_grad()
def temporal_scores(model: nn.Module, processor: VisionLanguageProcessor, batch: PromptBatch,
                    view: SequenceView, features: VisionFeatures, completion_ids: Tensor, valid: Tensor,
                    base_logps: Tensor, perturbation: str = "shuffle", chunk_size: int | None = DEFAULT_CHUNK_SIZE,
                    generator: torch.Generator | None = None, score: str = "logp_diff",
                    base_hidden: Tensor | None = None, draws: int = 1) -> Tensor:
    """`s_T` `[N, T]`: 0 outside `valid` and on image rows. `score` / `base_hidden` / `draws` as in
    `visual_scores` (each draw: a fresh permutation, one vision call and one decoder pass)."""
    s = None
    for _ in range(draws):
        feats = perturbed_features(model, processor, batch, features, perturbation, generator)
        hidden = completion_hidden(model, view, feats, completion_ids.shape[1])
        d = compare_passes(model, score, base_logps, base_hidden, hidden, completion_ids, valid, chunk_size)
        s = d if s is None else s + d
    s = s / draws
    video_rows = batch.is_video[view.prompt_index].unsqueeze(-1)  # [N, 1]
    return s.masked_fill(~(valid & video_rows), 0.0)
