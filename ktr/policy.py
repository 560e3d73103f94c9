"""Policy loading: any Qwen2.5-VL / Qwen2-VL checkpoint, or the built-in `tiny` model (layer L2).

Both paths end in the same `Policy` object (model + processor + token ids); everything after construction
(LoRA, 4-bit, gradient checkpointing, freezing) is shared.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ktr.data.processor import PatchSettings, VisionLanguageProcessor
from ktr.config import DType, LoraSettings, PolicyConfig, TinyModelConfig  # noqa: F401 (re-exported)
from ktr.families import core, get_family, vision_tower  # noqa: F401 (re-exported)

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


def tiny_config(cfg: TinyModelConfig):
    """A Qwen2.5-VL config with the real vocabulary and special-token ids and a tiny trunk."""
    from transformers import Qwen2_5_VLConfig

    head_dim = cfg.hidden_size // cfg.num_heads
    if cfg.hidden_size % cfg.num_heads or head_dim % 4:
        raise ValueError(f"tiny: hidden_size/num_heads = {head_dim} must be an integer divisible by 4")
    half = head_dim // 2  # 3D rotary sections (temporal, height, width) must sum to head_dim / 2
    section = [half - 2 * (half // 3), half // 3, half // 3]
    text = dict(
        vocab_size=151936, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=32768, rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": section},
        tie_word_embeddings=cfg.tie_word_embeddings,
    )
    vision = dict(
        depth=cfg.vision_depth, hidden_size=cfg.vision_hidden_size, intermediate_size=2 * cfg.vision_hidden_size,
        num_heads=cfg.vision_heads, out_hidden_size=cfg.hidden_size, patch_size=14, spatial_merge_size=2,
        temporal_patch_size=2, tokens_per_second=2, window_size=112,
        fullatt_block_indexes=[cfg.vision_depth - 1],
    )
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=151655, video_token_id=151656,
                            vision_start_token_id=151652, vision_end_token_id=151653,
                            tie_word_embeddings=cfg.tie_word_embeddings)


def _build_tiny(cfg: PolicyConfig):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from ktr.tokenizer import build_qwen2_tokenizer

    config = tiny_config(cfg.tiny)
    config._attn_implementation = cfg.attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.tiny.seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    return model.to(_DTYPES[cfg.dtype]), build_qwen2_tokenizer(), PatchSettings()


def _load_pretrained(cfg: PolicyConfig):
    from transformers import AutoConfig, AutoTokenizer

    kw = dict(trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    config = AutoConfig.from_pretrained(cfg.name_or_path, **kw)
    family = get_family(config.model_type, cfg.name_or_path)
    quant = {}
    if cfg.quantization == "nf4":  # quantised while loading: the full-precision weights are never all in memory
        from ktr.quant import from_pretrained_kwargs

        quant = from_pretrained_kwargs(_DTYPES[cfg.dtype], family.quant_skip_modules)
    model = family.load_class().from_pretrained(
        cfg.name_or_path, dtype=_DTYPES[cfg.dtype], attn_implementation=cfg.attn_implementation, **kw, **quant)
    tokenizer = AutoTokenizer.from_pretrained(cfg.name_or_path, **kw)
    tokenizer.padding_side = "left"
    patch = PatchSettings.from_pretrained(cfg.name_or_path) if Path(cfg.name_or_path).is_dir() else PatchSettings()
    return model, tokenizer, patch


def load_policy(cfg: PolicyConfig) -> Policy:
    """Build or load the model and its processor, then apply the shared post-construction steps."""
    model, tokenizer, patch = _build_tiny(cfg) if cfg.name_or_path == "tiny" else _load_pretrained(cfg)
    model.config.use_cache = True
    if cfg.quantization == "nf4":
        from ktr.quant import prepare_nf4

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
    processor = VisionLanguageProcessor(tokenizer, image_token_id=core(model).config.image_token_id,
                                        video_token_id=core(model).config.video_token_id, patch=patch)
    return Policy(model=model, processor=processor)


def apply_lora(model: nn.Module, lora: LoraSettings) -> nn.Module:
    """Wrap with peft LoRA on the language model only (the regex keeps adapters out of the vision tower)."""
    from peft import LoraConfig, get_peft_model

    targets = "|".join(lora.target_modules)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=rf".*language_model.*\.({targets})")
    return get_peft_model(model, config)
