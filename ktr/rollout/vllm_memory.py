"""Size, sleep and wake the colocated vLLM engine; record its memory at each phase (layer L2; `ktr.rollout.vllm`).

Sizing (`sampling.vllm.memory: derived`, `EnginePlan`): the engine runs a rank's whole rollout at once
(`max_num_seqs` = G x prompts), prefills any prompt in one step (`max_num_batched_tokens`), and gets the KV cache
that needs (`kv_cache_memory_bytes` = max_num_seqs x max_model_len tokens, an upper bound: prefix caching shares
each prompt's blocks across its G samples), not a fraction of the GPU. The start-up budget (weights + KV cache +
headroom) sets `gpu_memory_utilization` for vLLM's free-memory check at start; when the engine is built before
the optimizer state exists (the first rollout), that state is counted too where it must coexist with the engine
(`sleep: never`). See docs/vllm.md.

Sleep and wake (`EngineSleep`): after each rollout `LLM.sleep(level)`; the weight sync wakes the weights
(`wake_up(["weights"])`; level 2 dropped them, so the sync reloads them anyway) and the next rollout the KV cache
(`wake_up(["kv_cache"])`). vLLM's sleep mode needs CUDA (`Platform.is_sleep_mode_available`: CUDA, ROCm, XPU):
on its CPU engine ktr pauses the scheduler instead (`sleep(level=0)`, resumed by `wake_up(["scheduling"])`),
so the same calls run on the real engine in the same order and free nothing; one log line says so.

The timeline (`MemoryTimeline`) records, after each phase, the memory in use: on CUDA the device's (total - free,
`torch.cuda.mem_get_info`: the policy and optimizer included, so the engine's share is the change between
phases), on CPU the process's resident set. `KTRModule` logs the last value of each phase as
`train/rollout/memory_gib/<phase>`.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ktr.config import SamplingConfig
from ktr.model.families import core

log = logging.getLogger(__name__)
GIB = 2**30
KV_ROUND = 256  # tokens a sequence's KV allowance is rounded up to (a multiple of vLLM's block sizes)
SLEEP_LEVELS = {"never": 0, "level1": 1, "level2": 2}  # `sampling.vllm.sleep` -> `LLM.sleep(level)`
PHASES = ("built", "generated", "slept", "woke_weights", "synced", "woke_kv_cache")


# --------------------------------------------------------------------------------------------------- sizing


def kv_bytes_per_token(model: nn.Module, dtype_bytes: int) -> int:
    """K and V of every decoder layer for one token: 2 x layers x kv heads x head dim x dtype bytes."""
    cfg = core(model).config
    text = getattr(cfg, "text_config", cfg)
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * text.num_hidden_layers * kv_heads * head_dim * dtype_bytes


def weight_bytes(model: nn.Module, dtype_bytes: int) -> int:
    """The engine's copy of the weights (vision tower included): parameters x dtype bytes."""
    return sum(p.numel() for p in core(model).parameters()) * dtype_bytes


def optimizer_state_bytes(model: nn.Module) -> int:
    """AdamW's two moments of the trainable parameters, in their dtype (8-bit optimizers need a quarter)."""
    return sum(2 * p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


@dataclass(frozen=True)
class EnginePlan:
    """What the engine is built for (bytes; `as_dict` for logs and JSON)."""

    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    weight_bytes: int
    kv_bytes_per_token: int
    kv_cache_bytes: int
    headroom_bytes: int
    optimizer_state_bytes: int

    @property
    def budget_bytes(self) -> int:
        """What the engine holds while it generates: weights, KV cache, headroom."""
        return self.weight_bytes + self.kv_cache_bytes + self.headroom_bytes

    def as_dict(self) -> dict:
        return {**asdict(self), "budget_bytes": self.budget_bytes}


def plan_engine(model: nn.Module, cfg: SamplingConfig, prompts: int, dtype_bytes: int) -> EnginePlan:
    """The engine a rollout of `prompts` prompts x `cfg.group_size` samples needs (see the module docstring).

    >>> from types import SimpleNamespace as NS
    >>> m = nn.Module()
    >>> m.lm_head = nn.Linear(2, 2)  # 6 parameters
    >>> m.config = NS(num_attention_heads=4, num_key_value_heads=2, hidden_size=64, num_hidden_layers=3)
    >>> from ktr.config import VLLMSettings
    >>> p = plan_engine(m, SamplingConfig(group_size=8, max_prompt_length=1000, max_new_tokens=100,
    ...                 vllm=VLLMSettings(headroom_gib=0)), prompts=2, dtype_bytes=2)
    >>> p.max_num_seqs, p.max_num_batched_tokens, p.max_model_len, p.kv_bytes_per_token, p.kv_cache_bytes
    (16, 1000, 1100, 384, 7864320)
    """
    s = cfg.vllm
    max_len = s.max_model_len or cfg.max_prompt_length + cfg.max_new_tokens
    seqs = s.max_num_seqs or cfg.group_size * prompts
    per_token = kv_bytes_per_token(model, dtype_bytes)
    per_seq_tokens = math.ceil(max_len / KV_ROUND) * KV_ROUND
    return EnginePlan(
        max_num_seqs=seqs,
        max_num_batched_tokens=s.max_num_batched_tokens or max(seqs, min(cfg.max_prompt_length, max_len)),
        max_model_len=max_len, weight_bytes=weight_bytes(model, dtype_bytes), kv_bytes_per_token=per_token,
        kv_cache_bytes=seqs * per_seq_tokens * per_token, headroom_bytes=int(s.headroom_gib * GIB),
        optimizer_state_bytes=optimizer_state_bytes(model))


def engine_memory_kwargs(plan: EnginePlan, cfg: SamplingConfig, on_cuda: bool) -> dict:
    """`vllm.LLM` keyword arguments of the plan (`memory: derived`) or of the bare fraction (`memory: fraction`)."""
    s = cfg.vllm
    sizes = {"max_num_seqs": plan.max_num_seqs, "max_num_batched_tokens": plan.max_num_batched_tokens}
    if s.memory == "fraction":
        return {**sizes, "gpu_memory_utilization": s.gpu_memory_utilization}
    kwargs = {**sizes, "kv_cache_memory_bytes": plan.kv_cache_bytes}
    if on_cuda:
        free, total = torch.cuda.mem_get_info()
        need = plan.budget_bytes + (plan.optimizer_state_bytes if s.sleep == "never" else 0)
        if need > free:
            log.warning("vLLM engine: %.2f GiB free, the engine needs %.2f GiB (weights %.2f + KV %.2f + headroom "
                        "%.2f)%s", free / GIB, need / GIB, plan.weight_bytes / GIB, plan.kv_cache_bytes / GIB,
                        plan.headroom_bytes / GIB,
                        f" + the optimizer state {plan.optimizer_state_bytes / GIB:.2f} (sleep: never: it coexists "
                        "with the engine)" if s.sleep == "never" else "")
        kwargs["gpu_memory_utilization"] = min(0.95, plan.budget_bytes / total)  # vLLM's start-up check of free memory
    return kwargs


# --------------------------------------------------------------------------------------------------- memory


def memory_in_use_gib() -> float:
    """CUDA: the current device's memory in use (total - free, every allocator and process); CPU: this process's
    resident set."""
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        return (total - free) / GIB
    with open("/proc/self/statm") as f:  # Linux; fields: size resident ... (pages)
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GIB


class MemoryTimeline:
    """The engine's phases in order, each with the memory in use after it (`phases`: all of them; `metrics`: the
    last of each phase since the previous call, as `train/rollout/memory_gib/<phase>`)."""

    def __init__(self) -> None:
        self.phases: list[dict] = []
        self._unlogged: dict[str, float] = {}

    def record(self, phase: str, **info) -> None:
        gib = memory_in_use_gib()
        self.phases.append({"phase": phase, "memory_gib": gib, **info})
        self._unlogged[phase] = gib

    def metrics(self) -> dict[str, float]:
        out = {f"train/rollout/memory_gib/{k}": v for k, v in self._unlogged.items()}
        self._unlogged = {}
        return out


# --------------------------------------------------------------------------------------------------- sleep


def sleep_mode_available() -> bool:
    """Whether the engine can sleep here (vLLM's own answer; False on its CPU engine)."""
    from vllm.platforms import current_platform

    return current_platform.is_sleep_mode_available()


class EngineSleep:
    """Sleep after a rollout, wake the weights for the sync, the KV cache before the next rollout.

    `level`: 1 or 2 (`sampling.vllm.sleep: level1`, `level2`), 0 = never (`never`). Where vLLM cannot sleep (`real`
    False: the CPU engine) the scheduler is paused instead, so the same calls run in the same order on the real
    engine.
    """

    def __init__(self, engine, level: int, real: bool, timeline: MemoryTimeline) -> None:
        self.engine, self.level, self.real, self.timeline = engine, level, real, timeline
        self.asleep: set[str] = set()  # of "weights", "kv_cache"
        if level and not real:
            log.warning("vLLM engine: sleep level %d asked, but this vLLM platform has no sleep mode (CUDA only); "
                        "the scheduler is paused instead, nothing is freed", level)

    def sleep(self) -> None:
        """After a rollout: weights and KV cache released (level 1: weights to CPU memory)."""
        if not self.level or self.asleep:
            return
        self.engine.sleep(level=self.level if self.real else 0)
        self.asleep = {"weights", "kv_cache"}
        self.timeline.record("slept", level=self.level, freed=self.real)

    def wake_weights(self) -> None:
        """Before a weight sync (and before a rollout that comes without one)."""
        if "weights" not in self.asleep:
            return
        if self.real:
            self.engine.wake_up(tags=["weights"])
        self.asleep.discard("weights")
        self.timeline.record("woke_weights", freed=self.real)

    @property
    def weights_lost(self) -> bool:
        """Level 2 dropped the weights: after waking they must be pushed again."""
        return self.level == 2 and self.real

    def wake_kv_cache(self) -> None:
        """Before a rollout, after the weights (vLLM resumes scheduling once everything is awake)."""
        if "kv_cache" not in self.asleep:
            return
        self.engine.wake_up(tags=["kv_cache"] if self.real else ["scheduling"])
        self.asleep.discard("kv_cache")
        self.timeline.record("woke_kv_cache", freed=self.real)
