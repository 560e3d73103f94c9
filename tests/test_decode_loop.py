"""The shared backend's decode loop over the preallocated key/value cache (issue 27, `ktr.rollout.kv_cache`):
the same logits and cache contents as transformers' concatenating `DynamicCache` at every step, the buffers never
reallocated, `generate`'s tokens under SDPA and on 4-bit policies (both tiny families), and the compiled-step
switch (ignored on CPU; the static cache it uses, compiled with dynamo's eager backend, decodes the same tokens).
Greedy/sampled equality under eager attention, Qwen3.5 and FSDP2 are in test_rollout_shared.py, test_qwen35.py and
test_distributed.py, which run this loop too."""

import pytest
import torch

from ktr.config import PolicyConfig, SamplingConfig
from ktr.model.policy import load_policy
from ktr.rollout import shared
from ktr.rollout.hf import generate
from ktr.rollout.kv_cache import PreallocatedLayer, cache_buffers, preallocate
from tests.helpers import synthetic_samples
from tests.test_rollout_shared import _assert_same_rollout, _batch, _untied

G = 3


@pytest.mark.slow
@torch.no_grad()
def test_each_step_equals_the_concatenating_cache(tiny_any) -> None:
    """Fed the same tokens, the preallocated state gives bitwise the logits of the DynamicCache state, its views
    hold the same keys/values, and the buffers keep their storage (nothing is reallocated per token)."""
    model = _untied(tiny_any).model
    batch = _batch(tiny_any)
    steps = 6
    dynamic = shared.prefill(model, batch, G)
    fixed = shared.prefill(model, batch, G, new_tokens=steps)
    n_layers = model.config.get_text_config().num_hidden_layers
    assert sum(isinstance(layer, PreallocatedLayer) for layer in fixed.cache.layers) == n_layers
    pointers = [b.untyped_storage().data_ptr() for b in cache_buffers(fixed.cache)]
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        assert torch.equal(fixed.logits, dynamic.logits)
        tokens = torch.multinomial(dynamic.logits.softmax(-1), 1, generator=gen).squeeze(1)  # [N] varied rows
        shared.decode_step(model, dynamic, tokens)
        shared.decode_step(model, fixed, tokens)
        assert torch.equal(fixed.attention_mask, dynamic.attention_mask)
        assert torch.equal(fixed.next_positions, dynamic.next_positions)
    assert torch.equal(fixed.logits, dynamic.logits)
    for mine, ref in zip(fixed.cache.layers, dynamic.cache.layers):
        assert mine.get_seq_length() == ref.get_seq_length() == batch.input_ids.shape[1] + steps
        assert torch.equal(mine.keys, ref.keys) and torch.equal(mine.values, ref.values)
    assert [b.untyped_storage().data_ptr() for b in cache_buffers(fixed.cache)] == pointers


def test_layer_writes_in_place_and_refuses_overflow() -> None:
    keys, values = torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4)  # [N, kv_heads, L, head_dim]
    layer = PreallocatedLayer(keys, values, capacity=5)
    new_k, new_v = torch.randn(2, 1, 1, 4), torch.randn(2, 1, 1, 4)
    k, v = layer.update(new_k, new_v)
    assert torch.equal(k, torch.cat([keys, new_k], 2)) and torch.equal(v, torch.cat([values, new_v], 2))
    assert k.untyped_storage().data_ptr() == layer.key_buffer.untyped_storage().data_ptr()
    assert layer.get_mask_sizes(1) == (5, 0) and layer.get_seq_length() == 4
    layer.update(new_k, new_v)
    with pytest.raises(RuntimeError, match="capacity 5"):
        layer.update(new_k, new_v)


def test_only_full_attention_layers_are_swapped() -> None:
    """A sliding-window layer (and any other kind, e.g. DeltaNet states) stays as it is."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    full, sliding = DynamicLayer(), DynamicSlidingWindowLayer(sliding_window=8)
    for layer in (full, sliding):
        layer.update(torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4))

    class Cache:
        layers = [full, sliding]

    assert preallocate(Cache, 4) == 1
    assert isinstance(Cache.layers[0], PreallocatedLayer) and Cache.layers[1] is sliding


@pytest.fixture(scope="module", params=["tiny", "tiny-qwen3vl"])
def sdpa_policy(request):
    """Each tiny family with SDPA attention (what the benchmark and real runs use)."""
    torch.set_num_threads(1)
    return _untied(load_policy(PolicyConfig(name_or_path=request.param, attn_implementation="sdpa")))


@pytest.mark.slow
def test_sdpa_greedy_and_seeded_sampling_equal_generate(sdpa_policy) -> None:
    policy = sdpa_policy
    batch = _batch(policy)
    cfg = SamplingConfig(group_size=G, max_new_tokens=8)
    hf = generate(policy.model, policy.processor, batch, cfg, group_size=1, greedy=True)
    assert hf.completion_ids[0].unique().numel() > 1
    mine = shared.generate_shared(policy.model, policy.processor, batch, cfg, greedy=True)
    assert torch.equal(mine.completion_ids, hf.completion_ids.repeat_interleave(G, dim=0))
    sampled = SamplingConfig(group_size=G, max_new_tokens=8, temperature=1.0, top_p=0.95, top_k=50)
    torch.manual_seed(3)
    ref = generate(policy.model, policy.processor, batch, sampled)
    torch.manual_seed(3)
    _assert_same_rollout(shared.generate_shared(policy.model, policy.processor, batch, sampled), ref)


@pytest.mark.slow
def test_the_concatenating_loop_kept_for_the_benchmark_samples_the_same(sdpa_policy) -> None:
    policy = sdpa_policy
    batch = _batch(policy)
    cfg = SamplingConfig(group_size=G, max_new_tokens=6, temperature=1.0, top_p=0.95)
    torch.manual_seed(5)
    new = shared.generate_shared(policy.model, policy.processor, batch, cfg)
    torch.manual_seed(5)
    _assert_same_rollout(shared.generate_shared(policy.model, policy.processor, batch, cfg, _grow_by_concat=True),
                         new)


@pytest.fixture(scope="module", params=["tiny", "tiny-qwen3vl"])
def nf4_policy(request):
    pytest.importorskip("bitsandbytes")
    torch.set_num_threads(1)
    return load_policy(PolicyConfig(name_or_path=request.param, quantization="nf4", dtype="bfloat16",
                                    attn_implementation="eager"))


@pytest.mark.slow
def test_4bit_policy_greedy_and_sampled_equal_generate(nf4_policy) -> None:
    policy = nf4_policy
    batch = policy.processor.collate(synthetic_samples(policy.processor, 2, image_every=2))
    cfg = SamplingConfig(group_size=G, max_new_tokens=6)
    hf = generate(policy.model, policy.processor, batch, cfg, group_size=1, greedy=True)
    mine = shared.generate_shared(policy.model, policy.processor, batch, cfg, greedy=True)
    assert torch.equal(mine.completion_ids, hf.completion_ids.repeat_interleave(G, dim=0))
    sampled = SamplingConfig(group_size=G, max_new_tokens=6, temperature=1.0, top_p=0.95)
    torch.manual_seed(9)
    ref = generate(policy.model, policy.processor, batch, sampled)
    assert ref.completion_ids.unique().numel() > 2  # the draws differ between rows: a real comparison
    torch.manual_seed(9)
    _assert_same_rollout(shared.generate_shared(policy.model, policy.processor, batch, sampled), ref)


def test_compile_decode_is_ignored_on_cpu_with_a_warning(tiny_policy) -> None:
    batch = _batch(tiny_policy)
    cfg = SamplingConfig(group_size=2, max_new_tokens=3, temperature=0.0, compile_decode=True)
    with pytest.warns(UserWarning, match="compile_decode is ignored on cpu"):
        out = shared.generate_shared(tiny_policy.model, tiny_policy.processor, batch, cfg)
    plain = shared.generate_shared(tiny_policy.model, tiny_policy.processor, batch,
                                   SamplingConfig(group_size=2, max_new_tokens=3, temperature=0.0))
    _assert_same_rollout(out, plain)


@pytest.mark.slow
def test_compiled_static_step_decodes_the_same_tokens(untied_policy) -> None:
    """The compile path (transformers' StaticLayer, full-length mask, `torch.compile` with dynamo's eager
    backend on CPU) gives the greedy tokens of the exact loop, and the static cache is rounded up to a bucket."""
    policy = untied_policy
    batch = _batch(policy)
    cfg = SamplingConfig(group_size=2, max_new_tokens=8)
    exact = shared.generate_shared(policy.model, policy.processor, batch, cfg, greedy=True)
    compiled = shared.generate_shared(policy.model, policy.processor, batch, cfg, greedy=True,
                                      _compile_backend="eager")
    _assert_same_rollout(compiled, exact)
    state = shared.prefill(policy.model, batch, 2, new_tokens=8, static=True)
    assert state.mask_buffer.shape[1] % shared.STATIC_BUCKET == 0
    assert state.cache.layers[0].max_cache_len == state.mask_buffer.shape[1]


@pytest.fixture(scope="module")
def untied_policy(tiny_policy):
    return _untied(tiny_policy)
