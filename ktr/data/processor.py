"""Turn decoded media + chat messages into exactly what Qwen2.5-VL's forward needs (torch only, layer L2).

Hugging Face's Qwen2-VL *video* processor requires torchvision; this one does not. Frames are patched by
`ktr.data.patches.patchify` (bit-identical to HF's image processor where no resize happens), the chat template
is rendered by the tokenizer, and each `<|image_pad|>`/`<|video_pad|>` is expanded to t*h*w/merge**2 tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ktr.data.patches import CLIP_MEAN, CLIP_STD, patchify
from ktr.types import Media, PromptBatch, PromptSample

_TEXT, _IMAGE, _VIDEO = 0, 1, 2


@dataclass(frozen=True)
class PatchSettings:
    """Vision patching constants of the checkpoint (Qwen2.5-VL defaults)."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD

    @classmethod
    def from_pretrained(cls, path: str | Path) -> PatchSettings:
        """Read `preprocessor_config.json` of a local checkpoint when present, else the Qwen2.5-VL defaults."""
        f = Path(path) / "preprocessor_config.json"
        if not f.is_file():
            return cls()
        cfg = json.loads(f.read_text())
        return cls(
            patch_size=cfg.get("patch_size", 14),
            temporal_patch_size=cfg.get("temporal_patch_size", 2),
            merge_size=cfg.get("merge_size", 2),
            image_mean=tuple(cfg.get("image_mean", CLIP_MEAN)),
            image_std=tuple(cfg.get("image_std", CLIP_STD)),
        )


class VisionLanguageProcessor:
    """Tokenise chat messages with media placeholders and patch the media.

    Args:
        tokenizer: a Qwen2/2.5 tokenizer with a chat template.
        image_token_id / video_token_id: placeholder ids, read from the model config by the caller.
    """

    def __init__(self, tokenizer, image_token_id: int, video_token_id: int,
                 patch: PatchSettings | None = None) -> None:
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.video_token_id = video_token_id
        self.patch = patch or PatchSettings()
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def patchify(self, media: Media) -> tuple[Tensor, Tensor]:
        """Patches `[P, D]` float32 and grid `(t, h, w)` `[3]` long of one image or video."""
        p = self.patch
        return patchify(media.frames, patch_size=p.patch_size, temporal_patch_size=p.temporal_patch_size,
                        merge_size=p.merge_size, mean=p.image_mean, std=p.image_std)

    def num_tokens(self, grid_thw: Tensor) -> int:
        return int(grid_thw.prod()) // self.patch.merge_size**2

    def encode(self, messages: list[dict], media: Media, row: dict | None = None,
               target: str | None = None) -> PromptSample:
        """One prompt: render the chat template (generation prompt appended), expand the placeholder, patch."""
        pixel_values, grid_thw = self.patchify(media)
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        placeholder = self.video_token_id if media.kind == "video" else self.image_token_id
        where = [i for i, t in enumerate(ids) if t == placeholder]
        if len(where) != 1:
            raise ValueError(f"expected exactly one {media.kind} placeholder in the prompt, found {len(where)}")
        k = where[0]
        ids = ids[:k] + [placeholder] * self.num_tokens(grid_thw) + ids[k + 1:]
        target_ids = None
        if target is not None:
            end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
            target_ids = torch.tensor(self.tokenizer(target, add_special_tokens=False)["input_ids"] + [end])
        return PromptSample(row=row or {}, prompt_ids=torch.tensor(ids, dtype=torch.long), media=media,
                            pixel_values=pixel_values, grid_thw=grid_thw, target_ids=target_ids)

    def token_types(self, input_ids: Tensor) -> Tensor:
        """`mm_token_type_ids` (0 text, 1 image, 2 video) for any `[..., S]` id tensor."""
        types = torch.zeros_like(input_ids, dtype=torch.int)
        types[input_ids == self.image_token_id] = _IMAGE
        types[input_ids == self.video_token_id] = _VIDEO
        return types

    def collate(self, samples: list[PromptSample], rope_time: str = "sampled") -> PromptBatch:
        """Left-pad prompts (generation appends on the right); right-pad SFT targets.

        `rope_time` (`VideoSettings.rope_time`): `sampled` gives videos `second_per_grid_ts = temporal_patch /
        sample_fps`; `released` gives 1.0, which is exactly transformers' value when the key is absent (its
        `get_rope_index` then uses 1 per video), so every pass and `generate` behave as the released trainer.
        """
        if rope_time not in ("sampled", "released"):
            raise ValueError(f"rope_time must be 'sampled' or 'released', got {rope_time!r}")
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        length = max(len(s.prompt_ids) for s in samples)
        ids = torch.full((len(samples), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(samples), length), dtype=torch.long)
        for i, s in enumerate(samples):
            ids[i, length - len(s.prompt_ids):] = s.prompt_ids
            mask[i, length - len(s.prompt_ids):] = 1
        spg = [(1.0 if rope_time == "released" else self.patch.temporal_patch_size / s.media.sample_fps)
               if s.media.kind == "video" else 0.0 for s in samples]
        batch = PromptBatch(
            rows=[s.row for s in samples], input_ids=ids, attention_mask=mask,
            mm_token_type_ids=self.token_types(ids), media=[s.media for s in samples],
            pixel_values=torch.cat([s.pixel_values for s in samples]),
            grid_thw=torch.stack([s.grid_thw for s in samples]),
            second_per_grid_ts=torch.tensor(spg, dtype=torch.float32),
        )
        if all(s.target_ids is not None for s in samples):
            t = max(len(s.target_ids) for s in samples)
            batch.target_ids = torch.full((len(samples), t), self.pad_token_id, dtype=torch.long)
            batch.target_mask = torch.zeros((len(samples), t), dtype=torch.bool)
            for i, s in enumerate(samples):
                batch.target_ids[i, : len(s.target_ids)] = s.target_ids
                batch.target_mask[i, : len(s.target_ids)] = True
        return batch

    def repatch(self, batch: PromptBatch, frames: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Patch replacement frames (one `[F, 3, H, W]` per prompt, same sizes) -> `[sum P, D]`, `[B, 3]`."""
        out = [patchify(f, patch_size=self.patch.patch_size, temporal_patch_size=self.patch.temporal_patch_size,
                        merge_size=self.patch.merge_size, mean=self.patch.image_mean, std=self.patch.image_std)
               for f in frames]
        pixels, grids = zip(*out)
        grids = torch.stack(grids)
        if not torch.equal(grids, batch.grid_thw.cpu()):
            raise ValueError("re-patched frames changed the vision grid; perturbations must keep frame count and size")
        return torch.cat(pixels), grids
