"""Split attention (`ktr.model.attention`) on random tensors: equal to the dense-mask attention it replaces, forward and
backward, with groups of different prompt lengths and sizes, grouped-query heads, through SDPA and through the
variable-length path's bookkeeping; a leaking variant differs; the transformers registration leaves other calls
alone."""

import pytest
import torch

from ktr.model import attention
from ktr.model.prefix import SplitGroup, SplitLayout, group_runs, pack_split

LAYOUT = SplitLayout((SplitGroup(0, 9, 3, 4), SplitGroup(21, 5, 2, 4), SplitGroup(34, 7, 1, 4)))


def _qkv(layout, heads=4, kv_heads=2, dim=8, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    w = layout.width
    return [torch.randn(1, h, w, dim, generator=gen, dtype=dtype).requires_grad_() for h in (heads, kv_heads, kv_heads)]


def _dense(q, k, v, mask, scale):
    """Eager attention under a `[W, W]` bool mask: `[1, W, H, D]`."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = (q @ k.transpose(-1, -2)) * scale
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return (probs @ v).transpose(1, 2)


def _leaky(module, q, k, v, layout, scaling=None, **_):
    """Completions see the earlier completions of their group: one causal block per group."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    out = [torch.nn.functional.scaled_dot_product_attention(q[:, :, g.start:g.end], k[:, :, g.start:g.end],
                                                            v[:, :, g.start:g.end], is_causal=True, scale=scaling)
           for g in layout.groups]
    return torch.cat(out, 2).transpose(1, 2), None


def _out_and_grads(fn, layout, **kw):
    q, k, v = _qkv(layout)
    out = fn(None, q, k, v, layout, scaling=0.3, **kw)[0]
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    (out * weight).sum().backward()
    return out.detach(), [x.grad for x in (q, k, v)]


def _assert_equal_to_dense(fn, layout=LAYOUT, **kw):
    out, grads = _out_and_grads(fn, layout, **kw)
    ref_out, ref_grads = _out_and_grads(lambda m, q, k, v, lay, scaling, **_: (_dense(q, k, v, lay.dense_mask(),
                                                                                       scaling), None), layout)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


def test_split_sdpa_equals_dense_mask_forward_and_backward():
    _assert_equal_to_dense(attention.split_sdpa)


def test_varlen_bookkeeping_equals_dense_mask():
    """`split_varlen`'s index tensors and reordering, with an SDPA stand-in for `flash_attn_varlen_func`."""
    _assert_equal_to_dense(attention.split_varlen, varlen_fn=attention.varlen_reference)


def test_a_leaking_variant_fails_the_check():
    with pytest.raises(AssertionError):
        _assert_equal_to_dense(_leaky)


def test_split_counts_only_needed_pairs():
    assert LAYOUT.pairs() == int(LAYOUT.dense_mask().sum())
    assert LAYOUT.width == 34 + 7 + 4


def test_pack_split_drops_hidden_prompt_tokens():
    """3 rows of one prompt (L = 5, its first token padding, its third hidden) + 2 of another (no padding), T = 2;
    the last row's second token is padding. Hidden tokens leave the row; positions are kept; gather points at the
    state before each completion token."""
    ids = torch.arange(5 * 7).view(5, 7)
    mask = torch.ones(5, 7, dtype=torch.long)
    mask[:3, 0] = 0
    mask[:3, 2] = 0
    mask[4, 6] = 0
    pos = (torch.arange(7) * 10).expand(3, 5, 7).clone()
    prompt_index = torch.tensor([0, 0, 0, 1, 1])
    packed = pack_split(ids, mask, torch.zeros_like(ids), pos, None, prompt_index, group_runs(prompt_index), 2)
    assert packed.attention_mask is None and packed.input_ids.shape == (1, 3 + 3 * 2 + 5 + 2 * 2)
    assert packed.input_ids[0].tolist() == [1, 3, 4, 5, 6, 12, 13, 19, 20,
                                            21, 22, 23, 24, 25, 26, 27, 33, 34]
    assert packed.position_ids[0, 0, :3].tolist() == [10, 30, 40]
    assert packed.split.groups == (SplitGroup(0, 3, 3, 2), SplitGroup(9, 5, 2, 2))
    assert packed.gather.tolist() == [[2, 3], [2, 5], [2, 7], [13, 14], [13, 16]]
    assert packed.prompt_index.tolist() == [0, 1] and packed.media_index.numel() == 0


def test_pack_split_declines_what_it_cannot_drop_exactly():
    ids = torch.arange(2 * 6).view(2, 6)
    mask = torch.ones(2, 6, dtype=torch.long)
    types = torch.zeros_like(ids)
    types[:, 1:3] = 1  # two vision placeholders
    pos = torch.arange(6).expand(3, 2, 6).clone()
    idx = torch.tensor([0, 0])

    def pack(m):
        return pack_split(ids, m, types, pos, None, idx, group_runs(idx), 2)

    assert pack(mask) is not None and pack(mask).media_index.tolist() == [0]
    hidden = mask.clone()
    hidden[:, 1:3] = 0
    assert pack(hidden) is not None and pack(hidden).media_index.numel() == 0  # all media hidden: dropped
    part = mask.clone()
    part[:, 1] = 0
    assert pack(part) is None  # half the media hidden: its features cannot be split
    hole = mask.clone()
    hole[0, 4] = 0
    assert pack(hole) is None  # a completion hidden before a visible token
    last = mask.clone()
    last[:, 3] = 0
    assert pack(last) is None  # the state predicting the first completion token is hidden


def test_registration_wraps_once_and_passes_other_calls_through():
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    attention.install()
    attention.install()
    fn = AttentionInterface._global_mapping["sdpa"]
    assert fn.ktr_wrapped is sdpa_attention_forward
    q, k, v = (torch.randn(2, 4, 6, 8) for _ in range(3))
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool).tril()
    module = torch.nn.Module()
    torch.testing.assert_close(fn(module, q, k, v, mask, scaling=0.5)[0],
                               sdpa_attention_forward(module, q, k, v, mask, scaling=0.5)[0], rtol=0, atol=0)
    layout = SplitLayout((SplitGroup(0, 2, 2, 2),))
    with pytest.raises(ValueError, match="layout instead of a mask"):
        fn(module, q[:1], k[:1], v[:1], mask[:1], **{attention.SPLIT_KWARG: layout})


def test_cached_prompts_equal_one_pass():
    """A prompts-only pass recording K/V in a `PromptCache`, then the completions alone in two micro-batches reading
    it: outputs and gradients (the leaves' sent back through the prompts' pass) equal one split pass."""
    from dataclasses import replace

    layout = SplitLayout((SplitGroup(0, 9, 3, 4), SplitGroup(21, 5, 2, 4)))
    module = torch.nn.Module()
    module.layer_idx = 0
    out, grads = _out_and_grads(attention.split_sdpa, layout)
    q, k, v = _qkv(layout)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    cache = attention.PromptCache()
    prompts = [slice(0, 9), slice(21, 26)]

    def cols(x, sl):
        return torch.cat([x[:, :, s] for s in sl], 2)

    po = attention.split_sdpa(module, cols(q, prompts), cols(k, prompts), cols(v, prompts),
                              SplitLayout((SplitGroup(0, 9, 0, 4), SplitGroup(9, 5, 0, 4)), cache=cache),
                              scaling=0.3)[0]
    cache.freeze()
    total = (po * torch.cat([weight[:, s] for s in prompts], 1)).sum()
    # micro-batch 1: completions 0-1 of group 0; micro-batch 2: completion 2 of group 0 and both of group 1
    for comp, groups in (([slice(9, 17)], (SplitGroup(0, 0, 2, 4, cached=0),)),
                         ([slice(17, 21), slice(26, 34)], (SplitGroup(0, 0, 1, 4, cached=0),
                                                           SplitGroup(4, 0, 2, 4, cached=1)))):
        mo = attention.split_sdpa(module, cols(q, comp), cols(k, comp), cols(v, comp),
                                  replace(SplitLayout(groups), cache=cache), scaling=0.3)[0]
        torch.testing.assert_close(mo, torch.cat([out[:, s] for s in comp], 1), rtol=1e-10, atol=1e-10)
        (mo * torch.cat([weight[:, s] for s in comp], 1)).sum().backward()
    tensors, leaf_grads = cache.gradients()
    torch.autograd.backward([total, *tensors], [torch.ones(()), *leaf_grads])
    for x, g in zip((q, k, v), grads):
        torch.testing.assert_close(x.grad, g, rtol=1e-10, atol=1e-10)
