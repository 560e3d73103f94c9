"""`has_open_gops` on long files: what looking past the first packets (the spots) finds and what it costs.

Clips written here with PyAV's x264 at 128x96, 25 fps, `--frames` frames each (default 6,000: 4 minutes, twice
the 3,000 packets the check reads from the start):
- `closed, keyint 250`: x264's defaults (closed GOPs), the common case: the check reads 3,000 packets and then
  the spots, and answers no;
- `closed, keyint 25`: the same with ten times the keyframes;
- `open GOPs throughout`: x264 `open-gop=1` (with `b-adapt=0`, so that B-frames precede every keyframe and
  each GOP opens) from the start: found within the first packets;
- `open GOPs after 3/5` and `after 4/5`: the closed clip up to a keyframe 3/5 (4/5) in, then an `open-gop=1`
  encode of the rest of the same frames, joined packet by packet (one stream, same encoder settings otherwise):
  the first open GOP lies past the first 3,000 packets, where only the spots (at 1/4, 1/2, 3/4 of the duration,
  300 packets each) can see it; after 4/5 it lies past the last spot's window too.
For each: packets, the check's answer and median milliseconds reading the first packets only (`spots=()`, ktr
before 2026-12-06) and with the spots (now), the median of a `load_video` call (16 frames, decord where
installed) for scale, and, where decord is installed, how many of 16 frames sampled evenly across the file
decord's sparse reads get wrong against PyAV decoding every frame from the start.

    python scripts/bench_open_gop.py --json docs/open_gop_spots.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

from ktr.data.decoders import available_backends, has_open_gops, open_video
from ktr.data.synthetic import moving_pattern
from ktr.data.video import VideoSettings, load_video, write_video

FPS = Fraction(25)
X264 = {"bf": "3", "crf": "23", "preset": "veryfast"}


def write_clips(root: Path, n: int) -> dict[str, Path]:
    frames = moving_pattern(n, 96, 128)
    closed = write_video(root / "closed_250.mp4", frames, FPS, "libx264", "yuv420p", X264)
    clips = {"closed, keyint 250": closed,
             "closed, keyint 25": write_video(root / "closed_25.mp4", frames, FPS, "libx264", "yuv420p",
                                              {**X264, "g": "25"}),
             "open GOPs throughout": write_video(root / "open.mp4", frames, FPS, "libx264", "yuv420p",
                                                 {**X264, "x264-params": "open-gop=1:b-adapt=0"})}
    keys = keyframes(closed)
    for fifths in (3, 4):  # the closed clip up to its first keyframe past 3/5 (4/5), then open GOPs
        split = min(k for k in keys if k >= fifths * n // 5)
        tail = write_video(root / f"tail{fifths}.mp4", frames[split:], FPS, "libx264", "yuv420p",
                           {**X264, "x264-params": "open-gop=1:b-adapt=0"})
        clips[f"open GOPs after {fifths}/5"] = join(closed, split, tail, root / f"late_open{fifths}.mp4")
    return clips


def keyframes(path: Path) -> list[int]:
    """Display indices of the keyframes of a constant-rate clip."""
    import av

    with av.open(str(path)) as c:
        s = c.streams.video[0]
        step = 1 / (FPS * s.time_base)
        return [round(p.pts / step) for p in c.demux(s) if p.size and p.is_keyframe]


def join(head: Path, frames: int, tail: Path, out: Path) -> Path:
    """`head`'s packets before its keyframe at frame `frames`, then every packet of `tail` moved to start there,
    remuxed into one stream (head's codec parameters: the two encodes differ only in `open-gop`). Where the tail's
    first decode times would not follow the head's, the tail moves on until they do (a frame's gap at most)."""
    import av

    with av.open(str(head)) as a, av.open(str(tail)) as b, av.open(str(out), "w") as o:
        sa, sb = a.streams.video[0], b.streams.video[0]
        so = o.add_stream_from_template(sa)
        cut = frames * int(1 / (FPS * sa.time_base))  # pts of frame `frames`; the tail's first frame has pts 0
        last_dts, shift = None, None
        for p in a.demux(sa):
            if p.dts is None or p.pts is None:
                continue
            if p.is_keyframe and p.pts >= cut:
                break
            last_dts, p.stream = p.dts, so
            o.mux(p)
        for p in b.demux(sb):
            if p.dts is None or p.pts is None:
                continue
            if shift is None:
                shift = cut + max(0, last_dts + 1 - (p.dts + cut))
            p.pts, p.dts, p.stream = p.pts + shift, p.dts + shift, so
            o.mux(p)
    return out


def timed(fn, repeats: int) -> tuple[object, float]:
    out, times = None, []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, statistics.median(times) * 1000


def packets(path: Path) -> int:
    import av

    with av.open(str(path)) as c:
        return sum(1 for p in c.demux(c.streams.video[0]) if p.size)


def decord_misses(path: Path) -> int | None:
    if "decord" not in available_backends():
        return None
    reader = open_video(str(path), "pyav")
    n = reader.total_frames
    indices = [int(i) for i in np.linspace(0, n - 1, 16).round()]
    truth = reader._decode_from_start(indices)
    sparse = open_video(str(path), "decord").get_batch(indices)
    return sum(not np.array_equal(truth[i], f) for i, f in zip(indices, sparse))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=6000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        clips = write_clips(Path(tmp), args.frames)
        settings = VideoSettings(fps=2.0, min_frames=16, max_frames=16, min_pixels=3136, max_pixels=12288)
        for name, path in clips.items():
            head, head_ms = timed(lambda p=path: has_open_gops(str(p), spots=()), args.repeats)
            spots, spots_ms = timed(lambda p=path: has_open_gops(str(p)), args.repeats)
            load_video(str(path), settings)  # warm-up
            _, load_ms = timed(lambda p=path: load_video(str(p), settings), max(3, args.repeats // 2))
            rows.append({"clip": name, "packets": packets(path), "MB": path.stat().st_size / 2**20,
                         "first_packets": head, "first_packets_ms": head_ms, "with_spots": spots,
                         "with_spots_ms": spots_ms, "load_video_ms": load_ms,
                         "decord_misses_of_16": decord_misses(path)})
    print("| clip | packets | MB | first 3,000 packets: open? (ms) | + spots: open? (ms) | load_video ms | "
          "decord wrong of 16 |")
    print("|---|---:|---:|---|---|---:|---:|")
    for r in rows:
        miss = "-" if r["decord_misses_of_16"] is None else r["decord_misses_of_16"]
        print(f"| {r['clip']} | {r['packets']:,} | {r['MB']:.1f} | {_yes(r['first_packets'])} "
              f"({r['first_packets_ms']:.1f}) | {_yes(r['with_spots'])} ({r['with_spots_ms']:.1f}) | "
              f"{r['load_video_ms']:.0f} | {miss} |")
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "python": platform.python_version(), "backends": available_backends()}
    print(machine)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "frames": args.frames, "repeats": args.repeats,
                                         "rows": rows}, indent=2) + "\n")


def _yes(v) -> str:
    return {True: "yes", False: "no", None: "cannot tell"}[v]


if __name__ == "__main__":
    main()
