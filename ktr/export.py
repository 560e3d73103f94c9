"""Export a trained policy to a Hugging Face model directory (layer L4: reads configs and Lightning checkpoints).

    python -m ktr.export --config configs/qwen7b.yaml --ckpt runs/.../last.ckpt --out exported/ [--adapter-only]
        [--dtype bfloat16]

The result loads with its family's class, e.g. `Qwen2_5_VLForConditionalGeneration.from_pretrained(out)` (or, with
`--adapter-only`, `PeftModel.from_pretrained(base, out)`) and with ktr itself (`policy.name_or_path: out`, or
`policy.adapter_path: out`). Loaded by plain transformers 5.3 or later, a Qwen2(.5)-VL places the text after a
video by transformers' rule, not the reference rule ktr trained with (`ktr.model.rope`; vLLM and transformers 4.x
follow the reference): `ktr.model.rope.use_reference_positions(model.model)` restores it. It holds the tokenizer
with its chat template and the vision processor settings
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
`ModelParallelStrategy` writes (only its weights are read, not the optimizer state), read into the rebuilt policy's
own tensors (`ktr.model.trained.trained_policy`: memory in docs/export.md).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from ktr.model.checkpoint import CheckpointError
from ktr.model.saving import export_policy
from ktr.model.trained import read_configs, settings_from_config, trained_policy


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export(configs: Sequence[str | Path], ckpt: str | Path, out: str | Path, adapter_only: bool = False,
           dtype: str | None = None) -> Path:
    """Config(s) + checkpoint -> Hugging Face directory. See the module docstring."""
    cfg, video, image = settings_from_config(read_configs(configs))
    policy = trained_policy(cfg, ckpt)
    return export_policy(policy, out, adapter_only=adapter_only, video=video, image=image,
                         dtype=DTYPES[dtype] if dtype is not None else None)


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m ktr.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", required=True,
                        help="the `ktr fit` config(s) of the run, in the same order (repeatable)")
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint file or ModelParallelStrategy directory")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--adapter-only", action="store_true", help="write the LoRA adapter alone, not merged")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="cast the weights written (after merging); default: `policy.dtype` as trained. "
                             "configs/qwen7b.yaml trains fp32 master weights: `--dtype bfloat16` writes the 16-bit "
                             "weights the released checkpoints hold, half the size")
    args = parser.parse_args(argv)
    try:
        out = export(args.config, args.ckpt, args.out, adapter_only=args.adapter_only, dtype=args.dtype)
    except CheckpointError as err:  # names the file and what is wrong: no traceback needed
        parser.error(str(err))
    print(f"exported to {out}")
    return out


if __name__ == "__main__":
    main()
