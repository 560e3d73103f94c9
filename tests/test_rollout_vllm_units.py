"""The vLLM backend's pieces that need no engine (the engine itself: tests/vllm, run by .ci/run_vllm): config keys
and the clashes they catch, the lazy registry entry, placeholder collapsing, the weights the engine receives
(LoRA merged), truncated importance weights and the module's rollout correction."""

import copy
from dataclasses import replace
import importlib.util
import sys

import pytest
import torch

from ktr.config import (ConfigError, DecodingConfig, LoraSettings, LossConfig, PolicyConfig, SamplingConfig,
                        VLLMSettings, check_rollout_settings)
from ktr.losses import truncated_is_weights
from ktr.rollout.base import rollout_backend
from ktr.rollout.vllm import VLLMBackend, collapse_placeholders, policy_weights

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def test_config_keys_and_clashes() -> None:
    assert SamplingConfig(backend="vllm").vllm == VLLMSettings()
    assert DecodingConfig(backend="vllm").backend == "vllm"
    with pytest.raises(ConfigError, match="decoding.backend must be one of"):
        DecodingConfig(backend="shared")
    with pytest.raises(ConfigError, match="sampling.vllm.media"):
        VLLMSettings(media="pixels")
    with pytest.raises(ConfigError, match="sampling.vllm.gpu_memory_utilization"):
        VLLMSettings(gpu_memory_utilization=1.5)
    with pytest.raises(ConfigError, match="loss.tis_cap"):
        LossConfig(tis_cap=0)
    with pytest.raises(ConfigError, match="QLoRA keeps the HF path"):
        check_rollout_settings(PolicyConfig(quantization="nf4"), SamplingConfig(backend="vllm"), LossConfig())
    with pytest.raises(ConfigError, match="rollout_correction: tis needs"):
        check_rollout_settings(PolicyConfig(), SamplingConfig(backend="shared"), LossConfig(rollout_correction="tis"))
    check_rollout_settings(PolicyConfig(), SamplingConfig(backend="vllm"), LossConfig(rollout_correction="tis"))


def test_registry_entry_imports_vllm_only_on_generate() -> None:
    vllm_loaded = "vllm" in sys.modules
    backend = rollout_backend("vllm")
    assert type(backend) is VLLMBackend and backend.engine is None
    assert ("vllm" in sys.modules) == vllm_loaded  # building the backend imports no engine
    backend.on_weights_updated(torch.nn.Linear(1, 1))  # no engine yet: nothing to sync


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here")
def test_missing_vllm_names_the_extra(tiny_policy) -> None:
    from tests.helpers import synthetic_samples

    batch = tiny_policy.processor.collate(synthetic_samples(tiny_policy.processor, 1))
    with pytest.raises(ImportError, match=r"pip install 'ktr\[vllm\]'"):
        VLLMBackend().generate(tiny_policy.model, tiny_policy.processor, batch, SamplingConfig(backend="vllm"))


def test_collapse_placeholders() -> None:
    assert collapse_placeholders([1, 9, 9, 9, 2, 8, 8, 3, 9], (8, 9)) == [1, 9, 2, 8, 3, 9]
    assert collapse_placeholders([9, 9], (9,)) == [9]


def test_policy_weights_are_the_checkpoint_names_with_lora_merged(tiny_policy) -> None:
    from ktr.model.policy import apply_lora

    plain = tiny_policy.model
    assert {k: v for k, v in policy_weights(plain)}.keys() == plain.state_dict().keys()
    lora = apply_lora(copy.deepcopy(plain), LoraSettings(r=2, alpha=4, dropout=0.0))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
    got = dict(policy_weights(lora))
    merged = copy.deepcopy(lora).merge_and_unload().state_dict()
    assert got.keys() == merged.keys() == plain.state_dict().keys()
    for k in merged:
        torch.testing.assert_close(got[k], merged[k], rtol=0, atol=1e-6)
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(got[q], plain.state_dict()[q])  # the adapters moved it
    base_q = f"base_model.model.{q}".replace(".weight", ".base_layer.weight")
    # the policy's own weights untouched
    torch.testing.assert_close(dict(lora.named_parameters())[base_q], plain.state_dict()[q])


def test_truncated_is_weights_by_hand() -> None:
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.0, 0.0]])
    rollout = torch.tensor([[-1.0, -1.0, -2.0], [-1.0, -1.5, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    w = truncated_is_weights(logps, rollout, mask, cap=2.0)
    e = torch.exp
    want = torch.tensor([[1.0, e(torch.tensor(-1.0)), 2.0], [e(torch.tensor(-2.0)), e(torch.tensor(0.5)), 0.0]])
    torch.testing.assert_close(w, want)
    assert not w.requires_grad


def test_module_rollout_correction() -> None:
    """`tis`: per-token advantages A_i * w_it and the gap metrics; `none`: advantages untouched, gap logged."""
    from types import SimpleNamespace

    from ktr.module import KTRModule

    valid = torch.tensor([[True, True], [True, False]])
    rollout = SimpleNamespace(logps=torch.tensor([[-1.0, -1.0], [-2.0, 0.0]]), completion_mask=valid)
    scores = SimpleNamespace(logps=torch.tensor([[-0.5, -1.5], [-2.0, -9.0]]))
    adv = torch.tensor([1.0, -2.0])
    module = KTRModule.__new__(KTRModule)
    module._extra_metrics = {}
    module.loss_cfg = LossConfig(rollout_correction="none")
    assert torch.equal(KTRModule.rollout_corrected(module, rollout, scores, adv), adv)
    assert float(module._extra_metrics["train/rollout/logp_diff"]) == pytest.approx(1.0 / 3)
    assert float(module._extra_metrics["train/rollout/logp_diff_max"]) == pytest.approx(0.5)
    module.loss_cfg = LossConfig(rollout_correction="tis", tis_cap=1.5)
    out = KTRModule.rollout_corrected(module, rollout, scores, adv)
    w = torch.tensor([[1.5, float(torch.exp(torch.tensor(-0.5)))], [1.0, 0.0]])
    torch.testing.assert_close(out, adv[:, None] * w)
    rollout.logps = None
    assert KTRModule.rollout_corrected(module, rollout, scores, adv) is adv


def test_sleep_and_memory_settings() -> None:
    assert VLLMSettings().sleep == "level1" and VLLMSettings().memory == "derived"
    for bad in (1, True, "level0"):
        with pytest.raises(ConfigError, match="sampling.vllm.sleep must be one of 'level1', 'level2', 'never'"):
            VLLMSettings(sleep=bad)
    with pytest.raises(ConfigError, match="sampling.vllm.memory"):
        VLLMSettings(memory="auto")
    with pytest.raises(ConfigError, match="sampling.vllm.max_num_seqs"):
        VLLMSettings(max_num_seqs=0)
    with pytest.raises(ConfigError, match="sampling.vllm.headroom_gib"):
        VLLMSettings(headroom_gib=-1)


def test_engine_plan_of_the_tiny_policy_by_hand(tiny_policy) -> None:
    """The tiny Qwen2.5-VL (2 layers, 2 KV heads of 16, fp32): 2 x 2 x 2 x 16 x 4 = 512 bytes of KV per token."""
    from ktr.rollout.vllm_memory import GIB, engine_memory_kwargs, plan_engine

    model = tiny_policy.model
    cfg = SamplingConfig(group_size=8, max_prompt_length=1000, max_new_tokens=300, backend="vllm",
                         vllm=VLLMSettings(headroom_gib=0.5))
    plan = plan_engine(model, cfg, prompts=3, dtype_bytes=2)
    n_params = sum(p.numel() for p in model.parameters())
    assert (plan.max_num_seqs, plan.max_model_len, plan.max_num_batched_tokens) == (24, 1300, 1000)
    assert plan.kv_bytes_per_token == 2 * 2 * 2 * 16 * 2
    assert plan.kv_cache_bytes == 24 * 1536 * plan.kv_bytes_per_token  # 1300 tokens rounded up to 6 x 256
    assert plan.weight_bytes == 2 * n_params and plan.optimizer_state_bytes == 2 * 4 * n_params  # AdamW, fp32
    assert plan.budget_bytes == plan.weight_bytes + plan.kv_cache_bytes + GIB // 2
    derived = engine_memory_kwargs(plan, cfg, on_cuda=False)
    assert derived == {"max_num_seqs": 24, "max_num_batched_tokens": 1000, "kv_cache_memory_bytes": plan.kv_cache_bytes}
    fixed = replace(cfg, vllm=VLLMSettings(memory="fraction", max_num_seqs=4, max_num_batched_tokens=4096))
    plan = plan_engine(model, fixed, prompts=3, dtype_bytes=2)
    assert engine_memory_kwargs(plan, fixed, on_cuda=False) == {"max_num_seqs": 4, "max_num_batched_tokens": 4096,
                                                                "gpu_memory_utilization": 0.3}


class _Engine:
    """Records the sleep/wake calls `EngineSleep` makes (vLLM's `LLM` is the collaborator here, not under test)."""

    def __init__(self) -> None:
        self.calls = []

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags):
        self.calls.append(("wake_up", tuple(tags)))


@pytest.mark.parametrize("level,real,want", [
    (1, True, [("sleep", 1), ("wake_up", ("weights",)), ("wake_up", ("kv_cache",))]),  # CUDA
    (2, True, [("sleep", 2), ("wake_up", ("weights",)), ("wake_up", ("kv_cache",))]),
    (1, False, [("sleep", 0), ("wake_up", ("scheduling",))]),  # the CPU engine: a scheduler pause
    (0, True, []),  # never sleeps
])
def test_engine_sleep_calls_in_order(level, real, want) -> None:
    """The CUDA calls cannot run on the CPU engine (tests/vllm runs the pause path on the real engine)."""
    from ktr.rollout.vllm_memory import EngineSleep, MemoryTimeline

    engine, timeline = _Engine(), MemoryTimeline()
    s = EngineSleep(engine, level, real, timeline)
    s.sleep()
    s.sleep()  # already asleep: nothing
    s.wake_weights()
    s.wake_weights()
    s.wake_kv_cache()
    assert engine.calls == want and not s.asleep
    assert s.weights_lost == (level == 2 and real)
    phases = [p["phase"] for p in timeline.phases]
    assert phases == (["slept", "woke_weights", "woke_kv_cache"] if level else [])
    metrics = timeline.metrics()
    assert set(metrics) == {f"train/rollout/memory_gib/{p}" for p in phases} and all(v > 0 for v in metrics.values())
    assert timeline.metrics() == {}  # each value is logged once


def test_vllm_memory_doctests() -> None:
    import doctest

    import ktr.rollout.vllm_memory

    assert doctest.testmod(ktr.rollout.vllm_memory).failed == 0


def test_each_request_gets_its_own_seeds() -> None:
    """vLLM seeds sample j of a request with seed + j: requests seeded seed + i * n never share a sample's seed
    (one SamplingParams for all gave sample j of every prompt the same draws); greedy params keep no seed."""
    from ktr.rollout.vllm import per_request_seeds

    class Params:  # the two fields and the method of vLLM's SamplingParams that per_request_seeds uses
        def __init__(self, n: int, seed: int | None) -> None:
            self.n, self.seed = n, seed

        def clone(self) -> "Params":
            return copy.copy(self)

    params = Params(n=8, seed=1000)
    out = per_request_seeds(params, 3)
    assert [p.seed for p in out] == [1000, 1008, 1016] and params.seed == 1000
    sample_seeds = [p.seed + j for p in out for j in range(p.n)]  # what vLLM gives each sample
    assert len(set(sample_seeds)) == 24
    assert [p.seed for p in per_request_seeds(Params(n=1, seed=None), 2)] == [None, None]
