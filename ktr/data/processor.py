"""Turn decoded media + chat messages into exactly what a Qwen-VL forward needs (torch only, layer L2).

Hugging Face's Qwen2-VL / Qwen3-VL *video* processors require torchvision; this one does not. Frames are patched
by `ktr.data.patches.patchify` (bit-identical to HF's image processor where no resize happens), the chat
template is rendered by the tokenizer, and each `<|image_pad|>`/`<|video_pad|>` is expanded to t*h*w/merge**2
tokens. With `VideoLayout(timestamps=True)` (Qwen3-VL) a video becomes, per temporal patch,
`<t.t seconds><|vision_start|><|video_pad|>*(h*w/merge**2)<|vision_end|>`, the time being the mean of the
patch's first and last source-frame times (`Qwen3VLProcessor._calculate_timestamps`). The layouts are ktr's own
(`VideoLayout`): they do not follow whichever transformers is installed, whose Qwen3-VL processor changed its
video layout twice in 5.x (docs/qwen3vl.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

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
    def from_pretrained(cls, path: str | Path, default: PatchSettings | None = None) -> PatchSettings:
        """Read `preprocessor_config.json` of a local checkpoint when present, else `default` (the family's)."""
        d = default or cls()
        f = Path(path) / "preprocessor_config.json"
        if not f.is_file():
            return d
        cfg = json.loads(f.read_text())
        return cls(
            patch_size=cfg.get("patch_size", d.patch_size),
            temporal_patch_size=cfg.get("temporal_patch_size", d.temporal_patch_size),
            merge_size=cfg.get("merge_size", d.merge_size),
            image_mean=tuple(cfg.get("image_mean", d.image_mean)),
            image_std=tuple(cfg.get("image_std", d.image_std)),
        )


VideoWrapper = Literal["replace", "keep"]


@dataclass(frozen=True)
class VideoLayout:
    """How one video placeholder of the chat template is laid out in the prompt.

    With `timestamps`, a video of T temporal patches at times t_1..t_T (`patch_times`), each of n placeholder
    tokens, becomes `B_i = <t_i seconds><|vision_start|><|video_pad|>*n<|vision_end|>` per patch, and the
    template's `<|vision_start|><|video_pad|><|vision_end|>` becomes, by `wrapper`:

    - `replace`: `B_1 ... B_T`. The format the released Qwen3-VL models were trained and are served with: the
      reference `Qwen3VLProcessor` of transformers 4.57 (required by the model cards and by Qwen's own
      fine-tuning code), transformers 5.0-5.9 and again 5.25+, and vLLM. ktr's default.
    - `keep`: `<|vision_start|> B_1 ... B_T <|vision_end|>`, two tokens more: the template's outer pair stays
      around the blocks. This is what transformers 5.10-5.24 built (their processor replaced only
      `<|video_pad|>`, a regression that 5.25 fixed); kept to reproduce runs and checkpoints made with those
      versions, not the model's own format.

    If the rendered template has a bare `<|video_pad|>` (no wrapper), both lay out `B_1 ... B_T` in its place.
    Both layouts are ktr's own: they do not depend on the installed transformers (tests/test_qwen3vl.py checks
    them against hand-built ids and against the installed processor where it builds the same layout).
    """

    timestamps: bool = False
    """Qwen3-VL: one `<t.t seconds>` text and its own vision start/end tokens per temporal patch."""
    wrapper: VideoWrapper = "replace"
    """With timestamps, what happens to the template's `<|vision_start|><|video_pad|><|vision_end|>`: `replace`
    (the per-patch blocks replace all three tokens: the released models' format) or `keep` (only `<|video_pad|>`
    is replaced, so an outer vision start/end pair encloses the blocks: transformers 5.10-5.24)."""


def patch_times(frame_times: list[float], temporal_patch_size: int) -> list[float]:
    """Seconds of each temporal patch: the mean of its first and last frame's time, the last frame repeated to
    fill the final patch (`Qwen3VLProcessor._calculate_timestamps`, same float operations)."""
    times = list(frame_times)
    if len(times) % temporal_patch_size:
        times.extend(times[-1] for _ in range(temporal_patch_size - len(times) % temporal_patch_size))
    return [(times[i] + times[i + temporal_patch_size - 1]) / 2 for i in range(0, len(times), temporal_patch_size)]


def frame_times_of(media: Media) -> list[float]:
    """Source times of the sampled frames: `media.frame_times`, else frame i at i / sample_fps."""
    if media.frame_times is not None:
        if len(media.frame_times) != len(media.frames):
            raise ValueError(f"{media.path or 'video'}: {len(media.frame_times)} frame times for "
                             f"{len(media.frames)} frames")
        return list(media.frame_times)
    if not media.sample_fps:
        raise ValueError(f"{media.path or 'video'}: timestamps need frame_times or a positive sample_fps")
    return [i / media.sample_fps for i in range(len(media.frames))]


class VisionLanguageProcessor:
    """Tokenise chat messages with media placeholders and patch the media.

    Args:
        tokenizer: a Qwen2/2.5 tokenizer with a chat template.
        image_token_id / video_token_id: placeholder ids, read from the model config by the caller.
    """

    def __init__(self, tokenizer, image_token_id: int, video_token_id: int,
                 patch: PatchSettings | None = None, layout: VideoLayout | None = None) -> None:
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.video_token_id = video_token_id
        self.patch = patch or PatchSettings()
        self.layout = layout or VideoLayout()
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._opened: str | None = None  # `opened_turn`, rendered once

    @property
    def resize_factor(self) -> int:
        """Media sides must be multiples of this (patch_size * merge_size)."""
        return self.patch.patch_size * self.patch.merge_size

    def patchify(self, media: Media) -> tuple[Tensor, Tensor]:
        """Patches `[P, D]` float32 and grid `(t, h, w)` `[3]` long of one image or video."""
        p = self.patch
        block = p.patch_size * p.merge_size
        if media.frames.shape[-2] % block or media.frames.shape[-1] % block:
            size = tuple(media.frames.shape[-2:])
            raise ValueError(f"{media.path or media.kind}: frame size {size} is not a multiple "
                             f"of this model's patch_size*merge_size={block}; resize with factor {block} "
                             f"(VideoSettings/ImageSettings.factor)")
        return patchify(media.frames, patch_size=p.patch_size, temporal_patch_size=p.temporal_patch_size,
                        merge_size=p.merge_size, mean=p.image_mean, std=p.image_std)

    def num_tokens(self, grid_thw: Tensor) -> int:
        return int(grid_thw.prod()) // self.patch.merge_size**2

    @property
    def opened_turn(self) -> str:
        """What the chat template's generation prompt writes after the assistant header (`<|im_start|>assistant\n`):
        "" for Qwen2.5-VL / Qwen3-VL, `<think>\n` for Qwen3.5-9B's template, whose completions start inside that
        block. The rewards read `opened_turn + completion` (`Rollout.assistant_texts`)."""
        if self._opened is None:
            turn = [{"role": "user", "content": "x"}]
            full = self.tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
            bare = self.tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=False)
            added = full[len(bare):] if full.startswith(bare) else ""
            header = "assistant\n"
            self._opened = added.split(header, 1)[1] if header in added else ""
        return self._opened

    def encode(self, messages: list[dict], media: Media, row: dict | None = None,
               target: str | None = None) -> PromptSample:
        """One prompt: render the chat template (generation prompt appended), expand the placeholder, patch."""
        pixel_values, grid_thw = self.patchify(media)
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        placeholder = self.video_token_id if media.kind == "video" else self.image_token_id
        pad = self.tokenizer.convert_ids_to_tokens(placeholder)
        if text.count(pad) != 1:
            raise ValueError(f"expected exactly one {media.kind} placeholder in the prompt, found {text.count(pad)}")
        per_block = self.num_tokens(grid_thw)
        if media.kind == "video" and self.layout.timestamps:
            wrapped = self._wrapped(pad)
            replaced = wrapped if self.layout.wrapper == "replace" and wrapped in text else pad  # not `target`
            text = text.replace(replaced, self._timestamped(media, pad), 1)
            per_block //= int(grid_thw[0])
        ids: list[int] = []
        for t in self.tokenizer(text, add_special_tokens=False)["input_ids"]:
            ids.extend([t] * per_block if t == placeholder else [t])
        block = self._media_block(ids, media)
        target_ids = None if target is None else self.encode_target(target)
        return PromptSample(row=row or {}, prompt_ids=torch.tensor(ids, dtype=torch.long), media=media,
                            pixel_values=pixel_values, grid_thw=grid_thw, target_ids=target_ids, media_block=block)

    def _media_block(self, ids: list[int], media: Media) -> Tensor:
        """`[L]` bool: from the first vision start token (or the timestamp text right before it, when the video's
        blocks are not enclosed by the template's outer start token) to the last vision end token."""
        start_id, end_id = (self.tokenizer.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>"))
        starts = [i for i, t in enumerate(ids) if t == start_id]
        ends = [i for i, t in enumerate(ids) if t == end_id]
        if not starts or not ends:
            raise ValueError("the prompt has no <|vision_start|> ... <|vision_end|> around its media")
        first, last = starts[0], ends[-1]
        if media.kind == "video" and self.layout.timestamps:
            t0 = patch_times(frame_times_of(media), self.patch.temporal_patch_size)[0]
            stamp = self.tokenizer(f"<{t0:.1f} seconds>", add_special_tokens=False)["input_ids"]
            if ids[first - len(stamp): first] == stamp:
                first -= len(stamp)
            elif self.layout.wrapper == "replace":
                raise ValueError(f"the first timestamp <{t0:.1f} seconds> did not tokenise on its own")
        block = torch.zeros(len(ids), dtype=torch.bool)
        block[first: last + 1] = True
        return block

    def _wrapped(self, pad: str) -> str:
        return f"<|vision_start|>{pad}<|vision_end|>"

    def _timestamped(self, media: Media, pad: str) -> str:
        """One `<t.t seconds>` + vision start + one placeholder + vision end per temporal patch."""
        times = patch_times(frame_times_of(media), self.patch.temporal_patch_size)
        return "".join(f"<{t:.1f} seconds>{self._wrapped(pad)}" for t in times)

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
        `get_rope_index` then uses 1 per video), so every pass and `generate` behave as the released trainer (with
        `policy.rope_after_media: reference`, the default, for the text after a video: `ktr.model.rope`).
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
        batch.media_block = torch.zeros((len(samples), length), dtype=torch.bool)
        for i, s in enumerate(samples):
            if s.media_block is not None:
                batch.media_block[i, length - len(s.prompt_ids):] = s.media_block
        if all(s.target_ids is not None for s in samples):
            batch.target_ids, batch.target_mask = self.pad_targets([s.target_ids for s in samples])
        return batch

    def encode_target(self, text: str) -> Tensor:
        """A completion's token ids as the policy writes it: `text`, then `<|im_end|>`. `[T]` long. Where the
        generation prompt already opened a block (`opened_turn`, e.g. `<think>\n`) and `text` opens it too, the
        target starts inside it, as a completion does (the rewards read `opened_turn` + completion)."""
        opened = self.opened_turn
        if opened and text.lstrip().startswith(opened.strip()):
            text = text.lstrip()[len(opened.strip()):].lstrip("\n")
        end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        return torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"] + [end])

    def pad_targets(self, targets: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Right-padded `[B, T]` target ids and their `[B, T]` bool mask."""
        t = max(len(x) for x in targets)
        ids = torch.full((len(targets), t), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(targets), t), dtype=torch.bool)
        for i, x in enumerate(targets):
            ids[i, : len(x)], mask[i, : len(x)] = x, True
        return ids, mask

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
