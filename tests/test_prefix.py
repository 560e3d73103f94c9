"""Shared prompt prefix (ktr.model.prefix): the packed layout, every scoring pass equal to the naive layout,
gradients of the KTR loss equal with and without micro-batches and a frozen vision tower, and the decoder's rows per
pass."""

from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch

from ktr.model import attention
from ktr.model.families import language_model
from ktr.model.forward import (SequenceView, completion_hidden, completion_logps, encode_media, prefix_layout,
                               shared_layout)
from ktr.model.prefix import group_runs, pack_groups
from ktr.probes.temporal import temporal_scores
from ktr.probes.visual import visual_scores
from tests.helpers import module_grads, rollout_for


def test_packed_mask_sees_prompt_and_own_completion_only() -> None:
    # 2 prompts (L = 3, the first left-padded by 1), G = 2, T = 2; row 3's second token is padding
    ids = torch.arange(2 * 2 * 5).view(4, 5)
    mask = torch.ones(4, 5, dtype=torch.long)
    mask[:2, 0] = 0
    mask[3, 4] = 0
    pos = torch.arange(5).expand(3, 4, 5).clone()
    prompt_index = torch.tensor([0, 0, 1, 1])
    packed = pack_groups(ids, mask, torch.zeros_like(ids), pos, None, prompt_index, group_runs(prompt_index), 2)
    assert packed.input_ids.shape == (2, 3 + 2 * 2)
    assert packed.input_ids[0].tolist() == [0, 1, 2, 3, 4, 8, 9]  # prompt of row 0, then rows 0 and 1's completions
    allowed = packed.attention_mask[:, 0]  # [2, W, W]
    # completion 2's first token (column 5) sees the visible prompt and itself, not completion 1
    assert allowed[0, 5].tolist() == [False, True, True, False, False, True, False]
    assert allowed[0, 6].tolist() == [False, True, True, False, False, True, True]
    assert allowed[1, 6, 6] and not allowed[1, :6, 6].any()  # a padded key is hidden; a padded query sees itself
    assert (allowed.sum(-1) > 0).all()
    # token 0 is predicted at the prompt's last position, token 1 at its completion's first
    assert packed.gather.tolist() == [[2, 3], [2, 5], [7 + 2, 7 + 3], [7 + 2, 7 + 5]]
    starts, sizes = group_runs(torch.tensor([0, 0, 0, 1, 1, 2]))
    assert starts.tolist() == [0, 3, 5] and sizes.tolist() == [3, 2, 1]


def _logps(model, view, feats, rollout, zero_vision=None):
    hidden = completion_hidden(model, view, feats, rollout.completion_ids.shape[1], zero_vision=zero_vision)
    return completion_logps(model, hidden, rollout.completion_ids, rollout.completion_mask, chunk_size=5)[0]


@contextmanager
def attention_implementation(model, impl: str):
    """The language model's attention switched to `impl` for the block (the session fixtures load eager)."""
    cfg = language_model(model).config
    before = cfg._attn_implementation
    cfg._attn_implementation = impl
    try:
        yield
    finally:
        cfg._attn_implementation = before


def _every_pass_equals_naive(policy, layout: str) -> None:
    """Two prompts of different lengths, a video and an image, G = 4: policy, visual and temporal passes in `layout`
    equal the naive layout to 1e-5."""
    model, proc = policy.model, policy.processor
    batch, rollout = rollout_for(policy, n_prompts=2, group_size=4, max_new_tokens=8, image_every=2)
    assert batch.is_video.tolist() == [True, False] and batch.attention_mask.sum(-1).unique().numel() == 2
    feats = encode_media(model, batch.pixel_values, batch.grid_thw)
    shared = SequenceView.of(model, rollout, batch)
    naive = replace(shared, shared_prefix=False)
    t = rollout.completion_ids.shape[1]
    assert prefix_layout(model, shared) == layout
    packed = shared_layout(model, shared, t)
    if layout == "dense":
        assert packed.input_ids.shape == (2, rollout.prompt_length + 4 * t)  # one packed row per prompt
    else:  # one row: each prompt's visible tokens once, then its completions
        assert packed.input_ids.shape == (1, int(batch.attention_mask.sum()) + 8 * t)
        assert packed.attention_mask is None and len(packed.split.groups) == 2
    valid = rollout.completion_mask
    base = _logps(model, naive, feats, rollout)
    torch.testing.assert_close(_logps(model, shared, feats, rollout)[valid], base[valid], rtol=1e-5, atol=1e-5)
    args = (rollout.completion_ids, valid, base)
    for pert in ("attention_mask", "attention_mask_block", "zero_embeddings"):
        a = visual_scores(model, batch, shared, feats, *args, perturbation=pert)
        b = visual_scores(model, batch, naive, feats, *args, perturbation=pert)
        assert a.abs().max() > 0, pert
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=pert)
    gen = [torch.Generator().manual_seed(3) for _ in range(2)]
    a = temporal_scores(model, proc, batch, shared, feats, *args, generator=gen[0])
    b = temporal_scores(model, proc, batch, naive, feats, *args, generator=gen[1])
    assert a[:4].abs().max() > 0
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("impl, layout", [("eager", "dense"), ("sdpa", "split")])
def test_every_pass_equals_naive(tiny_any, impl, layout) -> None:
    """Eager attention packs with the dense mask (the oracle); SDPA splits attention in one packed row."""
    with attention_implementation(tiny_any.model, impl):
        _every_pass_equals_naive(tiny_any, layout)


@torch.no_grad()
def test_a_leaking_split_attention_fails_the_check(tiny_policy, monkeypatch) -> None:
    """The same check catches completions that see each other (one causal block per group)."""
    from tests.test_split_attention import _leaky

    monkeypatch.setitem(attention.SPLITTERS, "sdpa", _leaky)
    with attention_implementation(tiny_policy.model, "sdpa"), pytest.raises(AssertionError):
        _every_pass_equals_naive(tiny_policy, "split")


@torch.no_grad()
def test_visual_probe_drops_hidden_media_from_the_packed_row(tiny_any) -> None:
    """The `attention_mask` probe's packed row holds the text only (positions those of the masked view), and its
    log-probs equal the masked rows' (naive) and the dense mask's."""
    from ktr.probes.visual import get_visual_perturbation

    model = tiny_any.model
    batch, rollout = rollout_for(tiny_any, n_prompts=2, group_size=3, max_new_tokens=6, image_every=2)
    feats = encode_media(model, batch.pixel_values, batch.grid_thw)
    view, _ = get_visual_perturbation("attention_mask")(SequenceView.of(model, rollout, batch), model, batch, None, 0)
    t = rollout.completion_ids.shape[1]
    text = (batch.attention_mask.bool() & (batch.mm_token_type_ids == 0)).sum(-1)  # [B] visible text tokens
    with attention_implementation(model, "sdpa"):
        packed = shared_layout(model, view, t)
        assert [g.prompt for g in packed.split.groups] == text.tolist()
        assert not (packed.mm_token_type_ids > 0).any() and packed.media_index.numel() == 0
        p = rollout.prompt_length
        kept = view.attention_mask.bool()[0, :p]
        assert torch.equal(packed.position_ids[:, 0, :int(text[0])], view.position_ids[:, 0, :p][:, kept])
        split = _logps(model, view, feats, rollout)
        naive = _logps(model, replace(view, shared_prefix=False), feats, rollout)
        dense = _logps(model, replace(view, prefix_attention="dense"), feats, rollout)
    valid = rollout.completion_mask
    torch.testing.assert_close(split[valid], naive[valid], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split[valid], dense[valid], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_averaged_swap_and_shuffle_equal_naive(tiny_policy) -> None:
    """`swap_media` (each group reads another prompt's clip) and the shuffle, averaged over 2 draws, on the packed
    layout equal the naive layout: three videos of one shape, G = 3."""
    model, proc = tiny_policy.model, tiny_policy.processor
    batch, rollout = rollout_for(tiny_policy, n_prompts=3, group_size=3, max_new_tokens=6)
    feats = encode_media(model, batch.pixel_values, batch.grid_thw)
    shared = SequenceView.of(model, rollout, batch)
    naive = replace(shared, shared_prefix=False)
    assert shared_layout(model, shared, rollout.completion_ids.shape[1]) is not None
    valid = rollout.completion_mask
    args = (rollout.completion_ids, valid, _logps(model, naive, feats, rollout))
    a = visual_scores(model, batch, shared, feats, *args, perturbation="swap_media", draws=2)
    b = visual_scores(model, batch, naive, feats, *args, perturbation="swap_media", draws=2)
    assert a.abs().max() > 0
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    gen = [torch.Generator().manual_seed(5) for _ in range(2)]
    a = temporal_scores(model, proc, batch, shared, feats, *args, generator=gen[0], draws=2)
    b = temporal_scores(model, proc, batch, naive, feats, *args, generator=gen[1], draws=2)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_rows_with_different_prompt_parts_run_naive(tiny_policy) -> None:
    """`random_half` hides a different half per row: no shared prefix exists, so the pass runs whole rows."""
    batch, rollout = rollout_for(tiny_policy, n_prompts=1, group_size=2)
    view = SequenceView.of(tiny_policy.model, rollout, batch)
    t = rollout.completion_ids.shape[1]
    assert shared_layout(tiny_policy.model, view, t) is not None
    mask = view.attention_mask.clone()
    mask[1, (view.mm_token_type_ids[1] > 0).nonzero()[0]] = 0
    assert shared_layout(tiny_policy.model, replace(view, attention_mask=mask), t) is None
    assert shared_layout(tiny_policy.model, replace(view, shared_prefix=False), t) is None


def _module(name: str = "tiny", checkpointing: bool = False):
    from ktr.config import PolicyConfig, SamplingConfig
    from ktr.module import KTRModule

    torch.set_num_threads(1)
    module = KTRModule(policy=PolicyConfig(name_or_path=name, gradient_checkpointing=checkpointing),
                       sampling=SamplingConfig(group_size=4, max_new_tokens=6, top_p=1.0))
    return module.train() if checkpointing else module


def _grads(module, batch, rollout, shared, micro):
    from ktr.config import LossConfig

    cfg = LossConfig(beta=0.04, micro_batch_size=micro, shared_prefix=shared)
    return module_grads(module, batch, rollout, cfg, torch.linspace(-1, 1, rollout.completion_ids.shape[0]))


def _recomputed_layers(model) -> int:
    """Decoder layers that recompute their forward in backward (gradient checkpointing on and in training mode)."""
    return sum(bool(getattr(m, "gradient_checkpointing", False)) and m.training
               for m in language_model(model).layers)


@pytest.mark.parametrize("name", ["tiny", "tiny-qwen3vl"])
@pytest.mark.parametrize("frozen_vision, checkpointing", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.slow
def test_ktr_gradients_equal_naive(name, frozen_vision, checkpointing) -> None:
    """Split attention (SDPA, the default): the reference log-probs, the loss and every parameter's gradient equal
    the naive layout's, whole batch and micro-batches, trainable or frozen vision, with gradient checkpointing.

    In float64: what is compared is the two layouts' maths. In float32 the micro-batches' accumulation order alone
    moved some gradients by 1.3e-5 of their tensor's largest entry on a 2-core AMD EPYC (under 1e-5 on the Intel
    Xeon of earlier runs), so the tolerance measured the CPU's kernels; in float64 the layouts agree to 6e-8 of it there
    (whole batch and micro-batches alike), and a leak moves gradients by O(1)."""
    from ktr.model.families import vision_tower
    from ktr.model.policy import Policy

    module = _module(name, checkpointing)
    module.model.double()
    assert (_recomputed_layers(module.model) > 0) == checkpointing
    if frozen_vision:
        vision_tower(module.model).requires_grad_(False)
    batch, rollout = rollout_for(Policy(module.model, module.processor), n_prompts=2, group_size=4,
                                 image_every=2)
    view = SequenceView.of(module.model, rollout, batch)
    assert prefix_layout(module.model, view) == "split" and shared_layout(module.model, view, 6) is not None
    loss0, scores0, g0 = _grads(module, batch, rollout, False, None)
    assert any("visual" in k for k in g0) != frozen_vision
    for micro in (None, 1, 3, 8):  # whole batch; micro-batches that split groups (the prompts' K/V shared); all
        loss, scores, g = _grads(module, batch, rollout, True, micro)
        torch.testing.assert_close(scores.ref_logps, scores0.ref_logps, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loss, loss0, rtol=1e-5, atol=1e-6)
        assert g.keys() == g0.keys()
        for k in g0:
            torch.testing.assert_close(g[k], g0[k], rtol=1e-5, atol=1e-5 * g0[k].abs().max().item(), msg=k)


@pytest.mark.parametrize("name", ["tiny", "tiny-qwen3vl"])
@pytest.mark.slow
def test_micro_batches_run_each_prompt_once(name) -> None:
    """Micro-batches smaller than a group (`loss.micro_batch_size` 3 for G = 4): the decoder runs each prompt once
    (one prompts pass, its keys and values shared) and then only the N*T completion tokens, and the gradients equal
    one pass's. With the dense mask each micro-batch repeats its prompts."""
    from ktr.model.policy import Policy

    module = _module(name)
    batch, rollout = rollout_for(Policy(module.model, module.processor), n_prompts=2, group_size=4, image_every=2)
    tokens = []
    hook = language_model(module.model).register_forward_pre_hook(
        lambda m, args, kw: tokens.append(kw["inputs_embeds"].shape[:2].numel()), with_kwargs=True)
    try:
        _, _, g0 = _grads(module, batch, rollout, True, None)
        tokens.clear()
        _, _, g = _grads(module, batch, rollout, True, 3)
    finally:
        hook.remove()
    n, t = rollout.completion_ids.shape
    prompts = int(batch.attention_mask.sum())
    # the policy and reference passes (whole, no grad), then the gradient pass: the prompts once + 3 micro-batches
    assert tokens[:-4] == [prompts + n * t] * 2 and tokens[-4:] == [prompts, 3 * t, 3 * t, 2 * t]
    for k in g0:
        torch.testing.assert_close(g[k], g0[k], rtol=1e-5, atol=1e-5 * g0[k].abs().max().item(), msg=k)


def _shared_start_rollout(module, n_start: int = 6):
    """A rollout whose G = 4 completions per prompt begin with the same `n_start` tokens (as after a warm start)."""
    from ktr.model.policy import Policy

    batch, rollout = rollout_for(Policy(module.model, module.processor), n_prompts=2, group_size=4,
                                 max_new_tokens=12, seed=1)
    ids = rollout.completion_ids.clone()
    for first in range(0, ids.shape[0], 4):
        ids[first + 1:first + 4, :n_start] = ids[first, :n_start]
    p = rollout.prompt_length
    input_ids, attention = rollout.input_ids.clone(), rollout.attention_mask.clone()
    input_ids[:, p:], attention[:, p:] = ids, 1
    return batch, replace(rollout, input_ids=input_ids, attention_mask=attention, completion_ids=ids,
                          completion_mask=torch.ones_like(ids, dtype=torch.bool))


def _key_and_grads(module, batch, rollout, shared: bool, tie: bool):
    """The step's key tokens (same temporal draw in both layouts) and the KTR loss's gradients on them."""
    from ktr.config import LossConfig
    from ktr.probes.keytokens import attribute

    module.loss_cfg = LossConfig(beta=0.04, shared_prefix=shared)
    module.key_cfg = replace(module.key_cfg, tie_contexts=tie)
    module.manual_backward = lambda loss: loss.backward()
    module._reference_ready()
    module.model.zero_grad(set_to_none=True)
    scores = module.score(batch, rollout)
    torch.manual_seed(7)
    key = attribute(module.model, module.processor, batch, rollout, scores, module.key_cfg, module.chunk_size)
    module.update(rollout, scores, key.mask, torch.linspace(-1, 1, rollout.completion_ids.shape[0]))
    return key, {k: p.grad.clone() for k, p in module.model.named_parameters() if p.grad is not None}


@pytest.mark.slow
def test_key_tokens_and_gradients_equal_naive_on_shared_starts() -> None:
    """Completions that begin alike have tied scores at their common start; the packed layout must select exactly
    the naive layout's tokens (released ties: kept or dropped together), and then give the same gradients."""
    module = _module()
    batch, rollout = _shared_start_rollout(module)
    naive, g0 = _key_and_grads(module, batch, rollout, shared=False, tie=True)
    shared, g = _key_and_grads(module, batch, rollout, shared=True, tie=True)
    for name in naive.masks:
        assert torch.equal(shared.masks[name], naive.masks[name]), name
        assert torch.equal(shared.scores[name][:, 0], shared.scores[name][[0, 0, 0, 0, 4, 4, 4, 4], 0]), name
    assert torch.equal(shared.mask, naive.mask)
    assert g.keys() == g0.keys()
    for k in g0:
        torch.testing.assert_close(g[k], g0[k], rtol=1e-5, atol=1e-5 * g0[k].abs().max().item(), msg=k)


@pytest.mark.parametrize("packed", ["split", "dense"])
@pytest.mark.slow
def test_tied_contexts_select_alike_at_every_threshold(packed, monkeypatch) -> None:
    """At every threshold a pool can have (each integer quantile rank), the packed layout's scores select the naive
    layout's tokens once contexts are tied, split attention and dense mask alike. Untied, the dense-mask row's
    last-bit differences between copies of one context split them at some threshold (what made the demo's entropy
    mask keep 99 tokens instead of 105). Split attention computes the copies of a context in one batched call, and
    here they come out bit-identical even untied; the tie rule does not rely on that."""
    from ktr.probes.keytokens import tie_contexts
    from ktr.probes.select import select_top_ratio

    of = SequenceView.__dict__["of"].__func__
    monkeypatch.setattr(SequenceView, "of", classmethod(lambda cls, *a, **k: of(cls, *a, **k, prefix_attention=packed)))
    module = _module()
    with torch.no_grad():  # a random head gives near-uniform next-token distributions whose entropies differ only in
        module.model.lm_head.weight.mul_(30.0)  # the last bits across contexts too; a trained head is peaked
    batch, rollout = _shared_start_rollout(module, n_start=8)
    naive, _ = _key_and_grads(module, batch, rollout, shared=False, tie=False)
    shared, _ = _key_and_grads(module, batch, rollout, shared=True, tie=False)
    ids, valid, prompt = rollout.completion_ids, rollout.completion_mask, rollout.prompt_index
    n = 4 * ids.shape[1]  # tokens per group pool
    untied_splits = 0
    for name in naive.scores:
        tied = [tie_contexts({name: k.scores[name]}, ids, valid, prompt, module.key_cfg)[name] for k in (naive, shared)]
        assert torch.equal(tied[0], naive.scores[name]), name  # the naive layout's copies are already bit-identical
        for rank in range(n):
            ratio = 1.0 - rank / (n - 1)
            a, b = (select_top_ratio(s, valid, ratio, group_size=4) for s in tied)
            assert torch.equal(a, b), (name, rank)
            raw = select_top_ratio(shared.scores[name], valid, ratio, group_size=4)
            untied_splits += int(not torch.equal(raw, a))
    if packed == "dense":
        assert untied_splits > 0  # the dense row's raw scores do split ties: this test would fail without tying


@pytest.mark.slow
def test_fast_exp_keeps_key_tokens_and_gradients_on_a_peaked_head(monkeypatch) -> None:
    """The chunked head's exponential and gradient scaling (`ktr.ops.exp_shifted_`, `ktr.ops.mul_rows_`, which drop
    what would be subnormal) against the plain `exp` and `mul_`, on a peaked head where most of each row
    underflows: the policy pass's log-probs, the probes' scores and every key-token mask are bit-identical; the
    entropies equal to 1e-30 (this head puts many at 1e-35 to 1e-20, and the dropped entries move the smallest);
    the gradients equal to float32 rounding (what differs is each dropped entry's < 1.2e-38 in `dL/dlogits`)."""
    import ktr.fused

    module = _module()
    batch, rollout = _shared_start_rollout(module)  # sampled before the head is peaked: unlikely tokens, real gradients
    with torch.no_grad():
        module.model.lm_head.weight.mul_(150.0)
    runs = {}
    for name in ("fast", "plain"):
        if name == "plain":
            monkeypatch.setattr(ktr.fused, "exp_shifted_", lambda z: z.exp_())
            monkeypatch.setattr(ktr.fused, "mul_rows_", lambda e, scale: e.mul_(scale[:, None]))
        key, grads = _key_and_grads(module, batch, rollout, shared=True, tie=True)
        runs[name] = key, grads, module.score(batch, rollout)
    (fast, g, s), (plain, g0, s0) = runs["fast"], runs["plain"]
    assert "entropy" in plain.masks and fast.mask.any() and not fast.mask.all()
    logits = module.model.lm_head(s0.base_hidden if s0.base_hidden is not None else s0.hidden.detach())
    below = (logits - logits.amax(-1, keepdim=True)) < -87.4
    assert below.float().mean() > 0.3, "the head is not peaked enough for the comparison to mean anything"
    assert torch.equal(s.logps, s0.logps)
    torch.testing.assert_close(s.entropy, s0.entropy, rtol=0, atol=1e-30)  # entropies of ~1e-35 here move a little
    assert not torch.equal(s.entropy, s0.entropy) or s0.entropy.min() > 1e-25  # (the head is that peaked)
    assert fast.masks.keys() == plain.masks.keys()
    for name in plain.masks:
        if name == "entropy":
            torch.testing.assert_close(fast.scores[name], plain.scores[name], rtol=0, atol=1e-30)
        else:
            assert torch.equal(fast.scores[name], plain.scores[name]), name
        assert torch.equal(fast.masks[name], plain.masks[name]), name
    assert torch.equal(fast.mask, plain.mask)
    scale = max(v.abs().max().item() for v in g0.values())  # some grads are ~1e-32 here: judge by the largest
    for k in g0:
        torch.testing.assert_close(g[k], g0[k], rtol=1e-6, atol=1e-6 * scale, msg=k)
