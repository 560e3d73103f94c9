"""Writing a policy as a Hugging Face model directory: weights (LoRA merged or alone), tokenizer, processor files.

The one definition of ktr's Hugging Face processor files: `ktr export` writes them next to the weights and the
vLLM rollout engine's model folder uses them too.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from ktr.data.video import ImageSettings, VideoSettings
from ktr.model.families import core, family_of
from ktr.model.policy import Policy


def export_policy(policy: Policy, out: str | Path, adapter_only: bool = False, video: VideoSettings | None = None,
                  image: ImageSettings | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write `policy` (LoRA merged in place unless `adapter_only`) and its processor settings to `out`; `dtype`
    casts the weights written (after merging), e.g. fp32 master weights to the bf16 the released checkpoints hold."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = policy.model.eval()
    is_peft = hasattr(model, "peft_config")
    if adapter_only and not is_peft:
        raise ValueError("--adapter-only needs a LoRA policy (policy.lora or policy.adapter_path)")
    written = model if adapter_only else model.merge_and_unload() if is_peft else core(model)
    (written.to(dtype) if dtype is not None else written).save_pretrained(out)
    policy.tokenizer.save_pretrained(out)
    write_processor_config(policy, out, video or VideoSettings(), image or ImageSettings())
    return out


def write_processor_config(policy: Policy, out: Path, video: VideoSettings, image: ImageSettings) -> None:
    """Hugging Face image and video processor configs matching ktr's patching and pixel bounds."""
    p = policy.processor.patch
    family = family_of(policy.model)
    common = {"patch_size": p.patch_size, "temporal_patch_size": p.temporal_patch_size, "merge_size": p.merge_size,
              "image_mean": list(p.image_mean), "image_std": list(p.image_std), "do_resize": True,
              "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
              "processor_class": family.processor_class}
    img = dict(common, image_processor_type=family.image_processor_type, min_pixels=image.min_pixels,
               max_pixels=image.max_pixels, size={"shortest_edge": image.min_pixels, "longest_edge": image.max_pixels})
    vid = dict(common, video_processor_type=family.video_processor_type, min_pixels=video.min_pixels,
               max_pixels=video.max_pixels, size={"shortest_edge": video.min_pixels, "longest_edge": video.max_pixels},
               fps=video.fps, min_frames=video.min_frames, max_frames=video.max_frames)
    (out / "preprocessor_config.json").write_text(json.dumps(img, indent=2) + "\n")
    (out / "video_preprocessor_config.json").write_text(json.dumps(vid, indent=2) + "\n")
    (out / "ktr_export.json").write_text(json.dumps({"video": asdict(video), "image": asdict(image)}, indent=2) + "\n")
