"""Small builders shared by tests: synthetic prompts batched through the real processor."""

from pathlib import Path

import torch

from ktr.data.prompts import build_messages
from ktr.data.synthetic import SyntheticSpec, make_item
from ktr.data.video import VideoSettings, frames_from_array, resize_frames
from ktr.types import Media

SMALL_VIDEO = VideoSettings(fps=4.0, min_frames=4, max_frames=8, min_pixels=56 * 56, max_pixels=56 * 56)


def small_video(processor) -> VideoSettings:
    """SMALL_VIDEO for the processor's model: frames of 2x2 merge blocks (56x56 or 64x64)."""
    b = processor.patch.patch_size * processor.patch.merge_size  # 28 (Qwen2.5-VL) or 32 (Qwen3-VL)
    side = 2 * b
    return VideoSettings(fps=4.0, min_frames=4, max_frames=8, min_pixels=side * side, max_pixels=side * side, factor=b)


def synthetic_samples(processor, n: int, start: int = 0, image_every: int = 0):
    """n prompts of the synthetic task; every `image_every`-th one is an image (first frame) instead."""
    out = []
    settings = small_video(processor)
    side = 2 * settings.factor
    for i in range(start, start + n):
        row, frames = make_item(0, i, SyntheticSpec())
        if image_every and i % image_every == image_every - 1:
            row = dict(row, data_type="image")
            image = frames[:1].clone() if frames.shape[-1] == side else resize_frames(frames[:1], side, side)
            media = Media("image", image, None)
        else:
            clip = frames_from_array(frames, 4.0, settings)
            media = Media("video", clip.frames, clip.sample_fps, frame_times=clip.frame_times)
        out.append(processor.encode(build_messages(row), media, row=row))
    return out


def rollout_for(policy, n_prompts=2, group_size=2, max_new_tokens=6, image_every=0, seed=0):
    from ktr.config import SamplingConfig
    from ktr.rollout.hf import generate

    torch.manual_seed(seed)
    batch = policy.processor.collate(synthetic_samples(policy.processor, n_prompts, image_every=image_every))
    cfg = SamplingConfig(group_size=group_size, max_new_tokens=max_new_tokens, top_p=1.0)
    return batch, generate(policy.model, policy.processor, batch, cfg)


def length_reward(completion: str, solution: str, problem_type: str) -> float:
    """A reward that varies across completions of a random model (tests need non-zero advantages)."""
    return min(1.0, len(completion) / 40.0)


def module_grads(module, batch, rollout, loss_cfg, advantages):
    """One KTRModule scoring pass and backward without a Trainer, on a fixed non-trivial key-token mask (every
    other token dropped): the loss, the step's scores and every parameter's gradient."""
    module.loss_cfg = loss_cfg
    module.manual_backward = lambda loss: loss.backward()  # no Trainer here
    module._reference_ready()
    module.model.zero_grad(set_to_none=True)
    scores = module.score(batch, rollout)
    mask = rollout.completion_mask.clone()
    mask[:, ::2] = False
    loss = module.update(rollout, scores, mask, advantages)
    return loss, scores, {k: p.grad.clone() for k, p in module.model.named_parameters() if p.grad is not None}


def tiny_qwen2_vl_config():
    """A tiny random Qwen2-VL (not 2.5) configuration with the Qwen vocabulary and special-token ids."""
    from transformers import Qwen2VLConfig

    return Qwen2VLConfig(
        text_config=dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=151645,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 2, 2]}),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a test's process group)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def file_rendezvous(tmp_path: Path) -> str:
    """`init_method` for a 2-process test's process group: a FileStore in `tmp_path`, as PyTorch's own
    multi-process tests use. Unlike `env://` with a `free_port()`, there is no port for another process to take
    first, and rank 0 runs no TCPStore server thread: a joinable C++ thread destroyed at exit aborts the process
    with "terminate called without an active exception", which the FSDP2 head worker did once at the start of a
    local suite (2026-12-07; not reproduced in 30 runs under load, so a likely cause removed, not a proven one)."""
    return f"file://{tmp_path / 'store'}"


def metric_recorder():
    """A Lightning logger that records which metric names each logged step carried: `rows` of (step, names)."""
    from lightning.pytorch.loggers.logger import DummyLogger

    class MetricRecorder(DummyLogger):
        def __init__(self) -> None:
            super().__init__()
            self.rows: list[tuple[int, set[str]]] = []

        def log_metrics(self, metrics, step=None) -> None:
            self.rows.append((step, set(metrics)))

    return MetricRecorder()
