"""Probes on the tiny model: identity perturbations score exactly 0; hiding media changes scores; the vision
tower runs once per distinct (media, perturbation) whatever G; forward calls are the same for any media mix."""

import pytest
import torch

from ktr.config import KeyTokenConfig
from ktr.model.forward import PolicyPass, SequenceView, completion_hidden, completion_logps, encode_media
from ktr.probes.keytokens import attribute
from ktr.probes.temporal import segment_permutation, temporal_scores
from ktr.probes.visual import visual_scores
from tests.conftest import TINY_FAMILIES
from tests.helpers import rollout_for


@pytest.fixture(params=TINY_FAMILIES)
def tiny_policy(request, tiny_policy):
    """Every probe test runs on each tiny family (Qwen2.5-VL, Qwen3-VL): the probes never ask which."""
    return tiny_policy if request.param == "tiny" else request.getfixturevalue("tiny_qwen3vl")


def _base(policy, batch, rollout):
    model = policy.model
    view = SequenceView.of(model, rollout, batch)
    feats = encode_media(model, batch.pixel_values, batch.grid_thw)
    hidden = completion_hidden(model, view, feats, rollout.completion_ids.shape[1])
    logps, ent = completion_logps(model, hidden, rollout.completion_ids, rollout.completion_mask, with_entropy=True)
    return view, feats, logps, ent


@torch.no_grad()
@pytest.mark.parametrize("kind", ["visual", "temporal"])
@pytest.mark.slow
def test_identity_perturbation_scores_exactly_zero(tiny_policy, kind) -> None:
    batch, rollout = rollout_for(tiny_policy)
    view, feats, logps, _ = _base(tiny_policy, batch, rollout)
    args = (rollout.completion_ids, rollout.completion_mask, logps)
    if kind == "visual":
        s = visual_scores(tiny_policy.model, batch, view, feats, *args, perturbation="identity")
    else:
        s = temporal_scores(tiny_policy.model, tiny_policy.processor, batch, view, feats, *args,
                            perturbation="identity")
    assert torch.equal(s, torch.zeros_like(s))


@torch.no_grad()
@pytest.mark.parametrize("perturbation", ["attention_mask", "zero_embeddings", "random_half"])
@pytest.mark.slow
def test_hiding_the_video_changes_scores(tiny_policy, perturbation) -> None:
    batch, rollout = rollout_for(tiny_policy)
    view, feats, logps, _ = _base(tiny_policy, batch, rollout)
    before = (view.attention_mask.clone(), view.position_ids.clone())
    s = visual_scores(tiny_policy.model, batch, view, feats, rollout.completion_ids, rollout.completion_mask, logps,
                      perturbation=perturbation, generator=torch.Generator().manual_seed(0))
    valid = rollout.completion_mask
    assert s[valid].abs().max() > 1e-4
    assert (s[~valid] == 0).all()
    assert torch.equal(view.attention_mask, before[0]) and torch.equal(view.position_ids, before[1])  # no mutation


@torch.no_grad()
@pytest.mark.slow
def test_swap_media_shows_each_prompt_another_prompts_clip(tiny_policy) -> None:
    """Prompts 0 and 1 (videos of one shape) see each other's features; prompt 2 (an image, alone) has no partner
    and gets zero embeddings. Checked against passes built by hand."""
    from dataclasses import replace

    from ktr.probes.compare import compare_passes

    model = tiny_policy.model
    batch, rollout = rollout_for(tiny_policy, n_prompts=3, image_every=3)
    view, feats, logps, _ = _base(tiny_policy, batch, rollout)
    ids, valid = rollout.completion_ids, rollout.completion_mask
    s = visual_scores(model, batch, view, feats, ids, valid, logps, perturbation="swap_media")
    swapped = feats.with_prompts([0, 1], replace(feats, per_prompt=feats.per_prompt[1::-1],
                                                 deepstack=feats.deepstack and feats.deepstack[1::-1]))
    zero = (view.mm_token_type_ids > 0) & (rollout.prompt_index == 2).unsqueeze(-1)
    hidden = completion_hidden(model, view, swapped, ids.shape[1], zero_vision=zero)
    want = compare_passes(model, "logp_diff", logps, None, hidden, ids, valid, 512)
    torch.testing.assert_close(s, want, rtol=1e-5, atol=1e-5)
    assert s[valid].abs().max() > 1e-4
    zeroed = visual_scores(model, batch, replace(view), feats, ids, valid, logps, perturbation="zero_embeddings")
    rows = rollout.prompt_index == 2
    torch.testing.assert_close(s[rows], zeroed[rows], rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.slow
def test_swap_media_draws_show_each_prompt_a_different_clip(tiny_policy) -> None:
    """Draw d rotates the same-shaped prompts by 1 + d; `draws` = 2 is the mean of draws 0 and 1."""
    from ktr.probes.visual import get_visual_perturbation

    model = tiny_policy.model
    batch, rollout = rollout_for(tiny_policy, n_prompts=3)  # three videos of one shape
    view, feats, logps, _ = _base(tiny_policy, batch, rollout)
    ids, valid = rollout.completion_ids, rollout.completion_mask
    swap = get_visual_perturbation("swap_media")
    seen = [swap(view, model, batch, None, d)[0].prompt_index[::2].tolist() for d in range(3)]
    assert seen == [[1, 2, 0], [2, 0, 1], [1, 2, 0]]  # draw 2 wraps to a shift of 1: never a prompt's own clip
    first = visual_scores(model, batch, view, feats, ids, valid, logps, "swap_media")
    torch.testing.assert_close(first, _swap_scores(model, view, feats, ids, valid, logps, [1, 2, 0]),
                               rtol=1e-4, atol=1e-4)
    both = visual_scores(model, batch, view, feats, ids, valid, logps, "swap_media", draws=2)
    assert not torch.allclose(both, first)
    second = both * 2 - first  # the second draw's scores, recovered from the mean
    torch.testing.assert_close(second, _swap_scores(model, view, feats, ids, valid, logps, [2, 0, 1]),
                               rtol=1e-4, atol=1e-4)


def _swap_scores(model, view, feats, ids, valid, logps, other):
    """logp_diff scores with prompt i's features replaced by prompt other[i]'s, built by hand."""
    from dataclasses import replace

    from ktr.probes.compare import compare_passes

    ds = feats.deepstack and [feats.deepstack[j] for j in other]
    swapped = feats.with_prompts(list(range(len(other))),
                                 replace(feats, per_prompt=[feats.per_prompt[j] for j in other], deepstack=ds))
    hidden = completion_hidden(model, view, swapped, ids.shape[1])
    return compare_passes(model, "logp_diff", logps, None, hidden, ids, valid, 512)


@torch.no_grad()
@pytest.mark.slow
def test_temporal_draws_average_fresh_permutations(tiny_policy) -> None:
    """`draws` = 3 is the mean of three single-draw scores taken from the same generator in turn."""
    batch, rollout = rollout_for(tiny_policy, n_prompts=2)
    view, feats, logps, _ = _base(tiny_policy, batch, rollout)
    args = (tiny_policy.model, tiny_policy.processor, batch, view, feats, rollout.completion_ids,
            rollout.completion_mask, logps, "shuffle")
    gen = torch.Generator().manual_seed(3)
    singles = [temporal_scores(*args, generator=gen) for _ in range(3)]
    assert not torch.allclose(singles[0], singles[1])  # each draw another permutation
    mean = temporal_scores(*args, generator=torch.Generator().manual_seed(3), draws=3)
    torch.testing.assert_close(mean, sum(singles) / 3, rtol=1e-5, atol=1e-6)


def test_draws_need_a_random_perturbation() -> None:
    from ktr.config import ConfigError, SignalConfig

    KeyTokenConfig(temporal=SignalConfig(draws=4), visual_perturbation="swap_media", visual=SignalConfig(draws=2))
    with pytest.raises(ConfigError, match="key_tokens.visual.draws is 2, but the 'attention_mask' perturbation"):
        KeyTokenConfig(visual=SignalConfig(draws=2))
    with pytest.raises(ConfigError, match="key_tokens.temporal.draws is 2, but the 'reverse'"):
        KeyTokenConfig(temporal=SignalConfig(draws=2), temporal_perturbation="reverse")
    with pytest.raises(ConfigError, match="key_tokens.entropy.draws is 2, but it has no perturbation"):
        KeyTokenConfig(entropy=SignalConfig(draws=2))
    with pytest.raises(ConfigError, match="key_tokens.temporal.draws"):
        KeyTokenConfig(temporal=SignalConfig(draws=0))


@torch.no_grad()
@pytest.mark.slow
def test_temporal_shuffle_changes_video_scores_and_zero_on_images(tiny_policy) -> None:
    torch.manual_seed(1)
    batch, rollout = rollout_for(tiny_policy, n_prompts=2, image_every=2)  # prompt 0 video, prompt 1 image
    view, feats, logps, _ = _base(tiny_policy, batch, rollout)
    s = temporal_scores(tiny_policy.model, tiny_policy.processor, batch, view, feats, rollout.completion_ids,
                        rollout.completion_mask, logps, perturbation="reverse")
    video_rows = batch.is_video[rollout.prompt_index]
    assert s[video_rows].abs().max() > 1e-5
    assert (s[~video_rows] == 0).all()


def test_segment_permutation_keeps_segments() -> None:
    perm = segment_permutation(10, torch.Generator().manual_seed(0), segment=4)
    assert sorted(perm.tolist()) == list(range(10))
    runs, cur = [], [perm[0].item()]
    for v in perm[1:].tolist():  # split into maximal runs of consecutive frames
        if v == cur[-1] + 1 and v % 4 != 0:
            cur.append(v)
        else:
            runs.append(cur)
            cur = [v]
    runs.append(cur)
    assert sorted(runs) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


class _Counter:
    def __init__(self, module):
        self.calls, self.shapes = 0, []
        module.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, out):
        self.calls += 1
        x = kwargs.get("inputs_embeds")
        self.shapes.append(tuple(x.shape[:2]) if x is not None else None)


@torch.no_grad()
@pytest.mark.parametrize("group_size", [2, 4])
@pytest.mark.slow
def test_vision_tower_runs_once_per_media_and_perturbation(tiny_policy, group_size) -> None:
    model = tiny_policy.model
    batch, rollout = rollout_for(tiny_policy, n_prompts=2, group_size=group_size)
    visual = _Counter(model.model.visual)
    trunk = _Counter(model.model.language_model)
    view, feats, logps, ent = _base(tiny_policy, batch, rollout)
    attribute(model, tiny_policy.processor, batch, rollout, PolicyPass(view, feats, logps, ent), KeyTokenConfig())
    # policy pass encodes 2 videos in 1 call; the temporal probe re-encodes them in 1 call; visual probe: none
    assert visual.calls == 2
    assert trunk.calls == 3  # policy, visual probe, temporal probe: one batched pass each
    # each pass runs the decoder on B = 2 rows, each prompt once followed by its G completions (ktr.model.prefix)
    t = rollout.completion_ids.shape[1]
    assert trunk.shapes == [(2, rollout.prompt_length + group_size * t)] * 3


@torch.no_grad()
@pytest.mark.slow
def test_same_forward_calls_for_any_media_mix(tiny_policy) -> None:
    counts = []
    for image_every in (0, 1, 2):  # all videos, all images, mixed
        batch, rollout = rollout_for(tiny_policy, n_prompts=2, image_every=image_every)
        visual = _Counter(tiny_policy.model.model.visual)
        trunk = _Counter(tiny_policy.model.model.language_model)
        view, feats, logps, ent = _base(tiny_policy, batch, rollout)
        attribute(tiny_policy.model, tiny_policy.processor, batch, rollout, PolicyPass(view, feats, logps, ent),
                  KeyTokenConfig())
        counts.append((visual.calls, trunk.calls))
    assert len(set(counts)) == 1, counts


@torch.no_grad()
@pytest.mark.slow
def test_random_control_keeps_ktr_count_per_group(tiny_policy) -> None:
    batch, rollout = rollout_for(tiny_policy, n_prompts=2, group_size=2, max_new_tokens=8)
    view, feats, logps, ent = _base(tiny_policy, batch, rollout)
    args = (tiny_policy.model, tiny_policy.processor, batch, rollout, PolicyPass(view, feats, logps, ent))
    torch.manual_seed(0)
    ktr = attribute(*args, KeyTokenConfig())
    torch.manual_seed(0)  # same temporal shuffle, so the same KTR mask is matched
    rand = attribute(*args, KeyTokenConfig(random=True))
    valid = rollout.completion_mask
    assert rand.mask.view(2, -1).sum(-1).tolist() == ktr.mask.view(2, -1).sum(-1).tolist()
    assert not (rand.mask & ~valid).any()
    assert not torch.equal(rand.mask, ktr.mask)
    with pytest.raises(ValueError, match="key_tokens.random"):
        KeyTokenConfig(enabled=False, random=True)


def test_patch_shuffle_moves_whole_temporal_patches_and_never_keeps_the_order() -> None:
    from ktr.probes.temporal import get_temporal_perturbation

    perm = get_temporal_perturbation("patch_shuffle")
    seen = set()
    for seed in range(40):
        p = perm(7, torch.Generator().manual_seed(seed))  # 4 patches, the last one a single frame
        assert sorted(p.tolist()) == list(range(7)) and p.tolist() != list(range(7))
        starts = [i for i in range(7) if p[i] % 2 == 0]  # every patch starts on an even frame ...
        assert all(i + 1 < 7 and p[i + 1] == p[i] + 1 for i in starts if p[i] != 6)  # ... and keeps its pair
        seen.add(tuple(p.tolist()))
        assert torch.equal(p, perm(7, torch.Generator().manual_seed(seed)))  # reproducible under a seed
    assert len(seen) > 5
    assert perm(2, None).tolist() == [0, 1]  # one patch: nothing to reorder
