"""Policy loading: any checkpoint of a registered family (Qwen2.5-VL, Qwen2-VL, Qwen3-VL), or a built-in tiny
random model (`tiny`: Qwen2.5-VL, `tiny-qwen3vl`: Qwen3-VL) (layer L2).

Both paths end in the same `Policy` object (model + processor + token ids); everything after construction
(LoRA, 4-bit, gradient checkpointing, freezing) is shared, and the per-family pieces come from `ktr.model.families`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ktr.config import LoraSettings, PolicyConfig, TinyModelConfig
from ktr.data.processor import PatchSettings, VisionLanguageProcessor
from ktr.model.families import FAMILIES, core, family_of, get_family, tiny_family, vision_tower
from ktr.model.forward import set_head_logits

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Policy:
    """A loaded policy: the model and what is needed to feed it."""

    model: nn.Module
    processor: VisionLanguageProcessor

    @property
    def tokenizer(self):
        return self.processor.tokenizer


def tiny_config(cfg: TinyModelConfig, name: str = "tiny"):
    """The config of tiny model `name` (real vocabulary and special-token ids, tiny trunk)."""
    return _tiny(name).tiny_config(cfg)


def _tiny(name: str):
    family = tiny_family(name)
    if family is None:
        names = sorted(f.tiny_name for f in FAMILIES.values() if f.tiny_name)
        raise ValueError(f"policy.name_or_path: {name!r} is not a tiny model; expected one of {names}")
    return family


def _build_tiny(cfg: PolicyConfig):
    family = _tiny(cfg.name_or_path)
    config = family.tiny_config(cfg.tiny)
    config._attn_implementation = cfg.attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.tiny.seed)
        model = family.load_class()(config)
    return model.to(_DTYPES[cfg.dtype]), family.build_tokenizer(), family.patch_settings()


def _load_pretrained(cfg: PolicyConfig):
    from transformers import AutoConfig, AutoTokenizer

    kw = dict(trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    config = AutoConfig.from_pretrained(cfg.name_or_path, **kw)
    family = get_family(config.model_type, cfg.name_or_path)
    quant = {}
    if cfg.quantization == "nf4":  # quantised while loading: the full-precision weights are never all in memory
        from ktr.model.quant import from_pretrained_kwargs

        quant = from_pretrained_kwargs(_DTYPES[cfg.dtype], family.quant_skip_modules)
    model = family.load_class().from_pretrained(
        cfg.name_or_path, dtype=_DTYPES[cfg.dtype], attn_implementation=cfg.attn_implementation, **kw, **quant)
    tokenizer = AutoTokenizer.from_pretrained(cfg.name_or_path, **kw)
    tokenizer.padding_side = "left"
    patch = family.patch_settings()
    if Path(cfg.name_or_path).is_dir():
        patch = PatchSettings.from_pretrained(cfg.name_or_path, default=patch)
    return model, tokenizer, patch


def load_policy(cfg: PolicyConfig) -> Policy:
    """Build or load the model and its processor, then apply the shared post-construction steps."""
    is_tiny = tiny_family(cfg.name_or_path) is not None
    model, tokenizer, patch = _build_tiny(cfg) if is_tiny else _load_pretrained(cfg)
    model.config.use_cache = True
    model.generation_config = _fresh_generation_config(model.generation_config)
    if cfg.rope_after_media == "reference" and family_of(model).media_rope_restart:
        from ktr.model.rope import use_reference_positions

        use_reference_positions(core(model).model)  # every caller, transformers' `generate` included
    set_head_logits(model, cfg.head_logits)
    if cfg.quantization == "nf4":
        from ktr.model.quant import prepare_nf4

        model = prepare_nf4(model, _DTYPES[cfg.dtype])
    if cfg.freeze_vision:
        vision_tower(model).requires_grad_(False)
    if cfg.adapter_path is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, cfg.adapter_path, is_trainable=cfg.lora is not None)
    elif cfg.lora is not None:
        model = apply_lora(model, cfg.lora)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora is not None:
            model.enable_input_require_grads()
    layout = replace(family_of(model).video_layout(), wrapper=cfg.video_wrapper)
    processor = VisionLanguageProcessor(tokenizer, image_token_id=core(model).config.image_token_id,
                                        video_token_id=core(model).config.video_token_id, patch=patch,
                                        layout=layout)
    return Policy(model=model, processor=processor)


def apply_lora(model: nn.Module, lora: LoraSettings) -> nn.Module:
    """Wrap with peft LoRA on the language model only (the regex keeps adapters out of the vision tower)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=family_of(model).lora_target_regex(lora.target_modules))
    return get_peft_model(model, config)


_GENERATION_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def _fresh_generation_config(loaded):
    """A `GenerationConfig` with only the special-token ids of the checkpoint's (`loaded`).

    transformers' `generate` fills every setting a call leaves out from the model's generation config, and
    Qwen2.5-VL-7B-Instruct's `generation_config.json` (which checkpoints fine-tuned from it, such as the released
    SFT start, inherit) sets `repetition_penalty: 1.05`: ktr's `hf` rollouts and greedy evaluations applied a
    penalty that no setting of ktr named. The released trainer built a fresh `GenerationConfig` (its rollouts
    sampled with transformers 4.x's `top_k` 50, not the checkpoint's 1), and so does ktr, once, at load."""
    from transformers import GenerationConfig

    return GenerationConfig(**{k: getattr(loaded, k) for k in _GENERATION_IDS if getattr(loaded, k, None) is not None})


def active_dropout(model: nn.Module) -> list[str]:
    """Names of the modules of `model` that drop out in training mode: `nn.Dropout` with p > 0 (LoRA's
    `lora_dropout` among them) and attention modules whose `attention_dropout` is above 0 (transformers applies it
    inside the attention call). The released Qwen checkpoints have none."""
    found = []
    for name, m in model.named_modules():
        p = m.p if isinstance(m, nn.Dropout) else getattr(m, "attention_dropout", 0.0)
        if isinstance(p, (int, float)) and p > 0:
            found.append(f"{name} ({p:g})")
    return found
