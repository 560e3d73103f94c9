"""Qwen3-VL: tokenizer ids, the timestamped prompt layout and patches against transformers' own Qwen3-VL code,
deepstack through the one forward path, probes' Qwen3-VL choices, unsupported checkpoints."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ktr.data.processor import VideoLayout, VisionLanguageProcessor, patch_times
from ktr.model.families import FAMILIES, family_of, get_family
from ktr.model.forward import SequenceView, completion_hidden, completion_logps, encode_media
from ktr.types import Media
from tests.helpers import rollout_for

pil_qwen = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")


def test_qwen3_tokenizer_ids_and_template(tiny_qwen3vl) -> None:
    tok = tiny_qwen3vl.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>", "<|vision_start|>",
                                                       "<|image_pad|>", "<|video_pad|>", "<tool_response>",
                                                       "</tool_response>", "<think>", "</think>")}
    assert ids == {"<|endoftext|>": 151643, "<|im_end|>": 151645, "<|vision_start|>": 151652, "<|image_pad|>": 151655,
                   "<|video_pad|>": 151656, "<tool_response>": 151665, "</tool_response>": 151666,
                   "<think>": 151667, "</think>": 151668}
    # <think> is one token and survives skip_special_tokens (the format reward reads it)
    enc = tok("<think>a</think>", add_special_tokens=False)["input_ids"]
    assert enc[0] == 151667 and enc[-1] == 151668
    assert tok.decode(enc, skip_special_tokens=True) == "<think>a</think>"
    text = tok.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Q"}]}],
                                   tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>Q<|im_end|>\n"
                    "<|im_start|>assistant\n")  # no default system prompt in Qwen3-VL
    assert tok("You are a helpful assistant.")["input_ids"] == [2610, 525, 264, 10950, 17847, 13]


def test_tiny_qwen3vl_is_the_real_architecture(tiny_qwen3vl) -> None:
    model = tiny_qwen3vl.model
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration" and family_of(model) is FAMILIES["qwen3_vl"]
    vc, tc = model.config.vision_config, model.config.text_config
    assert (vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size) == (16, 2, 2)
    assert list(vc.deepstack_visual_indexes) == [0, 1] and tc.rope_parameters["mrope_interleaved"]
    assert tiny_qwen3vl.processor.patch.patch_size == 16 and tiny_qwen3vl.processor.layout.timestamps


def _rand(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@pytest.mark.parametrize(("height", "width"), [(64, 96), (128, 64)])
def test_patches_equal_transformers_qwen3vl_image_processor(tiny_qwen3vl, height, width) -> None:
    # Qwen3-VL's image processor is Qwen2VLImageProcessor with patch 16 and mean = std = 0.5 (its
    # preprocessor_config); the PIL backend, bounds wide enough that no resize happens
    hf = pil_qwen.Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3,
                                           image_std=[0.5] * 3, min_pixels=32 * 32, max_pixels=16 * 16 * 4096)
    image = _rand(1, height, width, seed=height + width)
    out = hf(images=[image[0].permute(1, 2, 0).numpy()], return_tensors="pt")
    ours, grid = tiny_qwen3vl.processor.patchify(Media("image", image, None))
    assert torch.equal(ours, out["pixel_values"]) and torch.equal(grid, out["image_grid_thw"][0])
    assert grid.tolist() == [1, height // 16, width // 16]


# The test video: five frames at indices 0, 7, 15, 22, 30 of a 29.97 fps source, 64x96 -> grid (3, 4, 6): three
# temporal patches (the last repeats frame 30) at 0.1, 0.6 and 1.0 s, six placeholders each.
_INDICES, _FPS = [0, 7, 15, 22, 30], 29.97
_MESSAGES = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
# Their ids, written out (the Qwen3 tokenizer; the special ids are pinned by test_qwen3_tokenizer_ids_and_template)
_START, _END, _VIDEO = 151652, 151653, 151656
_STAMPS = ([27, 15, 13, 16, 6486, 29], [27, 15, 13, 21, 6486, 29], [27, 16, 13, 15, 6486, 29])  # <0.1 seconds> ...
_USER, _QUESTION, _ASSISTANT = [151644, 872, 198], [3838, 8573, 30], [151645, 198, 151644, 77091, 198]
_BLOCKS = [i for stamp in _STAMPS for i in [*stamp, _START, *[_VIDEO] * 6, _END]]
_LAYOUTS = {"replace": _BLOCKS, "keep": [_START, *_BLOCKS, _END]}  # the two layouts, as VideoLayout documents them


def _video_sample(tokenizer, p, wrapper: str):
    proc = VisionLanguageProcessor(tokenizer, p.image_token_id, p.video_token_id, p.patch,
                                   VideoLayout(timestamps=True, wrapper=wrapper))
    media = Media("video", _rand(5, 64, 96, seed=1), 5 / 31 * _FPS, frame_times=tuple(i / _FPS for i in _INDICES))
    return proc.encode(_MESSAGES, media)


@pytest.mark.parametrize("wrapper", ["keep", "replace"])
def test_video_prompt_layout_by_hand(tiny_qwen3vl, wrapper) -> None:
    """ktr's two timestamped layouts, token for token, independent of the installed transformers: `replace`
    (the released models' format) has one start/end pair per temporal patch, `keep` one more around them."""
    p = tiny_qwen3vl.processor
    sample = _video_sample(p.tokenizer, p, wrapper)
    video = _LAYOUTS[wrapper]
    assert sample.prompt_ids.tolist() == _USER + video + _QUESTION + _ASSISTANT
    assert sample.grid_thw.tolist() == [3, 4, 6] and int((sample.prompt_ids == _START).sum()) == 3 + (wrapper == "keep")
    # the media block runs from the outer start (keep) or the first timestamp (replace) to the last end
    assert sample.media_block.nonzero().flatten().tolist() == list(range(len(_USER), len(_USER) + len(video)))


class _BareVideoTemplate:
    """The tokenizer, with its chat template rendering a video as a bare `<|video_pad|>` (no start/end pair)."""

    def __init__(self, tok) -> None:
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __call__(self, *args, **kwargs):
        return self._tok(*args, **kwargs)

    def apply_chat_template(self, *args, **kwargs):
        text = self._tok.apply_chat_template(*args, **kwargs)
        return text.replace("<|vision_start|><|video_pad|><|vision_end|>", "<|video_pad|>")


@pytest.mark.parametrize("wrapper", ["keep", "replace"])
def test_video_prompt_from_a_bare_placeholder(tiny_qwen3vl, wrapper) -> None:
    """Without the template's wrapper both layouts put the per-patch blocks in the placeholder's place (as
    transformers' processor does), never a single frame's worth of placeholders."""
    p = tiny_qwen3vl.processor
    sample = _video_sample(_BareVideoTemplate(p.tokenizer), p, wrapper)
    assert sample.prompt_ids.tolist() == _USER + _BLOCKS + _QUESTION + _ASSISTANT
    assert sample.media_block.nonzero().flatten().tolist() == list(range(len(_USER), len(_USER) + len(_BLOCKS)))


# Which of ktr's layouts the installed transformers' `Qwen3VLProcessor` builds (read from each release's
# processing_qwen3_vl.py): 4.57 and 5.0-5.9 replaced the template's whole `<|vision_start|><|video_pad|><|vision_end|>`;
# 5.10-5.24 (`replace_video_token` + the generic `get_text_with_replacements`) replaced only `<|video_pad|>`, keeping
# the outer pair; 5.25 collapses the wrapper again before replacing. Versions after 5.25 are assumed to keep 5.25's
# layout, so a further change fails here.
_PROCESSOR_DIFFERS = {
    "keep": "it keeps the template's outer <|vision_start|>/<|vision_end|> around the per-patch blocks (5.10-5.24)",
    "replace": "it drops the template's outer <|vision_start|>/<|vision_end|>: the per-patch blocks replace the whole "
               "wrapper (4.57, 5.0-5.9, 5.25+)",
}


def _processor_layout(version: str) -> str | None:
    from packaging.version import Version

    v = Version(version)
    if v < Version("5.10"):
        return None
    return "keep" if v < Version("5.25") else "replace"


def _hf_video_prompt(tok, text: str, grid: torch.Tensor) -> str:
    """The prompt text transformers' installed `Qwen3VLProcessor` builds for the test video: its own
    `replace_video_token` and `get_text_with_replacements` (the video processor needs torchvision, so only the
    two attributes those read are provided)."""
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.video_utils import VideoMetadata

    proc = Qwen3VLProcessor.__new__(Qwen3VLProcessor)
    proc.tokenizer = tok
    proc.image_token, proc.video_token = "<|image_pad|>", "<|video_pad|>"
    proc.vision_start_token, proc.vision_end_token = "<|vision_start|>", "<|vision_end|>"
    proc.video_processor = SimpleNamespace(merge_size=2, temporal_patch_size=2)
    meta = VideoMetadata(total_num_frames=max(_INDICES) + 1, fps=_FPS, frames_indices=list(_INDICES))
    repl = proc.replace_video_token({"video_grid_thw": grid.unsqueeze(0), "video_metadata": [meta]}, 0)
    return proc.get_text_with_replacements([text], videos_replacements=[repl])[0][0]


@pytest.mark.parametrize("wrapper", ["keep", "replace"])
def test_video_prompt_equals_qwen3vl_processor(tiny_qwen3vl, wrapper) -> None:
    """The layout the installed transformers builds equals ktr's layout of the same name, token for token (the
    timestamps, their float formatting and the block sizes included); the other layout is skipped, naming how
    this transformers differs from it."""
    import transformers

    built = _processor_layout(transformers.__version__)
    if built is None:
        pytest.skip(f"transformers {transformers.__version__} has no Qwen3VLProcessor.replace_video_token")
    if wrapper != built:
        pytest.skip(f"transformers {transformers.__version__}'s Qwen3VLProcessor builds the `{built}` layout, not "
                    f"`{wrapper}`: {_PROCESSOR_DIFFERS[built]} (test_video_prompt_layout_by_hand checks `{wrapper}`)")
    p = tiny_qwen3vl.processor
    sample = _video_sample(p.tokenizer, p, wrapper)
    text = p.tokenizer.apply_chat_template(_MESSAGES, tokenize=False, add_generation_prompt=True)
    hf_text = _hf_video_prompt(p.tokenizer, text, sample.grid_thw)
    assert "<0.1 seconds>" in hf_text and "<0.6 seconds>" in hf_text and "<1.0 seconds>" in hf_text
    assert sample.prompt_ids.tolist() == p.tokenizer(hf_text, add_special_tokens=False)["input_ids"]
    assert sample.prompt_ids.tolist() == _USER + _LAYOUTS[wrapper] + _QUESTION + _ASSISTANT


def test_patch_times_formula() -> None:
    assert patch_times([0.0, 1.0, 2.0, 3.0], 2) == [0.5, 2.5]
    assert patch_times([0.0, 1.0, 2.0], 2) == [0.5, 2.0]  # last frame repeated


def _base(policy, batch, rollout):
    model = policy.model
    view = SequenceView.of(model, rollout, batch)
    feats = encode_media(model, batch.pixel_values, batch.grid_thw)
    hidden = completion_hidden(model, view, feats, rollout.completion_ids.shape[1])
    return view, feats, completion_logps(model, hidden, rollout.completion_ids, rollout.completion_mask)[0]


@torch.no_grad()
def test_deepstack_features_reach_the_decoder(tiny_qwen3vl) -> None:
    """Dropping (or zeroing) the deepstack features changes the log-probs: the parity with transformers'
    forward is not reached without them, so `decoder_kwargs` really carries them."""
    batch, rollout = rollout_for(tiny_qwen3vl, n_prompts=2, group_size=2)
    view, feats, logps = _base(tiny_qwen3vl, batch, rollout)
    assert len(feats.deepstack) == 2 and all(len(d) == 2 for d in feats.deepstack)
    assert feats.deepstack[0][0].shape == feats.per_prompt[0].shape
    no_deep = type(feats)(feats.per_prompt, [[torch.zeros_like(t) for t in d] for d in feats.deepstack])
    hidden = completion_hidden(tiny_qwen3vl.model, view, no_deep, rollout.completion_ids.shape[1])
    other = completion_logps(tiny_qwen3vl.model, hidden, rollout.completion_ids, rollout.completion_mask)[0]
    valid = rollout.completion_mask
    assert (other[valid] - logps[valid]).abs().max() > 1e-4


def test_zero_embeddings_zeroes_deepstack_at_the_same_positions(tiny_qwen3vl) -> None:
    batch, rollout = rollout_for(tiny_qwen3vl, n_prompts=1, group_size=2)
    model = tiny_qwen3vl.model
    with torch.no_grad():
        feats = encode_media(model, batch.pixel_values, batch.grid_thw)
    types = rollout.mm_token_type_ids
    zero = (types > 0) & (torch.arange(types.shape[1]) % 2 == 0)  # every other position, vision ones only
    kw = family_of(model).decoder_kwargs(model, types, rollout.prompt_index, feats, zero_vision=zero)
    assert torch.equal(kw["visual_pos_masks"], types > 0)
    zeroed = zero[types > 0]  # [n_vision_tokens]
    for e in kw["deepstack_visual_embeds"]:
        assert e.shape[0] == int((types > 0).sum())
        assert (e[zeroed] == 0).all() and (e[~zeroed] != 0).any()


def test_visual_mask_keeps_timestamps_visible_and_block_hides_them(tiny_qwen3vl) -> None:
    from ktr.probes.visual import get_visual_perturbation

    batch, rollout = rollout_for(tiny_qwen3vl, n_prompts=1, group_size=1)
    model = tiny_qwen3vl.model
    view = SequenceView.of(model, rollout, batch)
    masked, _ = get_visual_perturbation("attention_mask")(view, model, batch, None)
    block, _ = get_visual_perturbation("attention_mask_block")(view, model, batch, None)
    tok = tiny_qwen3vl.tokenizer
    ids = view.input_ids[0]
    text_ids = tok("<0.1 seconds>", add_special_tokens=False)["input_ids"]
    first = next(i for i in range(len(ids)) if ids[i: i + len(text_ids)].tolist() == text_ids)
    ts = torch.arange(first, first + len(text_ids))
    assert (masked.attention_mask[0, ts] == 1).all()  # default: the timestamp text stays visible
    assert (masked.attention_mask[0][ids == 151656] == 0).all()
    assert (block.attention_mask[0, ts] == 0).all()
    assert (block.attention_mask[0][(ids == 151652) | (ids == 151653)] == 0).all()
    assert block.attention_mask[0].sum() < masked.attention_mask[0].sum()
    # the text after the media is re-indexed contiguously from the last visible position in both
    for v in (masked, block):
        keep = v.attention_mask[0].bool()
        pos = v.position_ids[0, 0][keep]
        assert torch.equal(pos, torch.arange(int(keep.sum())))


def test_temporal_shuffle_replaces_deepstack_with_the_reencoded_features(tiny_qwen3vl) -> None:
    from ktr.probes.temporal import perturbed_features

    batch, _ = rollout_for(tiny_qwen3vl, n_prompts=2, group_size=1, image_every=2)
    model = tiny_qwen3vl.model
    with torch.no_grad():
        feats = encode_media(model, batch.pixel_values, batch.grid_thw)
        gen = torch.Generator().manual_seed(3)
        out = perturbed_features(model, tiny_qwen3vl.processor, batch, feats, "reverse", gen)
        frames = batch.media[0].frames.flip(0)
        pixels, grid = tiny_qwen3vl.processor.patchify(Media("video", frames, batch.media[0].sample_fps))
        alone = encode_media(model, pixels, grid.unsqueeze(0))
    for a, b in zip(out.deepstack[0], alone.deepstack[0]):
        torch.testing.assert_close(a, b)
    assert not torch.equal(out.deepstack[0][0], feats.deepstack[0][0])
    assert out.deepstack[1] is feats.deepstack[1]  # the image keeps its features


def test_unsupported_checkpoint_names_model_type_and_supported(tmp_path) -> None:
    from transformers import Qwen2Config

    from ktr.config import PolicyConfig
    from ktr.model.policy import load_policy

    Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"model_type 'qwen2' is not supported; expected one of "
                                         r"\['qwen2_5_vl', 'qwen2_vl', 'qwen3_5', 'qwen3_vl'\]") as err:
        load_policy(PolicyConfig(name_or_path=str(tmp_path)))
    assert str(tmp_path) in str(err.value)
    with pytest.raises(ValueError, match="'tiny-llava' is not a tiny model"):
        from ktr.model.policy import tiny_config

        tiny_config(None, "tiny-llava")
    assert get_family("qwen3_vl").tiny_name == "tiny-qwen3vl"


@pytest.mark.slow
def test_micro_batches_equal_single_pass_on_qwen3vl() -> None:
    from ktr.config import PolicyConfig, SamplingConfig
    from ktr.model.policy import Policy
    from ktr.module import KTRModule
    from tests.test_module import _grads

    torch.set_num_threads(1)
    module = KTRModule(policy=PolicyConfig(name_or_path="tiny-qwen3vl", attn_implementation="eager"),
                       sampling=SamplingConfig(group_size=2, max_new_tokens=6, top_p=1.0))
    batch, rollout = rollout_for(Policy(module.model, module.processor), n_prompts=2, group_size=2)
    loss1, g1 = _grads(module, batch, rollout, None)
    loss2, g2 = _grads(module, batch, rollout, 1)
    torch.testing.assert_close(loss1, loss2, rtol=1e-5, atol=1e-6)
    assert g1.keys() == g2.keys() and any("deepstack_merger_list" in k for k in g1)  # deepstack trains too
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-4, atol=1e-6)


@torch.no_grad()
@pytest.mark.slow
def test_export_round_trip_on_qwen3vl(tiny_qwen3vl, tmp_path) -> None:
    """Export writes a Qwen3-VL directory (weights, tokenizer, Qwen3-VL processor configs) that transformers and
    ktr load back to the same log-probs."""
    import json

    from transformers import Qwen3VLForConditionalGeneration

    from ktr.config import PolicyConfig
    from ktr.model.policy import load_policy
    from ktr.model.saving import export_policy
    from tests.test_forward import ktr_logps

    batch, rollout = rollout_for(tiny_qwen3vl, n_prompts=2, group_size=1, image_every=2)
    want = ktr_logps(tiny_qwen3vl.model, batch, rollout)
    export_policy(tiny_qwen3vl, tmp_path)
    pre = json.loads((tmp_path / "preprocessor_config.json").read_text())
    vid = json.loads((tmp_path / "video_preprocessor_config.json").read_text())
    assert pre["patch_size"] == 16 and pre["image_mean"] == [0.5] * 3 and pre["processor_class"] == "Qwen3VLProcessor"
    assert vid["video_processor_type"] == "Qwen3VLVideoProcessor"
    hf = Qwen3VLForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager").eval()
    back = load_policy(PolicyConfig(name_or_path=str(tmp_path), attn_implementation="eager"))
    assert back.processor.patch == tiny_qwen3vl.processor.patch and back.processor.layout.timestamps
    assert back.tokenizer.convert_tokens_to_ids("<think>") == 151667
    valid = rollout.completion_mask
    for model in (hf, back.model):
        torch.testing.assert_close(ktr_logps(model, batch, rollout)[valid], want[valid], rtol=0, atol=1e-6)


def test_resize_factor_comes_from_the_policy_and_a_mismatch_fails_at_setup(tiny_qwen3vl) -> None:
    from ktr.data.base import SyntheticDataModule
    from ktr.data.video import ImageSettings, VideoSettings

    dm = SyntheticDataModule(train_size=2, val_size=1, video=VideoSettings(min_pixels=4096, max_pixels=4096))
    dm.processor = tiny_qwen3vl.processor
    dm.setup("fit")
    assert dm.video.factor == 32 and dm.image.factor == 32 and tiny_qwen3vl.processor.resize_factor == 32
    assert dm.load_media(dm.train_rows()[0]).frames.shape[-2:] == (64, 64)
    bad = SyntheticDataModule(train_size=2, val_size=1, image=ImageSettings(factor=28))
    bad.processor = tiny_qwen3vl.processor
    with pytest.raises(ValueError, match=r"data.init_args.image.factor=28, but this policy's patch_size\*merge_size "
                                         r"is 32"):
        bad.setup("fit")
