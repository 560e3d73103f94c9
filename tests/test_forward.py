"""The shared forward path equals Hugging Face's Qwen2.5-VL forward; tokenizer and processor facts."""

import pytest
import torch

from ktr.config import TinyModelConfig
from ktr.model.families import family_of
from ktr.model.forward import SequenceView, completion_hidden, completion_logps, encode_media
from ktr.model.policy import tiny_config
from tests.helpers import rollout_for, tiny_qwen2_vl_config


def test_tokenizer_special_ids_and_template(tiny_policy) -> None:
    tok = tiny_policy.tokenizer
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 151643
    assert tok.convert_tokens_to_ids("<|im_end|>") == 151645
    assert tok.convert_tokens_to_ids("<|video_pad|>") == 151656
    text = tok.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Q"}]}],
                                   tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|video_pad|><|vision_end|>Q<|im_end|>\n<|im_start|>assistant\n")
    # known Qwen2 ids of the default system prompt
    assert tok("You are a helpful assistant.")["input_ids"] == [2610, 525, 264, 10950, 17847, 13]


def test_tiny_model_is_small_besides_embeddings(tiny_policy) -> None:
    model = tiny_policy.model
    emb = model.get_input_embeddings().weight.numel()
    rest = sum(p.numel() for p in model.parameters()) - emb
    assert rest * 4 < 5e6  # a few MB of weights besides the (tied) embedding
    assert tiny_config(TinyModelConfig()).text_config.vocab_size == 151936


def hf_logps(model, batch, rollout):
    """transformers' own forward on the N rows (each row given its prompt's media): `[N, T]` log-probs."""
    sizes = batch.grid_thw.prod(-1).tolist()
    chunks = torch.split(batch.pixel_values, sizes)
    rows = rollout.prompt_index.tolist()
    is_video = batch.is_video.tolist()
    vid, img = [r for r in rows if is_video[r]], [r for r in rows if not is_video[r]]
    kw = {}
    if vid:
        kw.update(pixel_values_videos=torch.cat([chunks[r] for r in vid]), video_grid_thw=batch.grid_thw[vid])
        if family_of(model).video_time_scaling:
            kw["second_per_grid_ts"] = batch.second_per_grid_ts[vid]
    if img:
        kw.update(pixel_values=torch.cat([chunks[r] for r in img]), image_grid_thw=batch.grid_thw[img])
    out = model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                mm_token_type_ids=rollout.mm_token_type_ids, **kw)
    logits = out.logits[:, -rollout.completion_ids.shape[1] - 1:-1]
    return logits.log_softmax(-1).gather(-1, rollout.completion_ids.unsqueeze(-1)).squeeze(-1)


def ktr_logps(model, batch, rollout, chunk_size=7):
    view = SequenceView.of(model, rollout, batch)
    hidden = completion_hidden(model, view, encode_media(model, batch.pixel_values, batch.grid_thw),
                               rollout.completion_ids.shape[1])
    return completion_logps(model, hidden, rollout.completion_ids, rollout.completion_mask, chunk_size=chunk_size)[0]


@torch.no_grad()
@pytest.mark.slow
def test_forward_equals_huggingface(tiny_any) -> None:
    """Left padding, two different videos and an image in one pass, G = 2 rows each."""
    model = tiny_any.model
    batch, rollout = rollout_for(tiny_any, n_prompts=3, group_size=2, image_every=3)
    assert batch.is_video.tolist() == [True, True, False]
    assert not torch.equal(batch.media[0].frames, batch.media[1].frames)
    assert batch.attention_mask.sum(-1).unique().numel() > 1  # prompts of different lengths: left padding
    valid = rollout.completion_mask
    torch.testing.assert_close(ktr_logps(model, batch, rollout)[valid], hf_logps(model, batch, rollout)[valid],
                               rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_positions_are_3d(tiny_policy) -> None:
    batch, rollout = rollout_for(tiny_policy, n_prompts=1, group_size=1)
    view = SequenceView.of(tiny_policy.model, rollout, batch)
    vid = rollout.mm_token_type_ids[0] == 2
    pos = view.position_ids[:, 0, vid]  # [3, n_video_tokens]
    assert not torch.equal(pos[1], pos[2])  # height and width differ: real 3D rotary positions


def test_video_placeholders_for_real_clip(tiny_policy, fixtures_dir) -> None:
    from ktr.data.base import decode_video_file
    from ktr.data.video import VideoSettings

    media = decode_video_file(str(fixtures_dir / "video1.mp4"), VideoSettings())
    sample = tiny_policy.processor.encode([{"role": "user", "content": [{"type": "video"}, {"type": "text",
                                                                        "text": "What happens?"}]}], media)
    # 16 frames of 224x420 (smart_resize of 360x640 at 128*28*28): grid (8, 16, 30) -> 8*16*30/4 tokens
    assert sample.grid_thw.tolist() == [8, 16, 30]
    assert int((sample.prompt_ids == 151656).sum()) == 960
    assert sample.pixel_values.shape == (8 * 16 * 30, 3 * 2 * 14 * 14)


@torch.no_grad()
@pytest.mark.slow
def test_qwen2_vl_checkpoint_directory_loads_and_matches_hf(tiny_policy, tmp_path) -> None:
    """A Qwen2-VL (not 2.5) checkpoint directory goes through the same code after construction."""
    from transformers import Qwen2VLForConditionalGeneration

    from ktr.config import PolicyConfig
    from ktr.model.policy import load_policy

    cfg = tiny_qwen2_vl_config()
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(cfg).save_pretrained(tmp_path)
    tiny_policy.tokenizer.save_pretrained(tmp_path)
    policy = load_policy(PolicyConfig(name_or_path=str(tmp_path), attn_implementation="eager"))
    assert type(policy.model).__name__ == "Qwen2VLForConditionalGeneration"
    batch, rollout = rollout_for(policy, n_prompts=2, group_size=2)
    view = SequenceView.of(policy.model, rollout, batch)
    hidden = completion_hidden(policy.model, view, encode_media(policy.model, batch.pixel_values, batch.grid_thw),
                               rollout.completion_ids.shape[1])
    mine, _ = completion_logps(policy.model, hidden, rollout.completion_ids, rollout.completion_mask)
    sizes = batch.grid_thw.prod(-1).tolist()
    chunks = torch.split(batch.pixel_values, sizes)
    rows = rollout.prompt_index.tolist()
    out = policy.model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                       pixel_values_videos=torch.cat([chunks[p] for p in rows]), video_grid_thw=batch.grid_thw[rows],
                       mm_token_type_ids=rollout.mm_token_type_ids)
    ref = out.logits[:, -rollout.completion_ids.shape[1] - 1:-1].log_softmax(-1)
    ref = ref.gather(-1, rollout.completion_ids.unsqueeze(-1)).squeeze(-1)
    valid = rollout.completion_mask
    torch.testing.assert_close(mine[valid], ref[valid], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_head_logits_setting_on_a_bf16_model(tiny_policy) -> None:
    """`policy.head_logits` on a bf16 policy: `float32` (the default, carried by a copy such as the reference) gives
    the log-probs of the exact float32 product of the bf16 hidden states and head; `compute` those of the logits
    rounded to bf16 first, as transformers' `lm_head` gives them; the two differ by far more than float32 noise."""
    import copy

    from ktr.model.forward import float32_logits, output_projection, set_head_logits

    model = copy.deepcopy(tiny_policy.model).to(torch.bfloat16)
    output_projection(model).weight.mul_(40.0)  # logits of a trained model's size, where bf16 rounding shows
    assert float32_logits(model)
    batch, rollout = rollout_for(tiny_policy, n_prompts=2, group_size=2)
    ids, valid = rollout.completion_ids, rollout.completion_mask
    view = SequenceView.of(model, rollout, batch)
    hidden = completion_hidden(model, view, encode_media(model, batch.pixel_values, batch.grid_thw), ids.shape[1])
    assert hidden.dtype == torch.bfloat16
    w = output_projection(model).weight

    def picked(logits):
        return logits.float().log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)[valid]

    exact, rounded = picked(hidden.float() @ w.float().T), picked(torch.nn.functional.linear(hidden, w))
    assert (exact - rounded).abs().max() > 1e-2
    for chunk in (7, None):
        torch.testing.assert_close(completion_logps(model, hidden, ids, valid, chunk)[0][valid], exact,
                                   rtol=0, atol=2e-5)
    set_head_logits(model, "compute")
    assert not float32_logits(model)
    for chunk in (7, None):
        torch.testing.assert_close(completion_logps(model, hidden, ids, valid, chunk)[0][valid], rounded,
                                   rtol=0, atol=2e-5)
    with pytest.raises(ValueError, match="head_logits"):
        set_head_logits(model, "bf16")
