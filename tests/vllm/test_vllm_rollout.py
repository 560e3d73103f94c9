"""The vLLM rollout backend on vLLM's CPU engine (one engine for this module).

After a weight update the engine's greedy tokens equal transformers' for text, image and video prompts (media as
ktr's vision features and as raw frames); the sampled tokens' log-probs equal the policy pass's to 1e-4 in fp32
(on videos once the policy pass uses vLLM's text positions after the video, see `ktr.rollout.vllm`); a fixed
torch seed repeats a rollout; a prompt the engine expands differently from ktr fails loudly."""

import copy
from dataclasses import replace

import pytest

from tests.vllm.conftest import SKIP_REASON, release_engine, tiny_vllm_policy_config

pytest.importorskip("vllm", reason=SKIP_REASON)

import torch  # noqa: E402

from ktr.config import SamplingConfig, VLLMSettings  # noqa: E402
from ktr.model.forward import SequenceView, completion_hidden, completion_logps, encode_media  # noqa: E402
from ktr.model.policy import load_policy  # noqa: E402
from ktr.rollout.base import end_of_sequence_ids, suppressed_token_ids  # noqa: E402
from ktr.rollout.hf import generate
from ktr.rollout.vllm import VLLMBackend, sampling_params  # noqa: E402
from tests.helpers import synthetic_samples  # noqa: E402

G = 4


def _perturb(model, seed: int = 1) -> None:
    """What an optimizer step could have done to the weights."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)


def synced_engine(policy):
    """Yield `(policy, backend, batch [video, image], cfg, greedy rollout before the update)` with the engine built,
    the policy perturbed and the new weights pushed; the engine is dropped afterwards."""
    batch = policy.processor.collate(synthetic_samples(policy.processor, 2, image_every=2))  # [video, image]
    assert batch.is_video.tolist() == [True, False]
    cfg = SamplingConfig(group_size=G, max_new_tokens=8, temperature=1.0, top_p=1.0, max_prompt_length=1024,
                         vllm=VLLMSettings(max_model_len=1024))
    backend = VLLMBackend()
    before = backend.generate(policy.model, policy.processor, batch, cfg, group_size=1, greedy=True)  # builds it
    _perturb(policy.model)
    backend.on_weights_updated(policy.model)
    yield policy, backend, batch, cfg, before
    release_engine(backend)


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    yield from synced_engine(load_policy(tiny_vllm_policy_config()))


def test_greedy_equals_hf_after_a_weight_update(setup) -> None:
    policy, backend, batch, cfg, before = setup
    hf = generate(policy.model, policy.processor, batch, cfg, group_size=1, greedy=True)
    assert hf.completion_ids[0].unique().numel() > 1  # not a degenerate repeated token
    assert not torch.equal(before.completion_ids, hf.completion_ids)  # the update changed the greedy answers
    got = backend.generate(policy.model, policy.processor, batch, cfg, group_size=1, greedy=True)
    assert torch.equal(got.completion_ids, hf.completion_ids) and got.texts == hf.texts
    assert torch.equal(got.input_ids, hf.input_ids) and torch.equal(got.completion_mask, hf.completion_mask)
    many = backend.generate(policy.model, policy.processor, batch, cfg, greedy=True)  # greedy with G rows
    assert torch.equal(many.completion_ids, hf.completion_ids.repeat_interleave(G, dim=0))


def test_raw_frames_of_an_image_equal_hf_and_videos_are_refused(setup) -> None:
    """`media: frames`: the engine's own vision tower (synced too) on ktr's pixels gives transformers' tokens on
    the image; on the video it did not (vLLM 0.32 CPU), so the backend refuses videos in that mode."""
    policy, backend, batch, cfg, _ = setup
    frames = replace(cfg, vllm=VLLMSettings(media="frames"))
    image = policy.processor.collate([synthetic_samples(policy.processor, 2, image_every=2)[1]])
    hf = generate(policy.model, policy.processor, image, cfg, group_size=1, greedy=True)
    got = backend.generate(policy.model, policy.processor, image, frames, group_size=1, greedy=True)
    assert torch.equal(got.completion_ids, hf.completion_ids)
    with pytest.raises(ValueError, match="frames serves images only"):
        backend.generate(policy.model, policy.processor, batch, frames, group_size=1, greedy=True)


def test_greedy_equals_hf_on_a_text_prompt(setup) -> None:
    policy, backend, _, cfg, _ = setup
    tok = policy.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": "Which colour comes first?"}],
                                  add_generation_prompt=True, tokenize=True, return_dict=False)
    ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
    model = policy.model.eval()
    eos = end_of_sequence_ids(policy.processor)
    hf = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                        do_sample=False, max_new_tokens=8, eos_token_id=eos, pad_token_id=policy.processor.pad_token_id,
                        suppress_tokens=suppressed_token_ids(model), temperature=None, top_p=None, top_k=None)
    hf_tokens = hf[0, len(ids):].tolist()
    backend.wake(model)  # asleep since the last rollout; this test calls the engine itself
    out = backend.engine.generate([{"prompt_token_ids": ids}], sampling_params(model, policy.processor, cfg, 1, True),
                                  use_tqdm=False)
    assert len(set(hf_tokens)) > 1
    assert list(out[0].outputs[0].token_ids) == hf_tokens


def _policy_logps(model, batch, rollout, positions=None):
    view = SequenceView.of(model, rollout, batch)
    if positions is not None:
        view = replace(view, position_ids=positions)
    with torch.no_grad():
        feats = encode_media(model, batch.pixel_values, batch.grid_thw)
        hidden = completion_hidden(model, view, feats, rollout.completion_ids.shape[1])
        return completion_logps(model, hidden, rollout.completion_ids, rollout.completion_mask, 512)[0]  # [N, T]


def vllm_positions(view: SequenceView, video_token_id: int):
    """The view's positions with the text after each row's video continued at max(previous positions) + 1 (vLLM,
    the released Qwen2.5-VL) instead of transformers 5's start + max(h, w) / merge."""
    pos = view.position_ids.clone()  # [3, N, S]
    for r in range(pos.shape[1]):
        where = (view.input_ids[r] == video_token_id).nonzero().flatten()
        if where.numel():
            after = int(where[-1]) + 1
            pos[:, r, after:] += pos[:, r, :after].max() + 1 - pos[0, r, after]
    return pos


@pytest.mark.parametrize("settings", [dict(temperature=1.0, top_p=1.0), dict(temperature=0.7, top_p=0.9, top_k=50)])
def test_sampled_logps_equal_the_policy_pass(setup, settings) -> None:
    policy, backend, batch, cfg, _ = setup
    model = policy.model
    torch.manual_seed(3)
    rollout = backend.generate(model, policy.processor, batch, replace(cfg, **settings))
    valid = rollout.completion_mask
    assert rollout.logps is not None and rollout.logps.shape == valid.shape
    assert (rollout.logps[~valid] == 0).all() and (rollout.logps[valid] < 0).all()
    assert rollout.completion_ids[:G].unique(dim=0).shape[0] > 1  # G distinct samples of a prompt
    mine = _policy_logps(model, batch, rollout)  # raw log-probs (before temperature / top-p), as vLLM returns them
    view = SequenceView.of(model, rollout, batch)
    # ktr places text after a video as vLLM does (`policy.rope_after_media: reference`, ktr.model.rope): the same
    # positions, so the video rows' log-probs agree too, not only the image rows'
    assert torch.equal(vllm_positions(view, model.config.video_token_id), view.position_ids)
    torch.testing.assert_close(rollout.logps, mine, rtol=0, atol=1e-4)
    transformers5 = load_policy(replace(tiny_vllm_policy_config(), rope_after_media="transformers")).model
    assert not torch.equal(SequenceView.of(transformers5, rollout, batch).position_ids, view.position_ids)
    torch.manual_seed(3)
    again = backend.generate(model, policy.processor, batch, replace(cfg, **settings))
    assert torch.equal(again.completion_ids, rollout.completion_ids)  # seeds from torch's generator


def test_a_prompt_expanded_differently_fails(setup, monkeypatch) -> None:
    policy, backend, batch, cfg, _ = setup
    monkeypatch.setattr("ktr.rollout.vllm.collapse_placeholders", lambda ids, placeholders: list(ids))
    with pytest.raises(RuntimeError, match="expanded the prompt of sample"):
        backend.generate(policy.model, policy.processor, batch, replace(cfg, max_new_tokens=1), group_size=1,
                         greedy=True)


def test_lora_weights_reach_the_engine_merged(setup) -> None:
    """A LoRA policy's engine serves the merged weights: its greedy tokens equal the merged model's."""
    from ktr.config import LoraSettings
    from ktr.model.policy import apply_lora

    policy, backend, batch, cfg, _ = setup
    lora = apply_lora(copy.deepcopy(policy.model), LoraSettings(r=4, alpha=8, dropout=0.0))
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5, generator=torch.Generator().manual_seed(2))
    backend.on_weights_updated(lora)
    try:
        hf = generate(lora, policy.processor, batch, cfg, group_size=1, greedy=True)
        plain = generate(policy.model, policy.processor, batch, cfg, group_size=1, greedy=True)
        assert not torch.equal(hf.completion_ids, plain.completion_ids)  # the adapters change the answers
        got = backend.generate(lora, policy.processor, batch, cfg, group_size=1, greedy=True)
        assert torch.equal(got.completion_ids, hf.completion_ids)
    finally:
        backend.on_weights_updated(policy.model)


def test_the_engine_is_sized_from_the_step(setup) -> None:
    """`memory: derived`: the engine runs the step's G x 2 sequences at once and its KV cache is the plan's (each
    sequence at max_model_len; tiny fp32 model: 2 layers x K and V x 64 x 4 bytes = 1 KiB per token), not a
    fraction of the machine."""
    _, backend, _, _, _ = setup
    plan = backend.plan
    config = backend.engine.llm_engine.vllm_config
    assert plan.max_num_seqs == config.scheduler_config.max_num_seqs == 2 * G
    assert plan.max_num_batched_tokens == config.scheduler_config.max_num_batched_tokens == 1024
    cache = config.cache_config
    assert plan.kv_bytes_per_token == 1024 and plan.kv_cache_bytes == 2 * G * 1024 * 1024
    assert cache.num_gpu_blocks * cache.block_size * plan.kv_bytes_per_token == plan.kv_cache_bytes
