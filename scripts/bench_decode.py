"""Decode throughput of the vision pipeline (load_video + patchify) under a torch DataLoader.

Each item decodes, samples, resizes and patchifies the same clip, so the numbers measure the per-item
cost of the pipeline and how it scales with DataLoader workers.

    python scripts/bench_decode.py --items 24 --workers 0 1 2 --json bench_decode.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from ktr.data.patches import num_placeholder_tokens, patchify
from ktr.data.video import VideoSettings, load_video

DEFAULT_VIDEO = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "video1.mp4"


class RepeatedClip(Dataset):
    """The same video ``n`` times; an item is (pixel_values [P, 1176] float32, grid_thw [3])."""

    def __init__(self, path: str, n: int, settings: VideoSettings) -> None:
        self.path, self.n, self.settings = path, n, settings

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        clip = load_video(self.path, self.settings)
        return patchify(clip.frames)


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)  # workers share the cores; intra-op threads would oversubscribe them


def bench(path: str, items: int, workers: int, settings: VideoSettings) -> dict:
    loader = DataLoader(
        RepeatedClip(path, items, settings),
        batch_size=None,  # items have no batch dimension; no collation
        num_workers=workers,
        worker_init_fn=_one_thread if workers else None,
    )
    frames = tokens = 0
    start = time.perf_counter()
    for pixel_values, grid in loader:  # noqa: B007 (the last batch's size is reported)
        frames += int(grid[0]) * 2  # temporal patch 2: grid t counts frame pairs
        tokens += num_placeholder_tokens(grid)
    seconds = time.perf_counter() - start
    return {
        "workers": workers,
        "items": items,
        "seconds": seconds,
        "items_per_s": items / seconds,
        "frames_per_s": frames / seconds,
        "tokens_per_item": tokens // items,
        "patch_rows_per_item": int(pixel_values.shape[0]),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video", default=str(DEFAULT_VIDEO), help="video file to decode repeatedly")
    parser.add_argument("--items", type=int, default=24, help="items per measurement")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts")
    parser.add_argument("--max-pixels", type=int, default=128 * 28 * 28, help="VideoSettings.max_pixels")
    parser.add_argument("--max-frames", type=int, default=16, help="VideoSettings.max_frames")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if not Path(args.video).is_file():
        raise SystemExit(f"video not found: {args.video}")

    settings = VideoSettings(max_pixels=args.max_pixels, max_frames=args.max_frames)
    bench(args.video, 2, 0, settings)  # warm-up: imports, page cache
    rows = [bench(args.video, args.items, w, settings) for w in args.workers]

    print(f"{args.video}  max_pixels={args.max_pixels} max_frames={args.max_frames}  "
          f"torch threads={torch.get_num_threads()} cpus={os.cpu_count()}")  # fmt: skip
    print(f"{'workers':>7} {'items':>5} {'seconds':>8} {'items/s':>8} {'frames/s':>9} {'tokens/item':>11}")
    for r in rows:
        print(f"{r['workers']:>7} {r['items']:>5} {r['seconds']:>8.2f} {r['items_per_s']:>8.2f} "
              f"{r['frames_per_s']:>9.1f} {r['tokens_per_item']:>11}")  # fmt: skip
    if args.json:
        meta = {"video": args.video, "max_pixels": args.max_pixels, "max_frames": args.max_frames,
                "cpus": os.cpu_count(), "torch": torch.__version__, "machine": platform.machine()}  # fmt: skip
        args.json.write_text(json.dumps({"settings": meta, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
