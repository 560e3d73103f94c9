"""The shared-prefix rollout (`sampling.backend: shared`) equals transformers' `generate` (`hf`): the same greedy
tokens, and per step the same processed logits before sampling (teacher-forcing generate's own samples), on a
batch of a video prompt and a shorter-or-longer image prompt (left padding), G = 4."""

import pytest
import torch

from ktr.config import SamplingConfig
from ktr.model.forward import SequenceView
from ktr.rollout.base import (ROLLOUT_BACKENDS, assemble_rollout, end_of_sequence_ids, rollout_backend,
                              suppressed_token_ids)
from ktr.rollout.hf import generate, hf_generate_kwargs
from ktr.rollout.sampling import process_logits
from ktr.rollout.shared import SharedPrefixBackend, decode_step, generate_shared, prefill
from tests.helpers import synthetic_samples, tiny_qwen2_vl_config

G = 4


def _untied(policy):
    """The model with its own random output projection: greedy completions are not one repeated token
    (with tied embeddings the random model's argmax is the last input token)."""
    import copy

    from ktr.model.policy import Policy

    model = copy.deepcopy(policy.model)
    gen = torch.Generator().manual_seed(0)
    model.lm_head.weight = torch.nn.Parameter(torch.randn(model.lm_head.weight.shape, generator=gen) * 0.02)
    return Policy(model=model.eval(), processor=policy.processor)


@pytest.fixture(scope="module")
def untied_policy(tiny_policy):
    return _untied(tiny_policy)


@pytest.fixture(scope="module")
def untied_qwen3vl(tiny_qwen3vl):
    """Qwen3-VL: the prefill must carry the deepstack features into the first decoder layers."""
    return _untied(tiny_qwen3vl)


@pytest.fixture(scope="module")
def qwen2_vl_policy(tiny_policy):
    """A tiny Qwen2-VL (no temporal scaling of video positions), with the tiny policy's processor."""
    from transformers import Qwen2VLForConditionalGeneration

    from ktr.model.policy import Policy

    cfg = tiny_qwen2_vl_config()
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return Policy(model=Qwen2VLForConditionalGeneration(cfg).eval(), processor=tiny_policy.processor)


def _batch(policy):
    batch = policy.processor.collate(synthetic_samples(policy.processor, 2, image_every=2))
    assert batch.is_video.tolist() == [True, False]
    lengths = batch.attention_mask.sum(-1)
    assert lengths[0] != lengths[1]  # one row is left-padded
    return batch


def _assert_same_rollout(a, b) -> None:
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "completion_ids", "completion_mask"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    assert a.texts == b.texts and a.group_size == b.group_size


@pytest.mark.parametrize("which", ["untied_policy", "qwen2_vl_policy", "untied_qwen3vl"])
@pytest.mark.slow
def test_greedy_equals_hf(which, request) -> None:
    policy = request.getfixturevalue(which)
    batch = _batch(policy)
    cfg = SamplingConfig(group_size=G, max_new_tokens=8)
    hf = generate(policy.model, policy.processor, batch, cfg, group_size=1, greedy=True)  # hf greedy needs G = 1
    assert hf.completion_ids[0].unique().numel() > 1  # not a degenerate repeated token
    _assert_same_rollout(generate_shared(policy.model, policy.processor, batch, cfg, group_size=1, greedy=True), hf)
    shared = generate_shared(policy.model, policy.processor, batch, cfg, greedy=True)
    assert torch.equal(shared.completion_ids, hf.completion_ids.repeat_interleave(G, dim=0))
    # top_k = 1 sampling is greedy through generate's sampling path, with num_return_sequences = G
    one = SamplingConfig(group_size=G, max_new_tokens=8, top_k=1, top_p=1.0)
    _assert_same_rollout(generate_shared(policy.model, policy.processor, batch, one),
                         generate(policy.model, policy.processor, batch, one))


@torch.no_grad()
def _teacher_forced_scores(model, batch, cfg, tokens):
    """The shared path's processed scores `[T, N, V]` and next positions `[T, 3, N]` when fed `tokens` `[N, T]`
    (over the preallocated cache, as `generate_shared` decodes)."""
    suppress = torch.tensor(suppressed_token_ids(model))
    state = prefill(model, batch, cfg.group_size, new_tokens=tokens.shape[1])
    scores, positions = [], []
    for t in range(tokens.shape[1]):
        scores.append(process_logits(state.logits, suppress, True, cfg.temperature, cfg.top_k, cfg.top_p))
        positions.append(state.next_positions[:, :, 0])
        decode_step(model, state, tokens[:, t])
    return torch.stack(scores), torch.stack(positions)


@pytest.mark.parametrize("which", ["untied_policy", "qwen2_vl_policy"])
# temperature 0.02 sharpens the random model's flat logits so that the nucleus is small (candidate path);
# at temperature 1 it holds most of the vocabulary (full-sort path)
@pytest.mark.parametrize("settings", [dict(temperature=0.02, top_p=0.9), dict(temperature=1.0, top_p=0.95, top_k=50)])
def test_sampled_distribution_equals_hf_per_step(which, settings, request) -> None:
    policy = request.getfixturevalue(which)
    model, batch = policy.model, _batch(policy)
    cfg = SamplingConfig(group_size=G, max_new_tokens=4, **settings)
    torch.manual_seed(7)
    out = model.generate(**hf_generate_kwargs(model, policy.processor, batch, cfg, G, greedy=False),
                         output_scores=True, return_dict_in_generate=True)
    tokens = out.sequences[:, batch.input_ids.shape[1]:]  # [N, T]
    ref = torch.stack(out.scores)  # [T, N, V] processed scores before each draw
    mine, positions = _teacher_forced_scores(model, batch, cfg, tokens)
    assert torch.equal(torch.isinf(mine), torch.isinf(ref))  # the same kept sets (suppressed, top-k, top-p)
    finite = torch.isfinite(ref)
    assert 0 < int(finite[0, 0].sum()) < ref.shape[-1]
    torch.testing.assert_close(mine[finite], ref[finite], rtol=1e-5, atol=1e-5)
    # the same seed draws the same tokens, and the rollouts are identical (`generate` assembles its rollout so)
    hf = assemble_rollout(batch, tokens, G, policy.processor, end_of_sequence_ids(policy.processor))
    torch.manual_seed(7)
    _assert_same_rollout(generate_shared(model, policy.processor, batch, cfg), hf)
    # generated tokens sit where the scoring passes put them (3D positions of the whole sequence)
    view = SequenceView.of(model, hf, batch)
    prompt_len = batch.input_ids.shape[1]
    t = hf.completion_ids.shape[1]
    torch.testing.assert_close(positions[:t].permute(1, 2, 0)[:, hf.completion_mask],
                               view.position_ids[:, :, prompt_len:][:, hf.completion_mask], rtol=0, atol=0)


def test_rows_ending_at_different_steps(untied_policy, monkeypatch) -> None:
    """End-of-sequence handling: a token sampled mid-way by some rows is made an EOS token for both paths."""
    import ktr.rollout.hf

    policy = untied_policy
    batch = _batch(policy)
    cfg = SamplingConfig(group_size=G, max_new_tokens=6, temperature=1.0, top_k=3, top_p=1.0)
    torch.manual_seed(11)
    first = generate(policy.model, policy.processor, batch, cfg)
    eos = int(first.completion_ids[1, 2])  # row 1 ends at step 3; other rows whenever they draw it
    monkeypatch.setattr(ktr.rollout.hf, "end_of_sequence_ids", lambda processor: [eos])
    monkeypatch.setattr("ktr.rollout.shared.end_of_sequence_ids", lambda processor: [eos])
    torch.manual_seed(11)
    hf = generate(policy.model, policy.processor, batch, cfg)
    torch.manual_seed(11)
    shared = generate_shared(policy.model, policy.processor, batch, cfg)
    lengths = hf.completion_mask.sum(-1)
    assert lengths[1] == 3 and lengths.unique().numel() > 1
    _assert_same_rollout(shared, hf)


def test_inverse_cdf_draw_is_seeded_and_keeps_the_processed_set(untied_policy) -> None:
    """`sampling.draw: inverse_cdf`: one seed gives one rollout, other tokens than `generate`'s multinomial draw
    (another random stream), and every drawn token lies in the processed (top-k) set of its step."""
    from ktr.config import ConfigError

    model, batch = untied_policy.model, _batch(untied_policy)
    cfg = SamplingConfig(group_size=G, max_new_tokens=5, temperature=1.0, top_k=20, draw="inverse_cdf")
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(generate_shared(model, untied_policy.processor, batch, cfg))
    _assert_same_rollout(*runs)
    torch.manual_seed(3)
    multinomial = generate_shared(model, untied_policy.processor, batch,
                                  SamplingConfig(group_size=G, max_new_tokens=5, temperature=1.0, top_k=20))
    assert not torch.equal(runs[0].completion_ids, multinomial.completion_ids)
    tokens = runs[0].completion_ids  # [N, T]
    scores, _ = _teacher_forced_scores(model, batch, cfg, tokens)  # [T, N, V]
    drawn = scores.gather(-1, tokens.T.unsqueeze(-1)).squeeze(-1)  # [T, N]
    assert torch.isfinite(drawn[runs[0].completion_mask.T]).all()
    with pytest.raises(ConfigError, match="sampling.draw: 'inverse_cdf' is drawn by the shared backend"):
        SamplingConfig(backend="hf", draw="inverse_cdf")


def test_registered_and_restores_train_mode(untied_policy) -> None:
    assert ROLLOUT_BACKENDS["shared"] == "ktr.rollout.shared:SharedPrefixBackend"
    backend = rollout_backend("shared")
    assert type(backend) is SharedPrefixBackend
    model = untied_policy.model
    model.train()
    try:
        out = backend.generate(model, untied_policy.processor, _batch(untied_policy),
                               SamplingConfig(group_size=2, max_new_tokens=2))
        assert model.training and out.completion_ids.shape == (4, 2)
    finally:
        model.eval()
    with pytest.raises(ValueError, match="exceed max_prompt_length=10"):
        backend.generate(model, untied_policy.processor, _batch(untied_policy),
                         SamplingConfig(group_size=2, max_prompt_length=10))


@pytest.mark.parametrize("image_every", [0, 1, 2])  # all videos, all images, mixed: the same calls
def test_prompt_prefilled_once_per_prompt(tiny_policy, image_every) -> None:
    """One vision call for the B prompts, one decoder prefill on B rows, then one N-row call per new token."""
    model = tiny_policy.model
    batch = tiny_policy.processor.collate(synthetic_samples(tiny_policy.processor, 2, image_every=image_every))
    shapes, vision_calls = [], []
    hooks = [model.model.language_model.register_forward_hook(
                 lambda m, args, kwargs, out: shapes.append(tuple(kwargs["inputs_embeds"].shape[:2])),
                 with_kwargs=True),
             model.model.visual.register_forward_hook(lambda *a: vision_calls.append(1))]
    try:
        out = generate_shared(model, tiny_policy.processor, batch, SamplingConfig(group_size=G, max_new_tokens=3))
    finally:
        for h in hooks:
            h.remove()
    t = out.completion_ids.shape[1]
    assert len(vision_calls) == 1
    assert shapes == [(2, batch.input_ids.shape[1])] + [(2 * G, 1)] * (t - 1)
