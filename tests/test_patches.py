"""Patching and smart_resize: bit parity with Hugging Face's Qwen2-VL image processor, hand-computed sizes."""

from __future__ import annotations

import os

import pytest
import torch

from ktr.data.patches import CLIP_MEAN, CLIP_STD, normalize_frames, num_placeholder_tokens, patchify
from ktr.data.video import smart_resize

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pil_qwen = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")


def _hf_processor():
    # The numpy/PIL backend: the torchvision one cannot be imported here. Bounds wide enough that the
    # test images need no resize (HF still runs its own smart_resize, which must be the identity).
    return pil_qwen.Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 1280)


def _hf(images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """HF output for images given as [3, H, W] uint8 tensors (passed as HWC numpy arrays)."""
    out = _hf_processor()(images=[im.permute(1, 2, 0).numpy() for im in images], return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def _rand_images(n: int, height: int, width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, height, width), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize(("height", "width"), [(56, 84), (112, 112), (84, 56), (224, 420)])
def test_image_matches_hf_exactly(height: int, width: int) -> None:
    image = _rand_images(1, height, width, seed=height * 1000 + width)
    hf_pixels, hf_grid = _hf([image[0]])
    ours, grid = patchify(image)
    assert ours.dtype == torch.float32 == hf_pixels.dtype
    assert torch.equal(ours, hf_pixels)  # bit-identical, not merely close
    assert torch.equal(grid, hf_grid[0])
    assert grid.tolist() == [1, height // 14, width // 14]
    # a [3, H, W] tensor is treated as the same single image
    assert torch.equal(patchify(image[0])[0], ours)


def test_several_images_match_hf_concatenation() -> None:
    images = [_rand_images(1, 56, 84, seed=1)[0], _rand_images(1, 112, 56, seed=2)[0]]
    hf_pixels, hf_grid = _hf(images)
    ours = [patchify(im) for im in images]
    assert torch.equal(torch.cat([p for p, _ in ours]), hf_pixels)
    assert torch.equal(torch.stack([g for _, g in ours]), hf_grid)


def _temporal_slot(pixels: torch.Tensor, slot: int) -> torch.Tensor:
    """[P, 3*2*14*14] rows -> [P, 3, 14, 14]: the given temporal slot of each patch."""
    return pixels.view(pixels.shape[0], 3, 2, 14, 14)[:, :, slot]


def test_video_patches_interleave_hf_frames() -> None:
    # HF's image path repeats one frame over the temporal axis, so each frame's patches can be read off
    # slot 0; a video row must hold frame 2k in slot 0 and frame 2k+1 in slot 1, pairs in time order.
    frames = _rand_images(4, 56, 84, seed=7)
    per_frame = [_temporal_slot(_hf([f])[0], 0) for f in frames]  # 4 x [24, 3, 14, 14]
    ours, grid = patchify(frames)
    assert grid.tolist() == [2, 4, 6]
    assert ours.shape == (2 * 24, 3 * 2 * 14 * 14)
    for t in range(2):
        rows = ours[t * 24 : (t + 1) * 24]
        assert torch.equal(_temporal_slot(rows, 0), per_frame[2 * t])
        assert torch.equal(_temporal_slot(rows, 1), per_frame[2 * t + 1])


def test_odd_frame_count_repeats_last_frame() -> None:
    frames = _rand_images(3, 56, 56, seed=3)
    ours, grid = patchify(frames)
    assert grid.tolist() == [2, 4, 4]
    padded, _ = patchify(torch.cat([frames, frames[-1:]]))
    assert torch.equal(ours, padded)
    # the last pair is frame 2 twice, i.e. exactly HF's output for frame 2 as an image
    assert torch.equal(ours[16:], _hf([frames[2]])[0])


def test_float_input_equals_uint8_input() -> None:
    # qwen-vl-utils hands HF float frames holding integers; the result must not depend on the dtype
    frames = _rand_images(2, 56, 56, seed=4)
    assert torch.equal(patchify(frames)[0], patchify(frames.float())[0])


def test_normalize_hand_values() -> None:
    frames = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 1, 1)
    out = normalize_frames(frames)
    for c in range(3):
        assert out[0, c, 0, 0].item() == pytest.approx(-CLIP_MEAN[c] / CLIP_STD[c], rel=1e-6)
        assert out[1, c, 0, 0].item() == pytest.approx((1 - CLIP_MEAN[c]) / CLIP_STD[c], rel=1e-6)


def test_patch_order_on_coordinate_image() -> None:
    # a 28x28 single-channel ramp: row r of the 2x2 merge block is patch (r // 2, r % 2), row-major inside
    values = torch.arange(28 * 28).view(28, 28)
    frames = (values % 251).to(torch.uint8).expand(2, 3, 28, 28)
    pixels, _ = patchify(frames, mean=(0.0, 0.0, 0.0), std=(1 / 255, 1 / 255, 1 / 255))
    patches = pixels.view(4, 3, 2, 14, 14)
    for r, (py, px) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        expected = (values[py * 14 : py * 14 + 14, px * 14 : px * 14 + 14] % 251).float()
        assert torch.allclose(patches[r, 1, 1], expected, atol=1e-3)


def test_patchify_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="multiple of patch_size"):
        patchify(torch.zeros(2, 3, 56, 70, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[F>=1, 3, H, W\]"):
        patchify(torch.zeros(2, 1, 56, 56, dtype=torch.uint8))


def test_num_placeholder_tokens() -> None:
    assert num_placeholder_tokens(torch.tensor([8, 16, 30])) == 960  # 8*16*30/4
    assert num_placeholder_tokens((1, 4, 6)) == 6
    with pytest.raises(ValueError):
        num_placeholder_tokens((1, 3, 6))
    with pytest.raises(ValueError):
        num_placeholder_tokens((1, 4))


# ---------------------------------------------------------------------------------------- smart_resize

TRAIN_VIDEO_MIN = 128 * 28 * 28  # 100352
TRAIN_VIDEO_MAX = int(TRAIN_VIDEO_MIN * 1.05)  # 105369: the per-frame cap of a 16-frame training clip


def test_smart_resize_training_video_frame() -> None:
    # 360x640: round to 364x644 = 234416 > 105369, so beta = sqrt(230400 / 105369) = 1.47872;
    # 360/beta/28 = 8.69 -> 8*28 = 224; 640/beta/28 = 15.46 -> 15*28 = 420 (94080 px, under min_pixels:
    # qwen-vl-utils does not re-check the lower bound after shrinking).
    assert smart_resize(360, 640, 28, TRAIN_VIDEO_MIN, TRAIN_VIDEO_MAX) == (224, 420)


def test_smart_resize_eval_video_frame() -> None:
    # max 256*28*28 = 200704: 364*644 > 200704, beta = sqrt(230400 / 200704) = 15/14;
    # 360*14/15 = 336 (12*28 exactly); 640*14/15 = 597.3 -> 21*28 = 588
    assert smart_resize(360, 640, 28, TRAIN_VIDEO_MIN, 256 * 28 * 28) == (336, 588)


def test_smart_resize_grows_small_images_and_keeps_fitting_ones() -> None:
    # 20x30 -> 28x28 = 784 < 3136; beta = sqrt(3136 / 600) = 2.286; ceil(1.63)*28 = 56, ceil(2.45)*28 = 84
    assert smart_resize(20, 30, 28, 4 * 28 * 28, 256 * 28 * 28) == (56, 84)
    assert smart_resize(112, 112, 28, 4 * 28 * 28, 256 * 28 * 28) == (112, 112)
    assert smart_resize(100, 150, 28, 4 * 28 * 28, 256 * 28 * 28) == (112, 140)  # plain rounding


def test_smart_resize_rejects_extreme_aspect_ratio() -> None:
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2010)
    with pytest.raises(ValueError, match="positive"):
        smart_resize(0, 10)


def test_smart_resize_agrees_with_hf_copy() -> None:
    # HF's copy of the function differs only for sides < 14 (upstream clamps the rounded side to 28)
    for height in range(28, 1300, 37):
        for width in (28, 61, 360, 640, 1279):
            for lo, hi in [(4 * 784, 256 * 784), (128 * 784, 105369), (56 * 56, 1280 * 784)]:
                expected = pil_qwen.smart_resize(height, width, 28, lo, hi)
                assert smart_resize(height, width, 28, lo, hi) == expected, (height, width, lo, hi)
