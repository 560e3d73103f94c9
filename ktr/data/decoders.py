"""Video decoding backends behind one small interface (layer L2: numpy; decord or PyAV, imported when used).

`VIDEO_BACKENDS` maps a name to an opener: `open(path) -> VideoReader` with `total_frames`, `fps` and
`get_batch(indices) -> [F, H, W, 3]` uint8 RGB. `video.backend: auto` takes decord when it imports, else PyAV;
a file decord cannot open (AV1) or cannot read right (open GOPs) is then read with PyAV (`open_video`).

The PyAV reader reproduces decord 0.6 (docs/video_decoding.md):
- frame count: the packets of the best video stream, as decord's index (`len(decord.VideoReader)`); with no
  packet, the stream's `nb_frames`, else `avg_frame_rate * duration` (decord's fallback);
- fps: the stream's `avg_frame_rate` (`get_avg_fps()`);
- frame `i`: the decoded frame whose pts is the `i`-th smallest packet pts (presentation order); a pts the
  decoder never outputs (e.g. packets an mp4 edit list discards) gives the next decoded frame, and at the end
  of the stream the last one, as decord's sampled reads do;
- colours: FFmpeg's swscale to rgb24 with the frame's colour matrix and range; frames of another size are
  scaled (bilinear) to the stream's size, and a 90/180/270 degree display rotation is applied, as decord does.
  Bit-identical for 8-bit and 10-bit 4:4:4 video; 10-bit 4:2:0 / 4:2:2 differ slightly at colour edges (the
  two FFmpeg versions upsample such chroma differently; docs/video_decoding.md).
Frames are found by seeking to the keyframe before each wanted frame and decoding forward; when a seek does
not land where the packet index says, the file is decoded from the start instead, so seeking never changes
the result (tests/test_video_backends.py checks both against decord and against each other).
"""

from __future__ import annotations

import bisect
import functools
import importlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol, get_args

import numpy as np

from ktr import _imports
from ktr.config import ConfigError

logger = logging.getLogger(__name__)

VideoBackend = Literal["auto", "decord", "pyav"]
BACKEND_CHOICES = get_args(VideoBackend)
PIP_PACKAGES = {"decord": "decord", "pyav": "av"}
"""Backend -> the package to `pip install` (also its import name)."""
_INSTALL_HINTS = {"decord": "decord has wheels for Linux x86-64 only; elsewhere use video.backend: pyav or auto",
                  "pyav": "PyAV bundles FFmpeg on every platform"}
_AV_TIME_BASE = 1_000_000


class MediaDecodeError(RuntimeError):
    """A media file exists but cannot be decoded (empty, corrupt, no frames). Never replaced by other data."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, reason)  # both in ``args`` so the error pickles across DataLoader workers
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot decode {self.path!r}: {self.reason}"


class VideoReader(Protocol):
    """An opened video: what sampling needs, then the sampled frames."""

    total_frames: int
    fps: float

    def get_batch(self, indices: list[int]) -> np.ndarray:
        """Frames at `indices` (any order, repeats allowed) as [F, H, W, 3] uint8 RGB."""
        ...


# ------------------------------------------------------------------------------------------ choosing


def _installed(name: str) -> bool:
    return {"decord": _imports.DECORD_AVAILABLE, "pyav": _imports.AV_AVAILABLE}[name]


def _install_message(name: str) -> str:
    return f"pip install {PIP_PACKAGES[name]} ({_INSTALL_HINTS[name]})"


def check_backend(key: str, name: str) -> None:
    """Config-time check: an explicitly chosen backend must be installed (`auto` is resolved when decoding)."""
    if name != "auto" and not _installed(name):
        raise ConfigError(f"{key}={name!r}, but the `{PIP_PACKAGES[name]}` package is not installed: "
                          f"{_install_message(name)}")


def _import(name: str):
    """Import a backend's package. PyAV goes first: decord loads its bundled FFmpeg 4.1 with RTLD_GLOBAL, and
    PyAV imported after it resolves some FFmpeg calls there (measured: its libvpx-vp9 encoder then rejects
    options); PyAV's libraries load privately, so the other order is safe for both."""
    if name != "pyav" and _imports.AV_AVAILABLE:
        try:
            importlib.import_module("av")
        except (ImportError, OSError):  # a broken PyAV must not hide decord
            pass
    return importlib.import_module(PIP_PACKAGES[name])


def _importable(name: str) -> bool:
    try:
        _import(name)
    except (ImportError, OSError):  # a wheel whose shared libraries do not load counts as absent
        return False
    return True


def available_backends() -> list[str]:
    """The backends whose package imports here, in `auto`'s order of preference."""
    return [name for name in ("decord", "pyav") if _importable(name)]


@functools.cache
def auto_backend() -> str:
    """decord when it imports, else PyAV; decided (and logged) once per process."""
    found = available_backends()
    if not found:
        raise ImportError(f"no video decoder is installed for video.backend=auto: {_install_message('pyav')}")
    logger.info("video.backend=auto decodes videos with %s", found[0])
    return found[0]


def resolve_backend(name: str) -> str:
    """The concrete backend for a `video.backend` value."""
    if name == "auto":
        return auto_backend()
    if name not in VIDEO_BACKENDS:
        raise ConfigError(f"video.backend must be one of {', '.join(map(repr, BACKEND_CHOICES))}, got {name!r}")
    return name


def open_video(path: str, backend: str) -> VideoReader:
    """Open `path` with `backend` (`auto`, `decord`, `pyav`); MediaDecodeError if it cannot be read.

    `auto` reads with decord where it imports, as the released pipeline does, except for the files on which decord
    has no right frames to give; those are read with PyAV, and the switch is logged:
    - a file decord cannot open (its FFmpeg 4.1 has no AV1 decoder, for one);
    - a file with open GOPs (`has_open_gops`: MPEG-4 with B-frames, x265's defaults, x264's `open-gop`), where
      decord's sampled reads return frames a few positions off after a seek (docs/video_decoding.md).
    This departs from the released code, which read both kinds with decord (wrong frames or an error);
    `video.backend: decord` reproduces it. A named backend never switches. When both fail, the error gives both
    reasons.
    """
    name = resolve_backend(backend)
    switch = backend == "auto" and name == "decord" and _importable("pyav")
    if switch and has_open_gops(path):
        try:
            reader = VIDEO_BACKENDS["pyav"](path)
        except MediaDecodeError:
            pass  # PyAV cannot read it after all: decord's frames, as released
        else:
            _log_switch(path, "it has open GOPs, on which decord's sampled reads return wrong frames")
            return reader
    try:
        return VIDEO_BACKENDS[name](path)
    except MediaDecodeError as first:
        if not switch:
            raise
        try:
            reader = VIDEO_BACKENDS["pyav"](path)
        except MediaDecodeError as second:
            raise MediaDecodeError(path, f"{first.reason}; {second.reason}") from second
        _log_switch(path, first.reason)
        return reader


OPEN_GOP_PACKETS = 3000
"""`has_open_gops` demuxes at most this many packets from the start: 2 minutes at 25 fps; the fixture clip's 491
take 3 to 5 ms."""
OPEN_GOP_SPOTS = (0.25, 0.5, 0.75)
"""Where in a longer file (fractions of its duration) `has_open_gops` also looks, from the keyframe before each."""
OPEN_GOP_SPOT_PACKETS = 300
"""Packets demuxed at each spot: at least one GOP after the keyframe sought to at x264's default `keyint` (250)."""


def has_open_gops(path: str, max_packets: int = OPEN_GOP_PACKETS, spots: tuple[float, ...] = OPEN_GOP_SPOTS,
                  spot_packets: int = OPEN_GOP_SPOT_PACKETS) -> bool | None:
    """Whether the best video stream of `path` has open GOPs: a keyframe after the first is followed, in decode
    order, by a packet shown before it (leading pictures that reference the previous GOP). decord counts frames
    from the keyframe it seeks to, but the decoder drops those leading pictures after the seek, so decord's
    sampled reads land a few frames off (tests/test_video_backends.py: of 13 clips, decord misses on exactly the
    5 this finds).

    Demuxes (no decoding) the first `max_packets` packets, stopping at the first such packet. x264's `open-gop`
    leaves a GOP closed where no B-frame precedes its keyframe, so the first open one can come late: in a file with
    more packets than that, it also seeks to each of `spots` (fractions of the duration) and demuxes `spot_packets`
    from the keyframe there. A file whose open GOPs all lie outside those windows counts as closed (decord's frames,
    as released). None when PyAV cannot tell (it cannot open the file, or the packets carry no pts).
    """
    av = _import("pyav")
    try:
        with av.open(path) as container:
            stream = _best_video_stream(container)
            if stream is None:
                return None
            found, first_key, more = _leading_pictures(container.demux(stream), max_packets, None)
            if found is not False or not more or first_key is None or not container.duration:
                return found
            start = container.start_time or 0
            for spot in spots:  # container.seek: microseconds, back to the keyframe at or before
                container.seek(start + int(spot * container.duration))
                found, _, _ = _leading_pictures(container.demux(stream), spot_packets, first_key)
                if found is not False:
                    return found
    except (av.error.FFmpegError, OSError):
        return None
    return False


def _leading_pictures(packets, limit: int, first_key: int | None) -> tuple[bool | None, int | None, bool]:
    """Scans up to `limit` of `packets` (decode order) for one shown before the keyframe last seen, that keyframe not
    being the file's first (pts `first_key`; None: the first keyframe met here is). Returns (found: None where a
    packet has no pts, the file's first keyframe's pts, whether packets remained past `limit`)."""
    key_pts = None
    for n, packet in enumerate(packets):
        if n >= limit:
            return False, first_key, True
        if packet.pts is None:
            if packet.size == 0:
                continue  # PyAV's trailing flush packet
            return None, first_key, False
        if packet.is_keyframe:
            first_key = packet.pts if first_key is None else first_key
            key_pts = packet.pts
        elif key_pts is not None and key_pts > first_key and packet.pts < key_pts:
            return True, first_key, False
    return False, first_key, False


_switched = 0  # files this process read with PyAV under `auto` although decord imports


def _log_switch(path: str, why: str) -> None:
    global _switched
    _switched += 1
    if _switched == 1:
        logger.warning("video.backend=auto: %s is read with PyAV, not decord: %s (docs/video_decoding.md). Further "
                       "files read this way are logged at INFO", path, why)
    else:
        logger.info("video.backend=auto: %s read with PyAV (%s; file %d so far)", path, why, _switched)


def _require_module(name: str):
    try:
        return _import(name)
    except ImportError as e:
        raise ImportError(f"video.backend={name!r} needs the `{PIP_PACKAGES[name]}` package: "
                          f"{_install_message(name)}") from e


# -------------------------------------------------------------------------------------------- decord


class _DecordReader:
    def __init__(self, path: str) -> None:
        decord = _require_module("decord")
        self.path, self._errors = path, (RuntimeError, decord.DECORDError)  # decord raises both for bad input
        try:
            self._reader = decord.VideoReader(path, num_threads=1)
            self.total_frames, self.fps = len(self._reader), float(self._reader.get_avg_fps())
        except self._errors as e:
            raise MediaDecodeError(path, f"decord cannot open it ({e})") from e

    def get_batch(self, indices: list[int]) -> np.ndarray:
        try:
            return self._reader.get_batch(indices).asnumpy()  # [F, H, W, 3] uint8
        except self._errors as e:
            raise MediaDecodeError(self.path, f"decoding frames {indices} failed ({e})") from e


# --------------------------------------------------------------------------------------------- PyAV


@dataclass
class _PacketIndex:
    """What one demuxing pass (no decoding) tells about the best video stream."""

    pts: list[int]  # [N] packet pts, sorted: frame i is presented at pts[i]
    key_pts: list[int]  # [K] sorted pts of the keyframe packets
    by_pts: bool  # every packet has a distinct pts, so frames can be identified (and seeked) by pts


def _index_packets(container, stream) -> _PacketIndex:
    packets = [(p.pts, p.is_keyframe) for p in container.demux(stream)
               if not (p.size == 0 and p.pts is None and p.dts is None)]  # PyAV's trailing flush packet
    pts = [p for p, _ in packets]
    by_pts = None not in pts and len(set(pts)) == len(pts)
    keys = sorted(p for p, key in packets if key and p is not None)
    return _PacketIndex(sorted(pts) if by_pts else pts, keys, by_pts)


def _metadata_frame_count(container, stream, fps: float) -> int:
    """decord's count when the stream has no packet: nb_frames, else avg_frame_rate * duration (truncated)."""
    if stream.frames > 0:
        return stream.frames
    if container.duration is None or not math.isfinite(fps):
        return 0
    return int(fps * container.duration / _AV_TIME_BASE)


def _best_video_stream(container):
    """The stream decord reads (`av_find_best_stream`); PyAV < 13 lacks `best`, so its first video stream."""
    if hasattr(container.streams, "best"):
        return container.streams.best("video")
    return container.streams.video[0] if container.streams.video else None


def _quarter_turns(rotation: int) -> int:
    """Counter-clockwise quarter turns decord applies for a display rotation (only multiples of 90 degrees)."""
    return {90: 1, 180: 2, -180: 2, -90: 3}.get(rotation, 0)


class _PyAVReader:
    def __init__(self, path: str) -> None:
        self._av = _require_module("pyav")
        self.path = path
        self.frames_decoded = 0
        """Frames decoded by the last `get_batch` (seeking keeps it well below `total_frames` on long videos)."""
        try:
            with self._av.open(path) as container:
                stream = _best_video_stream(container)
                if stream is None:
                    raise MediaDecodeError(path, "pyav cannot open it (no video stream)")
                rate = stream.average_rate
                self.fps = float(rate) if rate else math.nan  # decord: num / den, so 0/0 is nan
                self.width, self.height = stream.codec_context.width, stream.codec_context.height
                self._index = _index_packets(container, stream)
                self.total_frames = len(self._index.pts) or _metadata_frame_count(container, stream, self.fps)
        except self._av.error.FFmpegError as e:
            raise MediaDecodeError(path, f"pyav cannot open it ({e})") from e

    def get_batch(self, indices: list[int]) -> np.ndarray:
        wanted = sorted(set(indices))
        if wanted and (wanted[0] < 0 or wanted[-1] >= self.total_frames):
            raise ValueError(f"frame indices must be in [0, {self.total_frames}), got {indices}")
        self.frames_decoded = 0
        try:
            frames = self._seek_and_decode(wanted) if self._index.by_pts else None
            if frames is None:
                frames = self._decode_from_start(wanted)
        except self._av.error.FFmpegError as e:
            raise MediaDecodeError(self.path, f"decoding frames {indices} failed ({e})") from e
        missing = [i for i in wanted if i not in frames]
        if missing:
            raise MediaDecodeError(self.path, f"decoding frames {indices} failed (no frame for {missing})")
        return np.stack([frames[i] for i in indices])  # [F, H, W, 3]

    def _open(self):
        container = self._av.open(self.path)
        stream = _best_video_stream(container)
        stream.codec_context.thread_count = 1  # as decord's num_threads=1: DataLoader workers parallelise
        return container, stream

    def _rgb(self, frame) -> np.ndarray:
        """One decoded frame -> [H, W, 3] uint8, converted like decord's filter graph."""
        same = (frame.width, frame.height) == (self.width, self.height)
        size = {} if same else {"width": self.width, "height": self.height}
        array = frame.to_ndarray(format="rgb24", **size)  # swscale; PyAV's default interpolation is bilinear
        turns = _quarter_turns(getattr(frame, "rotation", 0))  # PyAV >= 14; older ones cannot read it
        return np.ascontiguousarray(np.rot90(array, turns)) if turns else array

    def _seek_and_decode(self, wanted: list[int]) -> dict[int, np.ndarray] | None:
        """Frames at `wanted` (sorted) by keyframe seeks; None when the decoded frames cannot be trusted to be
        those of a decode from the start (then the caller decodes from the start)."""
        out: dict[int, np.ndarray] = {}
        keys = set(self._index.key_pts)
        container, stream = self._open()
        with container:
            frames, latest, anchored = None, None, False
            for i in wanted:
                target = self._index.pts[i]
                k = bisect.bisect_right(self._index.key_pts, target) - 1
                if k > 0 and (frames is None or latest.pts < self._index.key_pts[k]):
                    # the wanted frame is past the next keyframe: skip what lies in between (mov and matroska
                    # seek by pts, so this lands on that keyframe)
                    container.seek(self._index.key_pts[k], stream=stream, backward=True)
                    frames, anchored = container.decode(stream), False
                elif frames is None:
                    frames = container.decode(stream)
                hit = None
                for frame in frames:
                    self.frames_decoded += 1
                    if frame.pts is None:
                        return None
                    anchored = anchored or (frame.pts in keys and frame.pts <= target)
                    latest = frame
                    if frame.pts >= target:
                        hit = frame
                        break
                if not anchored:  # no keyframe at or before the target was decoded: a seek went too far
                    return None
                out[i] = self._rgb(hit if hit is not None else latest)  # pts >= target; at the end, the last
        return out

    def _decode_from_start(self, wanted: list[int]) -> dict[int, np.ndarray]:
        """Frames at `wanted` (sorted) by decoding from the start: by pts, or by output order without pts."""
        out: dict[int, np.ndarray] = {}
        by_pts, pending, latest = self._index.by_pts, list(wanted), None
        container, stream = self._open()
        with container:
            for n, frame in enumerate(container.decode(stream)):
                self.frames_decoded += 1
                if by_pts and frame.pts is None:
                    continue  # cannot be placed in presentation order
                latest, position = frame, frame.pts if by_pts else n
                while pending and position >= (self._index.pts[pending[0]] if by_pts else pending[0]):
                    out[pending.pop(0)] = self._rgb(frame)
                if not pending:
                    break
            if latest is not None:
                out.update((i, self._rgb(latest)) for i in pending)  # past the end: the last frame, as decord
        return out


VIDEO_BACKENDS: dict[str, Callable[[str], VideoReader]] = {"decord": _DecordReader, "pyav": _PyAVReader}
"""Backend name -> opener. Add a decoder here; `video.backend` accepts the names in BACKEND_CHOICES."""
