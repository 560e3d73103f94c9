"""The one prepared GPU check (layer L4): its parts at real or toy sizes, each under a time guard, and the
report (`scripts/gpu_check.py` is the command line; its docstring describes the parts and how to run it).

`run(check, names, budget_s)` runs the parts cheapest first; each runs under its own time guard and inside its
own try, so that one failure (an error, out of memory, the guard) is recorded and the next part still runs.
The comparison parts and the markdown report are `ktr.experiments.gpu_parts`; the step parts are
`ktr.experiments.bench_step.measure`, the loss part `ktr.experiments.bench_loss.inprocess_records`.
"""

from __future__ import annotations

import contextlib
import gc
import platform
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ktr.experiments import bench_loss, bench_step
from ktr.experiments import gpu_parts as parts

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
    decode_new_tokens: tuple[int, ...] = (128, 768)
    guards: dict = field(default_factory=lambda: dict(draw=30, vision_processor=60, parity=90, prefix=120,
                                                      decode=150, loss_bench=120, fsdp_step=120, qlora_step=240,
                                                      qlora_step_naive=180, qlora_step_grpo=240))


REAL = Sizes(tiny=False)
_TINY_VIDEO = dict(max_frames=4, min_pixels=56 * 56, max_pixels=56 * 56)
TINY = Sizes(tiny=True, step_steps=1, video=_TINY_VIDEO,
             step_overrides={"sampling.group_size": 4, "sampling.max_new_tokens": 4},  # 2 micro-batches of 2
             fsdp_overrides={"sampling.group_size": 2, "sampling.max_new_tokens": 4},
             loss=dict(tokens=[256, 512], hidden=64, vocab=2048, chunks=[64, 128], seq_len=128, repeats=1),
             parity_new_tokens=8, prefix_new_tokens=6, decode_new_tokens=(6,),
             guards=dict.fromkeys(("draw", "vision_processor", "parity", "prefix", "decode", "loss_bench",
                                   "fsdp_step", "qlora_step", "qlora_step_naive", "qlora_step_grpo"), 150))


@dataclass
class Check:
    sizes: Sizes
    device: torch.device
    video: Path | None
    configs: Path  # the repository's configs/ (the step parts train configs/qwen7b*.yaml)

    @property
    def arch(self) -> str | None:
        return None if self.sizes.tiny else "qwen2.5-vl-7b"


# ------------------------------------------------------------------------------------------------ parts


def part_draw(check: Check, out: dict) -> dict:
    from ktr.experiments.gpu_draw import draw

    return draw(check.device, check.sizes.tiny, out)


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
    result = bench_step.measure([check.configs / config], steps=steps, arch=check.arch,
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
    rec["ktr_vs_grpo"] = parts.ktr_vs_grpo(rec["result"]["summary"])
    return rec


def part_qlora_step_naive(check: Check, out: dict) -> dict:
    rec = _step(check, out, "qwen7b_qlora.yaml", 1, {**check.sizes.step_overrides, "loss.chunk_size": None})
    rec["goal"] = parts.goal(rec["result"]["summary"], GOAL_GIB, check.device.type == "cuda")
    return rec


def part_qlora_step_grpo(check: Check, out: dict) -> dict:
    """GRPO's step on the same config (`key_tokens.enabled: false`): Video-KTR / GRPO measured, not estimated."""
    return _step(check, out, "qwen7b_qlora.yaml", check.sizes.step_steps,
                 {**check.sizes.step_overrides, "key_tokens.enabled": False})


def part_prefix(check: Check, out: dict) -> dict:
    return parts.prefix(check.device, check.sizes.tiny, check.sizes.prefix_new_tokens, out)


def part_decode(check: Check, out: dict) -> dict:
    from ktr.experiments.gpu_decode import decode

    return decode(check.device, check.sizes.tiny, check.sizes.decode_new_tokens, out)


PARTS = {"draw": part_draw, "vision_processor": part_vision_processor, "parity": part_parity, "prefix": part_prefix,
         "loss_bench": part_loss_bench, "fsdp_step": part_fsdp_step, "qlora_step": part_qlora_step,
         "qlora_step_naive": part_qlora_step_naive, "decode": part_decode, "qlora_step_grpo": part_qlora_step_grpo}


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
    report["float32_output_gemm"] = parts.float32_output_gemm_state()  # `policy.head_logits: float32` on CUDA
    return report


def build_tokenizer_once() -> None:
    """Every part needs the Qwen2 tokenizer; it is built once per run (each build takes seconds on a CPU)."""
    import functools

    import ktr.model.tokenizer

    tokenizer = ktr.model.tokenizer
    tokenizer.build_qwen2_tokenizer = functools.lru_cache(maxsize=None)(tokenizer.build_qwen2_tokenizer)
