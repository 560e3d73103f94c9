"""A trained policy rebuilt from its run's configs and checkpoint, without the LightningModule or the Trainer.

`ktr export`, `ktr explain` and the vLLM engine's model folder read runs through these: the configs merged in
order like `ktr fit` merges them, each section checked by the CLI's own type checks, and the module's weights
read safely from a `.ckpt` file or a `ModelParallelStrategy` directory (`ktr.model.checkpoint`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ktr.config import PolicyConfig
from ktr.data.video import ImageSettings, VideoSettings
from ktr.model.checkpoint import CheckpointError, check_checkpoint, read_checkpoint
from ktr.model.policy import Policy, load_policy


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


def typed_section(cls, value: dict | None, where: str):
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
    return (typed_section(PolicyConfig, model.get("policy"), "model.init_args.policy"),
            typed_section(VideoSettings, data.get("video"), "data.init_args.video"),
            typed_section(ImageSettings, data.get("image"), "data.init_args.image"))


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
    policy = _rebuilt(cfg)
    state = {k[len("model."):]: v for k, v in weights.items() if k.startswith("model.")}
    if not state:
        raise ValueError("the checkpoint holds no `model.*` weights: was it written by a ktr module?")
    if cfg.lora is not None:  # only the adapters trained (a one-device LoRA checkpoint holds nothing else); the
        # base, 4-bit in training or not, is the full-precision one of `name_or_path`
        state = {k: v for k, v in state.items() if "lora_" in k}
        _check_adapters(policy, state.keys())
        policy.model.load_state_dict(state, strict=False)
    else:
        policy.model.load_state_dict(state, strict=True)
    return policy


def trained_policy(cfg: PolicyConfig, path: str | Path) -> Policy:
    """The policy of `cfg` with the weights of the checkpoint at `path` (a `.ckpt` file or a `ModelParallelStrategy`
    directory), without a second full copy of them in memory: a file's tensors are memory-mapped (page cache) and
    copied into the policy one by one; a directory is read straight into the policy's own tensors
    (`torch.distributed.checkpoint.load`, cast to their dtype), which holds about twice its largest tensor beside
    the policy. `checkpoint_weights` + `load_trained_policy` read a directory whole first, in its saved float32: for
    a 7B about 31 GiB more (docs/export.md)."""
    path = Path(path)
    if not path.is_dir():
        return load_trained_policy(cfg, read_checkpoint(path, key="--ckpt", mmap=True)["state_dict"])
    check_checkpoint(path, key="--ckpt")
    import torch.distributed.checkpoint as dcp

    saved = {k[len("state_dict.model."):] for k in dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
             if k.startswith("state_dict.model.")}
    if not saved:
        raise CheckpointError(f"--ckpt {str(path)!r}: the checkpoint holds no `model.*` weights under 'state_dict': "
                              "was it written by a ktr module?")
    policy = _rebuilt(cfg)
    own = policy.model.state_dict()  # tensors sharing the parameters' storage: loading into them loads the model
    if cfg.lora is not None:
        wanted = {k for k in own if "lora_" in k and k in saved}
        _check_adapters(policy, wanted)
    else:
        missing, unexpected = sorted(own.keys() - saved), sorted(saved - own.keys())
        if missing or unexpected:
            raise CheckpointError(f"--ckpt {str(path)!r}: its weights do not fit the policy of the config: "
                                  f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                                  f"(e.g. {unexpected[:3]})")
        wanted = set(own)
    dcp.load({"state_dict": {"model." + k: own[k] for k in sorted(wanted)}}, checkpoint_id=str(path), no_dist=True)
    return policy


def _rebuilt(cfg: PolicyConfig) -> Policy:
    return load_policy(replace(cfg, quantization="none", gradient_checkpointing=False))


def _check_adapters(policy: Policy, found) -> None:
    missing = {k for k, _ in policy.model.named_parameters() if "lora_" in k} - set(found)
    if not found or missing:
        raise ValueError(f"LoRA checkpoint lacks adapter weights (e.g. {sorted(missing)[:3]})")
