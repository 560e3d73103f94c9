"""Decode the same videos with every installed backend (decord, PyAV) and compare what `load_video` sees.

Videos: the shared fixture clip and the same clip re-encoded as 10-bit H.264 (4:2:0), plus clips written here
with PyAV: H.264, MPEG-4 Part 2, VP9, two MPEG-4 variants with B-frames (open GOPs, in mp4 and AVI), HEVC (x265's
default open GOPs), H.264 with x264's `open-gop`, 10-bit
H.264 in 4:2:0, 4:2:2 and 4:4:4, 10-bit HEVC tagged HDR (BT.2020, PQ), and AV1 in 8 and 10 bits (each where
PyAV's FFmpeg has the encoder). For each file and backend: frame count, fps, whether the sampled indices equal
the reference's, the largest and mean |difference| of the sampled frames (RGB uint8, before resizing) from the
reference, the median milliseconds of a `load_video` call (open, sample, decode, resize; one thread), whether
the file has open GOPs (`has_open_gops`) and so which backend `video.backend: auto` reads it with where decord
is installed; a backend that cannot read a file gets its error instead.
The reference is decord reading every frame in order from the start (no seeking), or PyAV doing the same where
decord is not installed or cannot open the file.

    python scripts/decode_compare.py --json docs/video_decoding.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from ktr.data.decoders import MediaDecodeError, available_backends, has_open_gops, open_video
from ktr.data.synthetic import moving_pattern
from ktr.data.video import VideoSettings, load_video, write_video

DEFAULT_VIDEO = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "video1.mp4"
# name -> (file, encoder, pix_fmt, encoder options); every clip: 240 frames, 240x320, 25 fps
CLIPS = {
    "h264": ("h264.mp4", "libx264", "yuv420p", {"g": "25", "bf": "3", "crf": "18"}),
    "mpeg4": ("mpeg4.mp4", "mpeg4", "yuv420p", {"g": "25"}),
    "vp9": ("vp9.webm", "libvpx-vp9", "yuv420p", {"g": "25"}),
    "mpeg4+B": ("mpeg4_b.mp4", "mpeg4", "yuv420p", {"g": "12", "bf": "2"}),
    "mpeg4+B avi": ("mpeg4_b.avi", "mpeg4", "yuv420p", {"g": "12", "bf": "2"}),
    "hevc": ("hevc.mp4", "libx265", "yuv420p", {"g": "25", "bf": "3", "x265-params": "log-level=error"}),
    "h264 open-gop": ("h264_open.mp4", "libx264", "yuv420p", {"g": "25", "bf": "3", "crf": "18",
                                                              "x264-params": "open-gop=1"}),
    "h264 10-bit": ("h264_10.mp4", "libx264", "yuv420p10le", {"g": "25", "bf": "3", "crf": "18"}),
    "h264 10-bit 4:2:2": ("h264_10_422.mp4", "libx264", "yuv422p10le", {"g": "25", "bf": "3", "crf": "18"}),
    "h264 10-bit 4:4:4": ("h264_10_444.mp4", "libx264", "yuv444p10le", {"g": "25", "bf": "3", "crf": "18"}),
    "hevc 10-bit HDR": ("hevc_hdr.mp4", "libx265", "yuv420p10le",
                        {"g": "25", "x265-params": "log-level=error:colorprim=bt2020:transfer=smpte2084:"
                                                   "colormatrix=bt2020nc", "color_primaries": "bt2020",
                         "color_trc": "smpte2084", "colorspace": "bt2020nc"}),
    "av1": ("av1.mp4", "libsvtav1", "yuv420p", {"g": "25"}),
    "av1 10-bit": ("av1_10.mkv", "libsvtav1", "yuv420p10le", {"g": "25"}),
}


def synthetic_frames(n: int, height: int = 240, width: int = 320) -> torch.Tensor:
    """[n, 3, H, W] uint8: drifting colour ramps and a moving red square (every frame differs)."""
    return moving_pattern(n, height, width, sweep=2 * height // 3)


def write_clips(root: Path) -> dict[str, Path]:
    import av

    frames = synthetic_frames(240)
    return {name: write_video(root / file, frames, Fraction(25), codec, pix_fmt=pix_fmt, options=options)
            for name, (file, codec, pix_fmt, options) in CLIPS.items() if codec in av.codecs_available}


def ten_bit_copy(video: Path, out: Path) -> Path:
    """The real clip re-encoded as 10-bit 4:2:0 H.264 at its own rate (what a 10-bit source looks like)."""
    import av

    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
    return write_video(out, torch.from_numpy(frames).permute(0, 3, 1, 2), rate, "libx264", pix_fmt="yuv420p10le",
                       options={"crf": "16", "preset": "veryfast"})


def opens(path: Path, backend: str) -> bool:
    try:
        open_video(str(path), backend)
    except MediaDecodeError:
        return False
    return True


def sequential_frames(path: Path, backend: str, indices: list[int]) -> np.ndarray:
    """Frames at `indices` read one after the other from the start, without seeking: [F, H, W, 3] uint8."""
    if backend == "decord":
        import decord

        reader, wanted, frames = decord.VideoReader(str(path), num_threads=1), set(indices), {}
        for i in range(max(indices) + 1):
            frame = reader.next()
            if i in wanted:
                frames[i] = frame.asnumpy()
        return np.stack([frames[i] for i in indices])
    reader = open_video(str(path), "pyav")
    by_index = reader._decode_from_start(sorted(set(indices)))
    return np.stack([by_index[i] for i in indices])


def file_facts(path: Path, reference: str, repeats: int) -> dict:
    """What a file's rows share: its codec, the reference, and `has_open_gops` with its median time (what `auto`
    adds to every file it reads with decord)."""
    import av

    with av.open(str(path)) as container:
        cc = container.streams.video[0].codec_context
        codec = f"{cc.name} {cc.pix_fmt}"
    check = []
    for _ in range(repeats):
        start = time.perf_counter()
        open_gops = has_open_gops(str(path))
        check.append(time.perf_counter() - start)
    return {"file": path.name, "codec": codec, "reference": reference, "open_gops": open_gops,
            "open_gop_check_ms": statistics.median(check) * 1000}


def measure(path: Path, backend: str, settings: VideoSettings, facts: dict, repeats: int) -> dict:
    base = {**facts, "backend": backend}
    reference = facts["reference"]
    try:
        open_video(str(path), backend)
    except MediaDecodeError as e:
        return {**base, "error": e.reason}
    settings = VideoSettings(**{**vars(settings), "backend": backend})
    clip = load_video(str(path), settings)  # warm-up (imports, page cache), and the sampled indices
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        load_video(str(path), settings)
        times.append(time.perf_counter() - start)
    ms = statistics.median(times) * 1000  # the median: other work shares the CPUs
    reader = open_video(str(path), backend)
    sampled = reader.get_batch(clip.indices).astype(np.int16)
    truth = sequential_frames(path, reference, clip.indices).astype(np.int16)
    diff = np.abs(sampled - truth)
    return {**base, "frames": reader.total_frames,
            "fps": reader.fps, "indices": clip.indices, "max_abs_diff": int(diff.max()),
            "mean_abs_diff": float(diff.mean()), "frames_differing": int((diff > 0).any(axis=(1, 2, 3)).sum()),
            "ms_per_clip": ms}


def table(rows: list[dict]) -> str:
    """A Markdown table of the rows (what docs/video_decoding.md shows)."""
    header = ("| file | codec | open GOPs (check ms) | backend | frames | fps | indices equal | max abs diff "
              "| mean abs diff | frames differing | ms per clip |")
    lines = [header, "|---|---|---|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        head = (f"| {r['file']} | {r['codec']} | {_yes_no(r['open_gops'])} ({r['open_gop_check_ms']:.1f}) "
                f"| {r['backend']}")
        if "error" in r:  # decord's own message ends "ERROR <what>)"; the JSON keeps it whole
            found = re.search(r"ERROR (.*?)\)?$", r["error"])
            lines.append(f"{head} | cannot open: {found.group(1) if found else r['error'][:80]} | | | | | | |")
            continue
        lines.append(f"{head} | {r['frames']} | {r['fps']:.4f} | "
                     f"{r['indices_equal']} | {r['max_abs_diff']} | {r['mean_abs_diff']:.4f} | "
                     f"{r['frames_differing']}/{len(r['indices'])} | {r['ms_per_clip']:.1f} |")
    return "\n".join(lines)


def _yes_no(flag: bool | None) -> str:
    return "?" if flag is None else "yes" if flag else "no"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video", type=Path, default=DEFAULT_VIDEO, help="a real clip to include")
    parser.add_argument("--repeats", type=int, default=9, help="load_video calls timed per file and backend")
    parser.add_argument("--max-frames", type=int, default=16, help="VideoSettings.max_frames")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    backends = available_backends()
    settings = VideoSettings(max_frames=args.max_frames)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        real = [args.video, ten_bit_copy(args.video, Path(tmp) / "video1_10bit.mp4")] if args.video.is_file() else []
        for path in real + list(write_clips(Path(tmp)).values()):
            reference = "decord" if "decord" in backends and opens(path, "decord") else "pyav"
            facts = file_facts(path, reference, args.repeats)
            per_file = [measure(path, b, settings, facts, args.repeats) for b in backends]
            ref_row = per_file[backends.index(reference)]
            for r in per_file:
                if "error" not in r:
                    r["indices_equal"] = "ref" if r["backend"] == reference else str(r["indices"] == ref_row["indices"])
            rows += per_file
    reference = "decord" if "decord" in backends else "pyav"
    print(f"reference: {reference} reading every frame in order (PyAV where decord cannot open a file); "
          f"settings: fps={settings.fps} "
          f"max_frames={settings.max_frames}; cpus={os.cpu_count()} {platform.machine()}")
    print(table(rows))
    if args.json:
        meta = {"reference": reference, "backends": backends, "fps": settings.fps, "max_frames": settings.max_frames,
                "repeats": args.repeats, "cpus": os.cpu_count(), "machine": platform.machine(),
                "processor": platform.processor(), "python": platform.python_version(), **versions()}
        args.json.write_text(json.dumps({"settings": meta, "results": rows}, indent=2) + "\n")


def versions() -> dict:
    import av

    out = {"av": av.__version__, "av_libavcodec": ".".join(map(str, av.library_versions["libavcodec"]))}
    try:
        import decord
    except (ImportError, OSError):
        return out
    libs = Path(decord.__file__).parent.parent / "decord.libs"
    bundled = sorted(p.name for p in libs.glob("libavcodec*")) if libs.is_dir() else []
    return {**out, "decord": decord.__version__, "decord_libavcodec": bundled[0] if bundled else "system"}


if __name__ == "__main__":
    main()
