"""Peak memory of rebuilding a trained policy from its checkpoint, as `ktr export` and `ktr explain` do.

    python scripts/bench_export_memory.py [--hidden 1024 --layers 48] [--json docs/export_memory.json]

A random-init policy of the built-in Qwen2.5-VL shape (real vocabulary, a wider and deeper trunk than the demo's)
is saved in float32 as a `ModelParallelStrategy` directory (torch.distributed.checkpoint) and as a Lightning
`.ckpt` file. Each way of loading it runs in a fresh process, which reports its peak resident set (ru_maxrss) and
checks that the weights arrived. Building the policy itself peaks higher than loading into it (random init), so the
peak is restarted once the policy is built (`/proc/self/clear_refs`, Linux only): the figure is the peak from then
on, i.e. the policy plus whatever loading holds beside it (a read-whole state dict is already in memory then).
- `policy only`: `load_policy` of the config, no checkpoint (the floor);
- `read whole`: `checkpoint_weights` then `load_trained_policy` (ktr before this script: the whole state dict in
  memory, in its saved float32, beside the policy);
- `in place`: `trained_policy` (a directory read straight into the policy's tensors; a file memory-mapped).
Each for a float32 and a bfloat16 policy. Prints a table and writes JSON with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from ktr.experiments.machine import describe

ROOT = Path(__file__).resolve().parents[1]
WAYS = ("policy only", "read whole", "in place")


def _cfg(hidden: int, layers: int, dtype: str):
    from ktr.config import PolicyConfig, TinyModelConfig

    tiny = TinyModelConfig(hidden_size=hidden, num_layers=layers, num_heads=hidden // 64, num_kv_heads=2,
                           intermediate_size=hidden * 11 // 4, tie_word_embeddings=False)
    return PolicyConfig(name_or_path="tiny", attn_implementation="sdpa", dtype=dtype, tiny=tiny)


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(args) -> None:
    import torch

    import ktr.model.trained as trained

    torch.set_num_threads(1)
    cfg = _cfg(args.hidden, args.layers, args.dtype)
    built = {}
    rebuild = trained._rebuilt

    def rebuilt_then_reset(c):
        policy = rebuild(c)
        Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from here: what loading adds
        built.update(rss_mib=_status_mib("VmRSS"), anon_mib=_status_mib("RssAnon"))
        return policy

    trained._rebuilt = rebuilt_then_reset
    peaks = {"RssAnon": 0.0, "RssFile": 0.0}
    done = threading.Event()

    def sample() -> None:  # anonymous memory (what cannot be dropped) and file-backed pages (mmap), every 5 ms
        while True:
            if "rss_mib" in built:
                for k in peaks:
                    peaks[k] = max(peaks[k], _status_mib(k))
            if done.is_set():
                return
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    if args.way == "policy only":
        policy = trained._rebuilt(cfg)
    elif args.way == "read whole":
        policy = trained.load_trained_policy(cfg, trained.checkpoint_weights(args.ckpt))
    else:
        policy = trained.trained_policy(cfg, args.ckpt)
    done.set()
    sampler.join()
    w = policy.model.state_dict()["lm_head.weight"]
    loaded = bool(torch.all(w[:4, :4].float() == 0.25).item())  # the saved weights are all 0.25
    n = sum(p.numel() for p in policy.model.parameters())
    print(json.dumps({"peak_rss_mib": _status_mib("VmHWM"), "rss_at_build_mib": built["rss_mib"],
                      "anon_at_build_mib": built["anon_mib"], "peak_anon_mib": peaks["RssAnon"],
                      "peak_file_mib": peaks["RssFile"],
                      "loaded": loaded, "params": n}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--json", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--way", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    import torch
    import torch.distributed.checkpoint as dcp

    from ktr.model.policy import load_policy

    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = load_policy(_cfg(args.hidden, args.layers, "float32")).model
        state = {"model." + k: torch.full_like(v, 0.25) if v.is_floating_point() else v
                 for k, v in model.state_dict().items()}
        del model
        size_mib = sum(v.numel() * v.element_size() for v in state.values()) / 2**20
        ckpts = {"directory": Path(tmp) / "dcp", "file": Path(tmp) / "last.ckpt"}
        dcp.save({"state_dict": state}, checkpoint_id=str(ckpts["directory"]), no_dist=True)
        torch.save({"state_dict": state, "global_step": 1}, ckpts["file"])
        del state
        for dtype in ("float32", "bfloat16"):
            for kind, ckpt in ckpts.items():
                for way in WAYS:
                    if way == "policy only" and kind == "file":
                        continue
                    cmd = [sys.executable, __file__, "--child", "--way", way, "--dtype", dtype, "--ckpt", str(ckpt),
                           "--hidden", str(args.hidden), "--layers", str(args.layers)]
                    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
                    r = json.loads(out.strip().splitlines()[-1])
                    rows.append({"dtype": dtype, "checkpoint": "-" if way == "policy only" else kind, "way": way,
                                 **r})
                    print(f"{dtype:9s} {rows[-1]['checkpoint']:9s} {way:12s} peak {r['peak_rss_mib']:8.0f} MiB "
                          f"loaded={r['loaded']}", flush=True)
    floor = {r["dtype"]: r["peak_rss_mib"] for r in rows if r["way"] == "policy only"}  # the policy alone
    anon = {r["dtype"]: r["anon_at_build_mib"] for r in rows if r["way"] == "policy only"}
    print(f"\ncheckpoint: {size_mib:.0f} MiB float32 ({rows[0]['params']:,} parameters)")
    print("| policy dtype | checkpoint | way | peak RSS once built | above the policy alone | "
          "anonymous above the policy alone | file-backed (mmap) peak | weights loaded |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {r['checkpoint']} | {r['way']} | {r['peak_rss_mib']:.0f} | "
              f"{r['peak_rss_mib'] - floor[r['dtype']]:+.0f} | {r['peak_anon_mib'] - anon[r['dtype']]:+.0f} | "
              f"{r['peak_file_mib']:.0f} | {r['loaded']} |")
    print("(MiB. Anonymous memory cannot be dropped; file-backed pages of a memory-mapped checkpoint are the page "
          "cache's, dropped under pressure. Both peaks sampled every 5 ms once the policy is built.)")
    if args.json:
        Path(args.json).write_text(json.dumps({"checkpoint_mib": size_mib, "hidden": args.hidden,
                                               "layers": args.layers, "machine": describe(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
