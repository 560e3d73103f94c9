"""Qwen2-VL / Qwen2.5-VL patching of frames into ``pixel_values`` rows (layer L2, torch only).

Bit-identical to Hugging Face's ``Qwen2VLImageProcessor`` (numpy/PIL backend) on frames that need no
resize: rescale by 1/255 in float64 then cast to float32 (HF's ``rescale``), normalise in float32
(HF's ``normalize``), then the same patch order. Rows are ordered (t, h-block, w-block, h-in-block,
w-in-block) and each row is (channel, temporal, patch_y, patch_x) flattened, which is what the vision
tower's patch embedding and 2x2 merger expect.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize_frames(
    frames: Tensor, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
) -> Tensor:
    """Frames [F, 3, H, W] with values in [0, 255] (uint8 or float) -> float32 ``(x / 255 - mean) / std``.

    The op order is Hugging Face's: ``(x.float64() * (1/255)).float32()``, then float32 subtract and
    divide; any other order (e.g. fusing into one float32 affine op) differs in the last bit.
    """
    scaled = (frames.to(torch.float64) * (1 / 255)).to(torch.float32)  # [F, 3, H, W]
    mean_t = torch.tensor(mean, dtype=torch.float32, device=frames.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=frames.device).view(1, -1, 1, 1)
    return (scaled - mean_t) / std_t


def patchify(
    frames: Tensor,
    *,
    patch_size: int = 14,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> tuple[Tensor, Tensor]:
    """Turn frames into Qwen-VL patch rows.

    Args:
        frames: [F, 3, H, W] uint8 (or float with values in [0, 255]); a single image is [1, 3, H, W]
            (a [3, H, W] tensor is accepted as that). H and W must be multiples of patch_size*merge_size.

    Returns:
        pixel_values: [t*h*w, 3*temporal_patch_size*patch_size**2] float32.
        grid_thw: [3] int64 ``(t, h, w)`` with t = ceil(F / temporal_patch_size), h = H / patch_size,
            w = W / patch_size. The frame count is padded by repeating the last frame (an image becomes
            ``temporal_patch_size`` copies of itself, as in Hugging Face).
    """
    if frames.dim() == 3:
        frames = frames.unsqueeze(0)
    if frames.dim() != 4 or frames.shape[1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"patchify: frames must be [F>=1, 3, H, W], got {tuple(frames.shape)}")
    num_frames, channels, height, width = frames.shape
    block = patch_size * merge_size
    if height % block or width % block:
        raise ValueError(
            f"patchify: frame size {height}x{width} is not a multiple of patch_size*merge_size={block}; "
            "resize with smart_resize first"
        )
    x = normalize_frames(frames, mean, std)  # [F, 3, H, W]
    if pad := -num_frames % temporal_patch_size:
        x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
    grid_t, grid_h, grid_w = x.shape[0] // temporal_patch_size, height // patch_size, width // patch_size
    x = x.view(
        grid_t, temporal_patch_size, channels,
        grid_h // merge_size, merge_size, patch_size,
        grid_w // merge_size, merge_size, patch_size,
    )  # fmt: skip
    # -> (t, h-block, w-block, h-in-block, w-in-block, C, tp, py, px)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    pixel_values = x.reshape(grid_t * grid_h * grid_w, channels * temporal_patch_size * patch_size * patch_size)
    return pixel_values, torch.tensor([grid_t, grid_h, grid_w], dtype=torch.long)


def num_placeholder_tokens(grid_thw: Tensor | Sequence[int], merge_size: int = 2) -> int:
    """LLM placeholder tokens for one image/video: ``t*h*w // merge_size**2`` (one per merged 2x2 block).

    >>> num_placeholder_tokens((8, 16, 30))  # 16 frames of 224x420
    960
    """
    values = grid_thw.tolist() if isinstance(grid_thw, Tensor) else list(grid_thw)
    if len(values) != 3:
        raise ValueError(f"grid_thw must hold 3 numbers (t, h, w), got {values}")
    t, h, w = (int(v) for v in values)
    if h % merge_size or w % merge_size:
        raise ValueError(f"grid h={h}, w={w} must be multiples of merge_size={merge_size}")
    return t * h * w // merge_size**2
