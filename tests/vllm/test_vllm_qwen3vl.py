"""The vLLM rollout backend on Qwen3-VL (one engine for this module, vLLM's CPU engine).

The engine receives the policy's main and deepstack features (`media: embeds`) and the per-patch timestamps; it
expands ktr's collapsed prompt back to ktr's timestamped layout (both `video_wrapper`s; the backend raises on any
difference, and a test shows that it does). After a weight update its greedy tokens equal transformers' on a
video and an image prompt, and the sampled tokens' log-probs equal the policy pass's to 1e-4 in fp32."""

import copy
from dataclasses import replace

import pytest

from tests.vllm.conftest import SKIP_REASON, tiny_vllm_policy_config

pytest.importorskip("vllm", reason=SKIP_REASON)

import torch  # noqa: E402

from ktr.config import VLLMSettings  # noqa: E402
from ktr.model.policy import load_policy  # noqa: E402
from ktr.rollout.hf import generate  # noqa: E402
from ktr.rollout.vllm import engine_requests  # noqa: E402
from tests.helpers import synthetic_samples  # noqa: E402
from tests.vllm.test_vllm_rollout import _policy_logps, synced_engine  # noqa: E402

G = 4


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    # one 64-wide head (vLLM's CPU attention kernels), own output projection (see tiny_vllm_policy_config)
    yield from synced_engine(load_policy(replace(tiny_vllm_policy_config(), name_or_path="tiny-qwen3vl")))


def test_greedy_equals_hf_after_a_weight_update(setup) -> None:
    policy, backend, batch, cfg, before = setup
    hf = generate(policy.model, policy.processor, batch, cfg, group_size=1, greedy=True)
    assert hf.completion_ids[0].unique().numel() > 1  # not a degenerate repeated token
    assert not torch.equal(before.completion_ids, hf.completion_ids)  # the update changed the greedy answers
    got = backend.generate(policy.model, policy.processor, batch, cfg, group_size=1, greedy=True)
    assert torch.equal(got.completion_ids, hf.completion_ids) and got.texts == hf.texts


def test_the_engine_expands_to_ktrs_timestamped_layout(setup) -> None:
    """The engine's expanded prompt is ktr's, with one `<t.t seconds>` block per temporal patch; the prompt sent
    is much shorter (one video token for all blocks)."""
    policy, backend, batch, cfg, _ = setup
    tok = policy.tokenizer
    requests, expected = engine_requests(policy.model, policy.processor, batch, "embeds")
    backend.wake(policy.model)
    out = backend.engine.generate(requests[:1], backend_params(policy, cfg), use_tqdm=False)[0]
    backend.release()
    assert list(out.prompt_token_ids) == expected[0]
    text = tok.decode(expected[0])
    n_patches = int(batch.grid_thw[0, 0])
    assert n_patches >= 2 and text.count(" seconds>") == n_patches == text.count("<|vision_start|>")
    assert len(requests[0]["prompt_token_ids"]) < len(expected[0]) - n_patches


def backend_params(policy, cfg):
    from ktr.rollout.vllm import sampling_params

    return sampling_params(policy.model, policy.processor, replace(cfg, max_new_tokens=1), 1, True)


def test_keep_wrapper_layout_is_expanded_too(setup) -> None:
    """`policy.video_wrapper: keep` (transformers 5.10-5.24's layout, outer start/end around the blocks)."""
    policy, backend, _, cfg, _ = setup
    processor = copy.copy(policy.processor)
    processor.layout = replace(processor.layout, wrapper="keep")
    batch = processor.collate(synthetic_samples(processor, 1))
    replaced = policy.processor.collate(synthetic_samples(policy.processor, 1))
    assert batch.input_ids.shape[1] == replaced.input_ids.shape[1] + 2  # the outer pair
    hf = generate(policy.model, processor, batch, cfg, group_size=1, greedy=True)
    got = backend.generate(policy.model, processor, batch, cfg, group_size=1, greedy=True)
    assert torch.equal(got.completion_ids, hf.completion_ids)


def test_a_prompt_expanded_differently_fails(setup) -> None:
    """The check is live: collapsing the `replace` layout as if it were `keep` makes the engine expand another
    prompt, which raises."""
    policy, backend, batch, cfg, _ = setup
    processor = copy.copy(policy.processor)
    processor.layout = replace(processor.layout, wrapper="keep")
    with pytest.raises(RuntimeError, match="expanded the prompt of sample"):
        backend.generate(policy.model, processor, batch, replace(cfg, max_new_tokens=1), group_size=1, greedy=True)


@pytest.mark.parametrize("settings", [dict(temperature=1.0, top_p=1.0), dict(temperature=0.7, top_p=0.9, top_k=50)])
def test_sampled_logps_equal_the_policy_pass(setup, settings) -> None:
    policy, backend, batch, cfg, _ = setup
    model = policy.model
    torch.manual_seed(3)
    rollout = backend.generate(model, policy.processor, batch, replace(cfg, **settings))
    valid = rollout.completion_mask
    assert (rollout.logps[~valid] == 0).all() and (rollout.logps[valid] < 0).all()
    assert rollout.completion_ids[:G].unique(dim=0).shape[0] > 1  # G distinct samples of a prompt
    mine = _policy_logps(model, batch, rollout)  # video rows too: vLLM's Qwen3-VL positions are transformers'
    torch.testing.assert_close(rollout.logps, mine, rtol=0, atol=1e-4)


def test_raw_frames_are_refused(setup) -> None:
    """`media: frames` on Qwen3-VL: the engine's own vision tower on ktr's image (pixels equal to 6e-8) gave other
    greedy tokens than transformers' after the first (vLLM 0.32 CPU), so the backend refuses it."""
    policy, backend, _, cfg, _ = setup
    image = policy.processor.collate([synthetic_samples(policy.processor, 2, image_every=2)[1]])
    with pytest.raises(ValueError, match="frames is refused on Qwen3-VL"):
        backend.generate(policy.model, policy.processor, image, replace(cfg, vllm=VLLMSettings(media="frames")),
                         group_size=1, greedy=True)
