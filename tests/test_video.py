"""Frame sampling (qwen-vl-utils rules), decoding of the real clip, resizing, and decode errors."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ktr.data.patches import num_placeholder_tokens, patchify
from ktr.data.video import (
    ImageSettings,
    MediaDecodeError,
    VideoSettings,
    frames_from_array,
    image_from_array,
    load_image,
    load_video,
    resize_frames,
    sample_frame_indices,
    smart_nframes,
)
from tests import FIXTURES

VIDEO1 = FIXTURES / "video1.mp4"
# decord on video1.mp4: 491 frames, get_avg_fps() == 22.29 exactly, 640x360
VIDEO1_FRAMES, VIDEO1_FPS = 491, 22.29
# linspace(0, 490, 16): step 490/15 = 32.667 -> 0, 32.67, 65.33, 98, 130.67, ... rounded
VIDEO1_INDICES = [0, 33, 65, 98, 131, 163, 196, 229, 261, 294, 327, 359, 392, 425, 457, 490]


def _has_decord() -> bool:
    try:
        import decord  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


# the decoding tests run on every backend (decord: Linux x86-64 wheels only)
BACKENDS = [pytest.param("decord", marks=pytest.mark.skipif(not _has_decord(), reason="decord is not installed")),
            "pyav"]


def _needs_video1() -> Path:
    if not VIDEO1.is_file():
        pytest.skip(f"real clip fixture missing: {VIDEO1}")
    return VIDEO1


# ------------------------------------------------------------------------------------------ sampling


def test_sampling_real_clip_numbers() -> None:
    # 491 / 22.29 * 2 = 44.06 frames -> capped at max_frames 16
    assert smart_nframes(VIDEO1_FRAMES, VIDEO1_FPS) == 16
    assert sample_frame_indices(VIDEO1_FRAMES, VIDEO1_FPS) == VIDEO1_INDICES


def test_sampling_rounds_down_to_even() -> None:
    # 75 frames at 10 fps -> 15.0 -> floor to 14; linspace(0, 74, 14) step 74/13 = 5.692
    assert sample_frame_indices(75, 10.0) == [0, 6, 11, 17, 23, 28, 34, 40, 46, 51, 57, 63, 68, 74]
    # 491 frames, max_frames 15 -> floor2 = 14; max_frames 32 -> 32 (44.06 > 32)
    assert smart_nframes(491, 22.29, max_frames=15) == 14
    assert smart_nframes(491, 22.29, max_frames=32) == 32
    assert smart_nframes(491, 22.29, max_frames=64) == 44  # 44.06 floored to even


def test_sampling_short_videos() -> None:
    # 10 frames at 30 fps -> 0.67 -> raised to min_frames 4: linspace(0, 9, 4) = 0, 3, 6, 9
    assert sample_frame_indices(10, 30.0) == [0, 3, 6, 9]
    # min_frames 5 is rounded up to 6: linspace(0, 19, 6) = 0, 3.8, 7.6, 11.4, 15.2, 19
    assert sample_frame_indices(20, 30.0, min_frames=5) == [0, 4, 8, 11, 15, 19]
    # 3 frames: the cap floor2(min(16, 3)) = 2 wins over min_frames
    assert sample_frame_indices(3, 30.0) == [0, 2]
    assert sample_frame_indices(2, 1.0) == [0, 1]
    # a fast source: 8 frames at 1 fps asks for 16 frames, capped at the 8 it has
    assert sample_frame_indices(8, 1.0) == list(range(8))


@pytest.mark.parametrize(
    ("args", "match"),
    [((1, 30.0), "at least 2"), ((0, 30.0), "at least 2"), ((10, 0.0), "video_fps"),
     ((10, float("nan")), "video_fps"), ((10, 30.0, -1.0), "fps"), ((10, 30.0, 2.0, 4, 1), "max_frames")],
)  # fmt: skip
def test_sampling_rejects_bad_input(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        sample_frame_indices(*args)


def test_settings_validation() -> None:
    with pytest.raises(ValueError, match="fps"):
        VideoSettings(fps=0)
    with pytest.raises(ValueError, match="min_pixels"):
        VideoSettings(min_pixels=200, max_pixels=100)
    with pytest.raises(ValueError, match="min_pixels"):
        ImageSettings(min_pixels=0)
    # per-frame cap: max(min(100352, 90316800/16*2), int(100352*1.05)) = 105369
    assert VideoSettings().frame_max_pixels(16) == 105369
    # a small total budget binds: 3_000_000 / 16 * 2 = 375000 > 200704, so 200704 stays
    assert VideoSettings(max_pixels=200704, total_pixels=3_000_000).frame_max_pixels(16) == 200704
    assert VideoSettings(max_pixels=200704, total_pixels=1_000_000).frame_max_pixels(16) == 125000.0


# ---------------------------------------------------------------------------------------- real clip


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_real_clip_training_settings(backend: str) -> None:
    clip = load_video(str(_needs_video1()), VideoSettings(backend=backend))
    # 640x360 at min 100352 / per-frame max 105369 -> 224x420 (see test_patches for the arithmetic)
    assert clip.frames.shape == (16, 3, 224, 420)
    assert clip.frames.dtype == torch.uint8
    assert clip.indices == VIDEO1_INDICES
    assert clip.sample_fps == pytest.approx(16 / 491 * 22.29)  # 0.72635
    assert clip.path == str(VIDEO1)
    _, grid = patchify(clip.frames)
    assert grid.tolist() == [8, 16, 30]
    assert num_placeholder_tokens(grid) == 960  # 8 * 16 * 30 / 4


def test_load_real_clip_eval_settings() -> None:
    clip = load_video(str(_needs_video1()), VideoSettings(max_pixels=256 * 28 * 28))
    # per-frame cap 200704 -> 336x588; grid (8, 24, 42) -> 8*24*42/4 = 2016 tokens
    assert clip.frames.shape == (16, 3, 336, 588)
    assert num_placeholder_tokens(patchify(clip.frames)[1]) == 2016


def test_real_clip_frames_match_decord_then_resize() -> None:
    decord = pytest.importorskip("decord")
    raw = decord.VideoReader(str(_needs_video1()), num_threads=1).get_batch([0, 490]).asnumpy()
    frames = torch.from_numpy(raw).permute(0, 3, 1, 2)  # [2, 3, 360, 640]
    clip = frames_from_array(frames, 22.29, VideoSettings(min_frames=2, max_frames=2))
    assert clip.indices == [0, 1]
    full = load_video(str(VIDEO1), VideoSettings(backend="decord"))
    assert torch.equal(clip.frames[0], full.frames[0])
    assert torch.equal(clip.frames[1], full.frames[-1])


# ------------------------------------------------------------------------------------------ resizing


def test_resize_frames_follows_torchvision_arithmetic() -> None:
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (2, 3, 60, 100), generator=g, dtype=torch.uint8)
    out = resize_frames(frames, 56, 84)
    ref = F.interpolate(frames.float(), size=(56, 84), mode="bicubic", align_corners=False, antialias=True)
    assert out.dtype == torch.uint8
    assert torch.equal(out, ref.clamp(0, 255).round().to(torch.uint8))
    # the no-resize shortcut equals what the interpolation would give at scale 1
    same = F.interpolate(frames.float(), size=(60, 100), mode="bicubic", align_corners=False, antialias=True)
    assert torch.equal(resize_frames(frames, 60, 100), same.to(torch.uint8))
    # bicubic over/undershoots next to a black/white edge (-2.69 at column 26, 257.69 at column 29) are
    # clamped; a plain cast would wrap them to 253 and 2
    edge = torch.zeros(1, 3, 60, 100, dtype=torch.uint8)
    edge[..., 50:] = 255
    out = resize_frames(edge, 28, 56)
    assert out[..., 26].max() == 0 and out[..., 29].min() == 255


def test_frames_from_array_samples_and_resizes() -> None:
    frames = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 60, 100).contiguous()
    clip = frames_from_array(frames, 30.0, VideoSettings(min_pixels=4 * 784, max_pixels=256 * 784))
    assert clip.indices == [0, 3, 6, 9]
    assert clip.frames.shape == (4, 3, 56, 112)  # 60x100 rounds to 56x112 = 6272 px, within bounds
    assert clip.frames[:, 0, 0, 0].tolist() == [0, 3, 6, 9]  # constant frames stay constant
    assert clip.sample_fps == pytest.approx(4 / 10 * 30.0)
    with pytest.raises(ValueError, match="uint8"):
        frames_from_array(frames.float(), 30.0, VideoSettings())
    with pytest.raises(ValueError, match=r"\[F, 3, H, W\]"):
        frames_from_array(frames[:, :1], 30.0, VideoSettings())


# ------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_video_raises_file_not_found(tmp_path: Path, backend: str) -> None:
    missing = tmp_path / "nope.mp4"
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        load_video(str(missing), VideoSettings(backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_corrupt_videos_raise_decode_error(tmp_path: Path, backend: str) -> None:
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    for path in (empty, corrupt):
        with pytest.raises(MediaDecodeError) as info:
            load_video(str(path), VideoSettings(backend=backend))
        assert info.value.path == str(path)
        assert str(path) in str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncated_real_clip_raises_decode_error(tmp_path: Path, backend: str) -> None:
    half = tmp_path / "half.mp4"
    half.write_bytes(_needs_video1().read_bytes()[:500_000])  # moov atom is at the end: unreadable
    with pytest.raises(MediaDecodeError):
        load_video(str(half), VideoSettings(backend=backend))


def test_decode_error_pickles() -> None:
    err = pickle.loads(pickle.dumps(MediaDecodeError("a.mp4", "broken")))
    assert (err.path, err.reason) == ("a.mp4", "broken")


# ----------------------------------------------------------------------------------- written video


def _write_video(path: Path, colours: list[tuple[int, int, int]], fps: int, height: int, width: int) -> None:
    av = pytest.importorskip("av")
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width, stream.pix_fmt = height, width, "yuv420p"
        for colour in colours:
            array = np.empty((height, width, 3), dtype=np.uint8)
            array[...] = colour
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.mark.parametrize("backend", BACKENDS)
def test_written_video_round_trip(tmp_path: Path, backend: str) -> None:
    colours = [(250, 10, 10), (10, 250, 10), (10, 10, 250), (240, 240, 240), (20, 20, 20)] * 2
    path = tmp_path / "colours.mp4"
    _write_video(path, colours, fps=5, height=112, width=168)
    clip = load_video(str(path), VideoSettings(min_pixels=4 * 784, max_pixels=256 * 784, backend=backend))
    # 10 frames at 5 fps -> 4 frames: linspace(0, 9, 4) = 0, 3, 6, 9; 112x168 needs no resize
    assert clip.indices == [0, 3, 6, 9]
    assert clip.frames.shape == (4, 3, 112, 168)
    assert clip.sample_fps == pytest.approx(2.0)
    means = clip.frames.float().mean(dim=(2, 3))  # [4, 3] per-frame colour, lossy codec
    expected = torch.tensor([colours[i] for i in clip.indices], dtype=torch.float32)
    assert (means - expected).abs().max() < 12


# ------------------------------------------------------------------------------------------- images


def test_load_image_resizes_with_pil_bicubic(tmp_path: Path) -> None:
    from PIL import Image

    g = np.random.default_rng(1)
    array = g.integers(0, 256, (30, 20, 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "small.png")
    out = load_image(str(tmp_path / "small.png"), ImageSettings())
    # 30x20 (HxW) grows to 84x56 (see smart_resize test 20x30 -> 56x84, transposed)
    expected = np.array(Image.fromarray(array).resize((56, 84), Image.Resampling.BICUBIC))
    assert out.shape == (3, 84, 56) and out.dtype == torch.uint8
    assert torch.equal(out, torch.from_numpy(expected).permute(2, 0, 1))
    # an image that fits is returned untouched, from a file or from memory
    fits = g.integers(0, 256, (56, 84, 3), dtype=np.uint8)
    Image.fromarray(fits).save(tmp_path / "fits.png")
    tensor = torch.from_numpy(fits).permute(2, 0, 1)
    assert torch.equal(load_image(str(tmp_path / "fits.png"), ImageSettings()), tensor)
    assert torch.equal(image_from_array(tensor, ImageSettings()), tensor)


def test_load_image_rgba_on_white(tmp_path: Path) -> None:
    from PIL import Image

    rgba = np.zeros((56, 56, 4), dtype=np.uint8)  # fully transparent black
    rgba[:28, :, :] = (10, 20, 30, 255)  # opaque top half
    Image.fromarray(rgba).save(tmp_path / "a.png")
    out = load_image(str(tmp_path / "a.png"), ImageSettings())
    assert out[:, 0, 0].tolist() == [10, 20, 30]
    assert out[:, -1, -1].tolist() == [255, 255, 255]


def test_image_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(str(tmp_path / "missing.png"), ImageSettings())
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(MediaDecodeError, match="bad.png"):
        load_image(str(bad), ImageSettings())
    with pytest.raises(ValueError, match="uint8"):
        image_from_array(torch.zeros(3, 28, 28), ImageSettings())
