"""Video and image decoding, frame sampling and resizing (layer L2: torch, PIL; videos decoded by decord or PyAV
through `ktr.data.decoders`; no torchvision).

The rules are those of qwen-vl-utils as vendored by the released Video-R1/Video-KTR code
(docs/method.md sections 5.2-5.3), re-implemented on plain torch so that the package never needs torchvision:

- ``smart_nframes``/``sample_frame_indices``: how many frames and which ones;
- ``smart_resize``: the per-frame size, both sides multiples of 28, area within pixel bounds;
- video frames are resized like ``torchvision.transforms.functional.resize(uint8, BICUBIC,
  antialias=True)`` (float32 interpolation, clamp to [0, 255], round, back to uint8);
- images are resized by PIL with BICUBIC like qwen-vl-utils' ``fetch_image``.

Frames stay uint8 after resizing. qwen-vl-utils calls ``.float()`` on the rounded uint8 result, so its
values are integers in [0, 255]; Hugging Face's image processor then rescales them exactly as it rescales
uint8, hence keeping uint8 gives bit-identical ``pixel_values`` at a quarter of the memory.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ktr.config import ConfigError, check_choice, check_number
from ktr.data.decoders import BACKEND_CHOICES, MediaDecodeError, VideoBackend, check_backend, open_video

FRAME_FACTOR = 2
"""Sampled frame counts are multiples of this (Qwen2.5-VL's temporal patch size)."""
IMAGE_FACTOR = 28
"""Frame sides are multiples of this (spatial patch 14 x merge 2)."""
MAX_RATIO = 200
"""Largest aspect ratio smart_resize accepts (qwen-vl-utils and Hugging Face)."""
VIDEO_TOTAL_PIXELS = int(128000 * 28 * 28 * 0.9)
"""qwen-vl-utils' default total pixel budget of one video (90,316,800), also in the released KTR code."""
MEMORY_PATH = "<memory>"
"""``VideoClip.path`` of clips built from in-memory frames."""


@dataclass
class VideoSettings:
    """How videos are sampled and resized (qwen-vl-utils rules, docs/method.md sections 5.2-5.3)."""

    fps: float = 2.0
    """Frames sampled per second of video, before clamping to [min_frames, max_frames]."""
    min_frames: int = 4
    """Fewest frames sampled from a video (rounded up to a multiple of 2)."""
    max_frames: int = 16
    """Most frames sampled from a video (rounded down to a multiple of 2, and to the video's length)."""
    min_pixels: int = 128 * 28 * 28
    """Smallest area (pixels) of a sampled frame after resizing."""
    max_pixels: int = 128 * 28 * 28
    """Per-frame area cap (pixels); the effective cap is max(min(max_pixels, total_pixels / nframes * 2),
    int(min_pixels * 1.05)), as in qwen-vl-utils."""
    total_pixels: int = VIDEO_TOTAL_PIXELS
    """Pixel budget of the whole sampled video (qwen-vl-utils' VIDEO_TOTAL_PIXELS default)."""
    rope_time: Literal["sampled", "released"] = "sampled"
    """Temporal rotary step of video tokens. `sampled`: `second_per_grid_ts = temporal_patch / sample_fps`, as
    the Qwen2.5-VL processor computes it. `released`: as if `second_per_grid_ts` were absent (transformers'
    default 1.0), in every pass and in generation: the released Video-KTR / Video-R1 trainers delete it before
    every forward, and the Video-R1 SFT checkpoint was trained that way (docs/method.md section 5.4)."""
    factor: int | None = None
    """Frame sides are multiples of this: the model's patch_size * merge_size (Qwen2/2.5-VL 28, Qwen3-VL 32).
    None: the policy's (data modules and evaluators fill it in; standalone use: 28)."""
    backend: VideoBackend = "auto"
    """Video decoder. `auto`: decord when it imports, else PyAV (the choice is logged once per process), and PyAV
    for the files decord cannot open (AV1) or reads wrong (open GOPs), each switch logged; `decord` is the released
    pipeline exactly. Both give the same frame count, fps, sampled indices and frames elsewhere
    (docs/video_decoding.md); decord has wheels for Linux x86-64 only, PyAV (`av`) for every platform."""

    def __post_init__(self) -> None:
        check_choice("video.rope_time", self.rope_time, ("sampled", "released"))
        check_choice("video.backend", self.backend, BACKEND_CHOICES)
        check_backend("video.backend", self.backend)
        check_number("video.fps", self.fps, low=0, low_open=True)
        check_number("video.min_frames", self.min_frames, integer=True, low=1)
        check_number("video.max_frames", self.max_frames, integer=True, low=FRAME_FACTOR)
        if self.min_frames > self.max_frames:
            raise ConfigError(f"video.min_frames ({self.min_frames}) must be <= video.max_frames ({self.max_frames})")
        _check_pixels("video", self.min_pixels, self.max_pixels)
        check_number("video.total_pixels", self.total_pixels, integer=True, low=0, low_open=True)
        _check_factor("video", self.factor)

    def for_factor(self, factor: int, key: str = "video") -> VideoSettings:
        """These settings with `factor` filled in from the policy; a different explicit factor fails naming `key`."""
        return _for_factor(self, factor, key)

    def frame_max_pixels(self, nframes: int) -> float:
        """Effective per-frame area cap for a clip of ``nframes`` frames (may be a float, as upstream)."""
        budget = self.total_pixels / nframes * FRAME_FACTOR
        return max(min(self.max_pixels, budget), int(self.min_pixels * 1.05))


@dataclass
class ImageSettings:
    """How images are resized (released KTR run: qwen-vl-utils image bounds)."""

    min_pixels: int = 4 * 28 * 28
    """Smallest image area (pixels) after resizing."""
    max_pixels: int = 256 * 28 * 28
    """Largest image area (pixels) after resizing."""
    factor: int | None = None
    """Image sides are multiples of this: the model's patch_size * merge_size (Qwen2/2.5-VL 28, Qwen3-VL 32).
    None: the policy's (data modules and evaluators fill it in; standalone use: 28)."""

    def __post_init__(self) -> None:
        _check_pixels("image", self.min_pixels, self.max_pixels)
        _check_factor("image", self.factor)

    def for_factor(self, factor: int, key: str = "image") -> ImageSettings:
        return _for_factor(self, factor, key)


def _for_factor(settings, factor: int, key: str):
    if settings.factor is None:
        return replace(settings, factor=factor)
    if settings.factor != factor:
        raise ConfigError(f"{key}.factor={settings.factor}, but this policy's patch_size*merge_size is {factor}: "
                          f"set {key}.factor: {factor} or leave it unset")
    return settings


def _check_factor(key: str, factor: int | None) -> None:
    if factor is not None and (not isinstance(factor, int) or factor <= 0 or factor % 2):
        raise ConfigError(f"{key}.factor must be a positive even number (patch_size * merge_size), got {factor}")


def _check_pixels(key: str, min_pixels: int, max_pixels: int) -> None:
    """`key` is the settings' config key (`video`, `image`): messages name `video.min_pixels` etc."""
    check_number(f"{key}.min_pixels", min_pixels, integer=True, low=0, low_open=True)
    check_number(f"{key}.max_pixels", max_pixels, integer=True, low=0, low_open=True)
    if max_pixels < min_pixels:
        raise ConfigError(f"{key}.min_pixels ({min_pixels}) must be <= {key}.max_pixels ({max_pixels})")


@dataclass
class VideoClip:
    """Sampled, resized frames of one video."""

    frames: Tensor  # [F, 3, H, W] uint8, already resized to smart_resize dims (H, W multiples of 28)
    sample_fps: float  # frames per second of the sampled clip: F / total_frames * video_fps
    indices: list[int]  # [F] indices of the sampled frames in the source video
    path: str  # source file, or MEMORY_PATH for in-memory frames
    frame_times: tuple[float, ...] = ()  # [F] seconds of the sampled frames: index / source fps


# ---------------------------------------------------------------------------------------------- sizes


def _round_by(x: float, factor: int) -> int:
    return round(x / factor) * factor


def _ceil_by(x: float, factor: int) -> int:
    return math.ceil(x / factor) * factor


def _floor_by(x: float, factor: int) -> int:
    return math.floor(x / factor) * factor


def smart_resize(
    height: int,
    width: int,
    factor: int = IMAGE_FACTOR,
    min_pixels: float = 4 * 28 * 28,
    max_pixels: float = 16384 * 28 * 28,
) -> tuple[int, int]:
    """Target (height, width): multiples of ``factor``, aspect ratio kept, area within the bounds.

    Same float operations as qwen-vl-utils, so results agree bit for bit. Like qwen-vl-utils, the
    scaled-down size is not re-checked against ``min_pixels`` (360x640 at 100352..105369 gives 224x420,
    94080 px). Only deviation: a side floored to 0 on the shrinking branch becomes ``factor`` (as in
    Hugging Face's copy), where upstream would produce an unusable 0.

    >>> smart_resize(360, 640, min_pixels=128 * 28 * 28, max_pixels=105369)
    (224, 420)
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"smart_resize: height and width must be positive, got {height}x{width}")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_RATIO:
        raise ValueError(f"absolute aspect ratio must be smaller than {MAX_RATIO}, got {ratio} ({height}x{width})")
    h_bar = max(factor, _round_by(height, factor))
    w_bar = max(factor, _round_by(width, factor))
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, _floor_by(height / beta, factor))
        w_bar = max(factor, _floor_by(width / beta, factor))
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = _ceil_by(height * beta, factor)
        w_bar = _ceil_by(width * beta, factor)
    return h_bar, w_bar


# ------------------------------------------------------------------------------------------- frames


def smart_nframes(
    total_frames: int, video_fps: float, fps: float = 2.0, min_frames: int = 4, max_frames: int = 16
) -> int:
    """Number of frames to sample: ``total/video_fps*fps`` clamped to [ceil2(min_frames),
    floor2(min(max_frames, total))], then floored to a multiple of 2 (qwen-vl-utils ``smart_nframes``).

    >>> smart_nframes(491, 22.29)  # 44.06 frames at 2 fps, capped at 16
    16
    """
    if total_frames < FRAME_FACTOR:
        raise ValueError(f"a video needs at least {FRAME_FACTOR} frames to be sampled, got {total_frames}")
    if not (math.isfinite(video_fps) and video_fps > 0):
        raise ValueError(f"video_fps must be a positive number, got {video_fps}")
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number, got {fps}")
    if min_frames < 1 or max_frames < FRAME_FACTOR:
        raise ValueError(f"need min_frames >= 1 and max_frames >= {FRAME_FACTOR}, got {min_frames=} {max_frames=}")
    lo = _ceil_by(min_frames, FRAME_FACTOR)
    hi = _floor_by(min(max_frames, total_frames), FRAME_FACTOR)
    nframes = total_frames / video_fps * fps
    # upper bound applied last, as upstream: a video shorter than min_frames gets all it has (even count)
    nframes = min(min(max(nframes, lo), hi), total_frames)
    return _floor_by(nframes, FRAME_FACTOR)


def sample_frame_indices(
    total_frames: int, video_fps: float, fps: float = 2.0, min_frames: int = 4, max_frames: int = 16
) -> list[int]:
    """Indices of the sampled frames: ``linspace(0, total_frames - 1, nframes).round()``.

    ``nframes`` comes from :func:`smart_nframes`; the clip's ``sample_fps`` is
    ``nframes / total_frames * video_fps``. Raises ValueError for fewer than 2 frames or bad rates.

    >>> sample_frame_indices(10, 30.0)  # 0.67 frames at 2 fps -> min_frames=4
    [0, 3, 6, 9]
    """
    nframes = smart_nframes(total_frames, video_fps, fps, min_frames, max_frames)
    # float32 linspace + round-half-even, exactly as qwen-vl-utils (torch default dtype there)
    grid = torch.linspace(0, total_frames - 1, nframes, dtype=torch.float32)
    return grid.round().long().tolist()


def resize_frames(frames: Tensor, height: int, width: int) -> Tensor:
    """Resize ``frames`` [F, 3, H, W] uint8 to [F, 3, height, width] uint8.

    Same arithmetic as torchvision's tensor ``resize(..., BICUBIC, antialias=True)`` on uint8 (the call
    in qwen-vl-utils): float32 interpolation, clamp (bicubic overshoots), round, cast.
    """
    if frames.shape[-2:] == (height, width):
        return frames.contiguous()  # bicubic-AA at scale 1 is the identity (checked in the tests)
    out = F.interpolate(frames.float(), size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return out.clamp_(0, 255).round_().to(torch.uint8)


def _check_frames(frames: Tensor) -> None:
    if not isinstance(frames, Tensor) or frames.dim() != 4 or frames.shape[1] != 3:
        shape = tuple(frames.shape) if isinstance(frames, Tensor) else type(frames).__name__
        raise ValueError(f"frames must be a [F, 3, H, W] tensor, got {shape}")
    if frames.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}")


def _make_clip(
    frames: Tensor, indices: list[int], total_frames: int, video_fps: float, settings: VideoSettings, path: str
) -> VideoClip:
    """Resize sampled ``frames`` [F, 3, H, W] uint8 with the per-frame cap for F frames."""
    nframes, _, height, width = frames.shape
    max_pixels = settings.frame_max_pixels(nframes)
    new_h, new_w = smart_resize(height, width, settings.factor or IMAGE_FACTOR, settings.min_pixels, max_pixels)
    sample_fps = nframes / total_frames * video_fps
    times = tuple(i / video_fps for i in indices)  # as Qwen3VLProcessor: frames_indices / metadata.fps
    return VideoClip(resize_frames(frames, new_h, new_w), sample_fps, indices, path, times)


def frames_from_array(frames: Tensor, video_fps: float, settings: VideoSettings) -> VideoClip:
    """Sample and resize in-memory frames [F, 3, H, W] uint8 exactly like a decoded video of F frames."""
    _check_frames(frames)
    indices = sample_frame_indices(frames.shape[0], video_fps, settings.fps, settings.min_frames, settings.max_frames)
    return _make_clip(frames[indices], indices, frames.shape[0], video_fps, settings, MEMORY_PATH)


def _require_file(path: str | Path, what: str) -> Path:
    """`path` as a Path if it is a non-empty file; a directory is named as one, not as a missing file."""
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(errno.EISDIR, f"{what} path is a directory, not a file", str(path))
    if not p.is_file():
        raise FileNotFoundError(errno.ENOENT, f"{what} file not found", str(path))
    if p.stat().st_size == 0:
        raise MediaDecodeError(str(path), "file is empty (0 bytes)")
    return p


def load_video(path: str, settings: VideoSettings) -> VideoClip:
    """Decode the sampled frames of a video file with ``settings.backend`` and resize them.

    Raises FileNotFoundError for a missing file, IsADirectoryError for a directory and :class:`MediaDecodeError`
    for an empty, corrupt or frameless file, whatever the backend; never returns substitute frames.
    """
    _require_file(path, "video")
    reader = open_video(str(path), settings.backend)
    total_frames, video_fps = reader.total_frames, reader.fps
    if total_frames < FRAME_FACTOR:
        raise MediaDecodeError(str(path), f"{total_frames} frame(s); at least {FRAME_FACTOR} are needed")
    if not (math.isfinite(video_fps) and video_fps > 0):
        raise MediaDecodeError(str(path), f"invalid frame rate {video_fps}")
    indices = sample_frame_indices(total_frames, video_fps, settings.fps, settings.min_frames, settings.max_frames)
    frames = torch.from_numpy(reader.get_batch(indices)).permute(0, 3, 1, 2)  # [F, H, W, 3] -> [F, 3, H, W]
    return _make_clip(frames, indices, total_frames, video_fps, settings, str(path))


# ------------------------------------------------------------------------------------------- images


def _to_rgb(image):  # PIL.Image -> PIL.Image (RGB)
    from PIL import Image

    if image.mode == "RGBA":  # composite on white like qwen-vl-utils' to_rgb; other modes just convert
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.split()[3])
        return background
    return image.convert("RGB")


def _resize_pil(image, settings: ImageSettings) -> Tensor:
    """PIL RGB image -> [3, H, W] uint8 at smart_resize dims (PIL BICUBIC, as qwen-vl-utils' fetch_image)."""
    from PIL import Image

    width, height = image.size
    factor = settings.factor or IMAGE_FACTOR
    new_h, new_w = smart_resize(height, width, factor, settings.min_pixels, settings.max_pixels)
    if (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    array = np.array(image, dtype=np.uint8)  # [H, W, 3], a writable copy
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def load_image(path: str, settings: ImageSettings) -> Tensor:
    """Load an image file as [3, H, W] uint8 RGB at smart_resize dims.

    No EXIF rotation, as in qwen-vl-utils (the released pipeline). Raises FileNotFoundError for a
    missing file, IsADirectoryError for a directory and :class:`MediaDecodeError` for an unreadable file.
    """
    from PIL import Image, UnidentifiedImageError

    _require_file(path, "image")
    try:
        with Image.open(path) as raw:
            raw.load()  # decode now so truncated files fail here, not later
            image = _to_rgb(raw)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as e:
        raise MediaDecodeError(str(path), f"PIL cannot read it ({type(e).__name__}: {e})") from e
    return _resize_pil(image, settings)


def image_from_array(image, settings: ImageSettings) -> Tensor:
    """Resize an in-memory image (``[3, H, W]`` uint8 tensor or PIL image) like :func:`load_image`."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return _resize_pil(_to_rgb(image), settings)
    if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
        desc = f"{tuple(image.shape)} {image.dtype}" if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"image must be a [3, H, W] uint8 tensor or a PIL image, got {desc}")
    pil = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())  # [H, W, 3] -> RGB
    return _resize_pil(pil, settings)


@contextlib.contextmanager
def _same_scheduling() -> Iterator[None]:
    """Put the calling thread's scheduling policy and priority back as they were on leaving (Linux; elsewhere a
    no-op)."""
    if not hasattr(os, "sched_getscheduler"):
        yield
        return
    policy, param = os.sched_getscheduler(0), os.sched_getparam(0)
    try:
        yield
    finally:
        if (os.sched_getscheduler(0), os.sched_getparam(0)) != (policy, param):
            os.sched_setscheduler(0, policy, param)


def write_video(path: str | os.PathLike, frames: Tensor, fps: float | Fraction, codec: str = "libx264",
                pix_fmt: str | None = None, options: dict[str, str] | None = None) -> Path:
    """Encode ``frames`` [F, 3, H, W] uint8 (H, W even) at ``fps``; written atomically, the container taken from
    the suffix (``.mp4``, ``.webm``, ``.mkv``).

    Needs PyAV. By default H.264 4:4:4 at constant quality 10 keeps every pixel within a few levels of the
    input (no chroma subsampling to smear small coloured squares); decord reads it like any benchmark video.
    ``pix_fmt`` (default yuv444p for libx264, else yuv420p) and encoder ``options`` override that.

    The calling thread's scheduling policy is restored afterwards: the SVT-AV1 encoder bundled with PyAV
    (``libsvtav1``) makes a root process's calling thread real-time (``SCHED_FIFO``, priority 99), which every
    process it starts later inherits, starving the machine's other work (docs/video_decoding.md).
    """
    from ktr._imports import AV_AVAILABLE, require

    require(AV_AVAILABLE, "av")
    import av

    if frames.dim() != 4 or frames.shape[1] != 3 or frames.dtype != torch.uint8:
        raise ValueError(f"write_video: frames must be [F, 3, H, W] uint8, got {tuple(frames.shape)} {frames.dtype}")
    _, _, height, width = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"write_video: H.264 needs even frame sides, got {height}x{width}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix or '.mp4'}")
    with _same_scheduling(), av.open(str(tmp), "w") as container:
        rate = fps if isinstance(fps, Fraction) else Fraction(fps).limit_denominator(1000)  # 30000/1001 as given
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = width, height
        stream.pix_fmt = pix_fmt or ("yuv444p" if codec == "libx264" else "yuv420p")
        if options is not None or codec == "libx264":
            stream.options = options if options is not None else {"crf": "10", "preset": "ultrafast"}
        for frame in frames.permute(0, 2, 3, 1).contiguous().numpy():  # [H, W, 3] each
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder
    os.replace(tmp, path)
    return path
