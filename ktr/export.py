"""Export a trained policy to a Hugging Face model directory (layer L4: reads configs and Lightning checkpoints).

    python -m ktr.export --config configs/qwen7b.yaml --ckpt runs/.../last.ckpt --out exported/ [--adapter-only]

The result loads with its family's class, e.g. `Qwen2_5_VLForConditionalGeneration.from_pretrained(out)` (or, with
`--adapter-only`, `PeftModel.from_pretrained(base, out)`) and with ktr itself (`policy.name_or_path: out`, or
`policy.adapter_path: out`). It holds the tokenizer with its chat template and the vision processor settings
(`preprocessor_config.json` for images, `video_preprocessor_config.json` for videos: patch and merge sizes,
normalisation, pixel bounds; the frame sampling settings too).

What is written:
- full fine-tuning: the model;
- LoRA: the base with the adapters merged (default), or the adapter alone;
- QLoRA: the base is re-loaded in `policy.dtype` without quantisation and the trained adapters merged into it
  (merging into 4-bit weights would re-quantise them), or the adapter alone.

The policy is rebuilt from the config (`model.init_args.policy`, overlays merged in order like `ktr fit`) and
the checkpoint's weights loaded into it; the LightningModule and the Trainer are never built, so a config for
8 GPUs exports on a laptop. A checkpoint is a Lightning `.ckpt` file or the directory that
`ModelParallelStrategy` writes (only its weights are read, not the optimizer state).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from ktr.checkpoints import CheckpointError, check_checkpoint, read_checkpoint
from ktr.data.video import ImageSettings, VideoSettings
from ktr.policy import Policy, PolicyConfig, core, family_of, load_policy


def read_configs(paths: Sequence[str | Path]) -> dict[str, Any]:
    """The YAML configs merged in order (later files override keys of earlier ones, recursively)."""
    import yaml

    merged: dict[str, Any] = {}
    for p in paths:
        data = yaml.safe_load(Path(p).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{p}: a config must be a mapping, got {type(data).__name__}")
        _merge(merged, data)
    return merged


def _merge(into: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def _typed(cls, value: dict | None, where: str):
    """`value` parsed as dataclass `cls` with the CLI's type checks (jsonargparse), defaults when absent."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--x", type=cls)
    try:
        return parser.instantiate_classes(parser.parse_object({"x": value or {}})).x
    except Exception as err:  # jsonargparse raises its own error types; name the config key
        raise ValueError(f"config key {where}: {err}") from err


def settings_from_config(config: dict) -> tuple[PolicyConfig, VideoSettings, ImageSettings]:
    """The policy and the media settings named by a merged `ktr fit` config."""
    model = (config.get("model") or {}).get("init_args") or {}
    data = (config.get("data") or {}).get("init_args") or {}
    return (_typed(PolicyConfig, model.get("policy"), "model.init_args.policy"),
            _typed(VideoSettings, data.get("video"), "data.init_args.video"),
            _typed(ImageSettings, data.get("image"), "data.init_args.image"))


def checkpoint_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The LightningModule `state_dict` of a `.ckpt` file or of a `ModelParallelStrategy` checkpoint directory."""
    path = Path(path)
    if not path.is_dir():
        return read_checkpoint(path, key="--ckpt")["state_dict"]  # names the file and what is wrong with it
    check_checkpoint(path, key="--ckpt")
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    state = _load_state_dict_from_keys({"state_dict"}, checkpoint_id=str(path))
    if "state_dict" not in state:
        raise CheckpointError(f"--ckpt {str(path)!r}: not a Lightning checkpoint (no 'state_dict' key)")
    return state["state_dict"]


def load_trained_policy(cfg: PolicyConfig, weights: dict[str, torch.Tensor]) -> Policy:
    """Rebuild the policy in full precision and load the trained weights (`model.` keys of the module)."""
    trained_4bit = cfg.quantization != "none"
    policy = load_policy(replace(cfg, quantization="none", gradient_checkpointing=False))
    state = {k[len("model."):]: v for k, v in weights.items() if k.startswith("model.")}
    if not state:
        raise ValueError("the checkpoint holds no `model.*` weights: was it written by a ktr module?")
    if trained_4bit:  # only the adapters trained; the 4-bit base is replaced by the full-precision one
        state = {k: v for k, v in state.items() if "lora_" in k}
        missing = {k for k, _ in policy.model.named_parameters() if "lora_" in k} - set(state)
        if not state or missing:
            raise ValueError(f"QLoRA checkpoint lacks adapter weights (e.g. {sorted(missing)[:3]})")
        policy.model.load_state_dict(state, strict=False)
    else:
        policy.model.load_state_dict(state, strict=True)
    return policy


def export_policy(policy: Policy, out: str | Path, adapter_only: bool = False, video: VideoSettings | None = None,
                  image: ImageSettings | None = None) -> Path:
    """Write `policy` (LoRA merged in place unless `adapter_only`) and its processor settings to `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = policy.model.eval()
    is_peft = hasattr(model, "peft_config")
    if adapter_only:
        if not is_peft:
            raise ValueError("--adapter-only needs a LoRA policy (policy.lora or policy.adapter_path)")
        model.save_pretrained(out)
    else:
        base = model.merge_and_unload() if is_peft else core(model)
        base.save_pretrained(out)
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


def export(configs: Sequence[str | Path], ckpt: str | Path, out: str | Path, adapter_only: bool = False) -> Path:
    """Config(s) + checkpoint -> Hugging Face directory. See the module docstring."""
    cfg, video, image = settings_from_config(read_configs(configs))
    policy = load_trained_policy(cfg, checkpoint_weights(ckpt))
    return export_policy(policy, out, adapter_only=adapter_only, video=video, image=image)


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m ktr.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", required=True,
                        help="the `ktr fit` config(s) of the run, in the same order (repeatable)")
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint file or ModelParallelStrategy directory")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--adapter-only", action="store_true", help="write the LoRA adapter alone, not merged")
    args = parser.parse_args(argv)
    try:
        out = export(args.config, args.ckpt, args.out, adapter_only=args.adapter_only)
    except CheckpointError as err:  # names the file and what is wrong: no traceback needed
        parser.error(str(err))
    print(f"exported to {out}")
    return out


if __name__ == "__main__":
    main()
