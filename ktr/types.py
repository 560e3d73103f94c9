"""Tensor containers passed between data, rollout, probes and loss (layer L0).

Shapes: B prompts, G completions per prompt, N = B*G completion rows, L prompt length (left-padded),
T completion length (right-padded), S = L + T, P vision patches, D = 3 * temporal_patch * patch**2.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import Tensor

MediaKind = Literal["image", "video"]


@dataclass
class Media:
    """One decoded image or video, kept as frames so that temporal perturbations can re-patch it."""

    kind: MediaKind
    frames: Tensor  # [F, 3, H, W] uint8, resized (images: F = 1)
    sample_fps: float | None  # frames per second after sampling (videos only)
    path: str = ""
    frame_times: tuple[float, ...] | None = None  # [F] seconds of each sampled frame in the source (videos)


@dataclass
class PromptSample:
    """One dataset item ready for collation: tokenised prompt with expanded placeholders and its media."""

    row: dict
    prompt_ids: Tensor  # [L] long
    media: Media
    pixel_values: Tensor  # [P, D] float32
    grid_thw: Tensor  # [3] long
    target_ids: Tensor | None = None  # [T'] long, supervised target (SFT) incl. end-of-turn token
    media_block: Tensor | None = None  # [L] bool, the media's tokens incl. timestamps and vision start/end


@dataclass
class PromptBatch:
    """B prompts, left-padded, media of all prompts in prompt order (images and videos interleaved)."""

    rows: list[dict]
    input_ids: Tensor  # [B, L] long
    attention_mask: Tensor  # [B, L] long
    mm_token_type_ids: Tensor  # [B, L] int (0 text, 1 image, 2 video)
    media: list[Media]
    pixel_values: Tensor  # [sum P, D]
    grid_thw: Tensor  # [B, 3] long
    second_per_grid_ts: Tensor  # [B] float (0 for images)
    target_ids: Tensor | None = None  # [B, T'] long, right-padded with pad id (SFT)
    target_mask: Tensor | None = None  # [B, T'] bool
    media_block: Tensor | None = None  # [B, L] bool: each prompt's media block (placeholders, timestamps,
    # vision start/end tokens), what the visual probe's `attention_mask_block` hides

    @property
    def is_video(self) -> Tensor:  # [B] bool
        return torch.tensor([m.kind == "video" for m in self.media], device=self.grid_thw.device)

    def __len__(self) -> int:
        return len(self.rows)

    def to(self, device: torch.device | str) -> PromptBatch:
        move = {k: getattr(self, k).to(device) for k in
                ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "grid_thw",
                 "second_per_grid_ts")}
        for k in ("target_ids", "target_mask", "media_block"):
            if getattr(self, k) is not None:
                move[k] = getattr(self, k).to(device)
        return replace(self, **move)

    def hf_vision_kwargs(self) -> dict:
        """Split media into the image/video keyword arguments that Hugging Face's Qwen2.5-VL forward expects."""
        is_video = self.is_video
        sizes = self.grid_thw.prod(-1).tolist()
        chunks = torch.split(self.pixel_values, sizes)
        out: dict = {"mm_token_type_ids": self.mm_token_type_ids}
        if (~is_video).any():
            out["pixel_values"] = torch.cat([c for c, v in zip(chunks, is_video.tolist()) if not v])
            out["image_grid_thw"] = self.grid_thw[~is_video]
        if is_video.any():
            out["pixel_values_videos"] = torch.cat([c for c, v in zip(chunks, is_video.tolist()) if v])
            out["video_grid_thw"] = self.grid_thw[is_video]
            out["second_per_grid_ts"] = self.second_per_grid_ts[is_video]
        return out


@dataclass
class VisionFeatures:
    """Merged vision features of the B prompts' media, in prompt order.

    `deepstack` (Qwen3-VL) holds, per prompt, the features of each deepstack vision layer; the decoder adds
    layer l's to the hidden states of decoder layer l at the vision positions. None for families without it.
    """

    per_prompt: list[Tensor]  # B tensors [n_tokens_b, H]
    deepstack: list[list[Tensor]] | None = None  # B lists of L tensors [n_tokens_b, H]

    def tensors(self) -> list[Tensor]:
        """Every feature tensor, main then deepstack, in a fixed order (pairs with `detached().tensors()`)."""
        return list(self.per_prompt) + [t for d in (self.deepstack or []) for t in d]

    def detached(self, leaves: bool = True) -> VisionFeatures:
        """Detached copies, main and deepstack. `leaves`: keep `requires_grad` (micro-batches backpropagate into
        these, then once into the tower); otherwise plain constants."""
        leaf = lambda t: t.detach().requires_grad_(leaves and t.requires_grad)  # noqa: E731
        deep = [[leaf(t) for t in d] for d in self.deepstack] if self.deepstack is not None else None
        return VisionFeatures([leaf(t) for t in self.per_prompt], deep)

    def with_prompts(self, indices: list[int], fresh: VisionFeatures) -> VisionFeatures:
        """A copy whose prompts `indices` carry `fresh`'s features (main and deepstack alike), in that order."""
        per_prompt = list(self.per_prompt)
        deepstack = list(self.deepstack) if self.deepstack is not None else None
        for j, i in enumerate(indices):
            per_prompt[i] = fresh.per_prompt[j]
            if deepstack is not None:
                deepstack[i] = fresh.deepstack[j]
        return VisionFeatures(per_prompt, deepstack)


@dataclass
class Rollout:
    """N = B*G sampled completions; row i belongs to prompt i // G."""

    group_size: int
    input_ids: Tensor  # [N, S] prompt (left-padded) followed by completion (right-padded)
    attention_mask: Tensor  # [N, S] long
    mm_token_type_ids: Tensor  # [N, S] int
    completion_ids: Tensor  # [N, T] long
    completion_mask: Tensor  # [N, T] bool, valid up to and including the first end-of-sequence token
    texts: list[str] = field(default_factory=list)
    logps: Tensor | None = None  # [N, T] float32 the rollout engine's log-probs of the sampled tokens (vllm), 0
    # outside completion_mask; None when the rollout is the policy's own sampling (hf, shared)
    opened: str = ""  # text the generation prompt already opened for the assistant (Qwen3.5: "<think>\n")

    @property
    def assistant_texts(self) -> list[str]:
        """Each completion as the assistant's whole turn: `opened` + the completion (what the rewards read, so
        that a `<think>` block the chat template opened counts for the format reward)."""
        return [self.opened + t for t in self.texts]

    @property
    def prompt_length(self) -> int:
        return self.input_ids.shape[1] - self.completion_ids.shape[1]

    @property
    def prompt_index(self) -> Tensor:  # [N] long
        n = self.input_ids.shape[0]
        return torch.arange(n, device=self.input_ids.device) // self.group_size
