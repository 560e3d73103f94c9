"""The model-family interface and registry (layer L2, bottom): what differs between Qwen-VL generations.

A `ModelFamily` answers every "which model is this?" question: the transformers class of a checkpoint, how the
vision tower's output becomes `VisionFeatures` (Qwen3-VL adds per-layer *deepstack* features), which extra
keyword arguments the decoder trunk takes (Qwen3-VL: `visual_pos_masks`, `deepstack_visual_embeds`), whether
video rotary positions take `second_per_grid_ts`, the processor layout (patch size, normalisation, video
timestamps), the tokenizer and shape of the built-in tiny model, the modules FSDP2 shards as units, the ones
QLoRA keeps in high precision and where LoRA adapters go. `ktr.model.forward`, the probes, `ktr.rollout`,
`ktr.model.quant`, `ktr.model.fsdp` and `ktr.export` ask the family and never branch on the model type themselves.

This file imports only torch and torch-only ktr modules at module level: transformers classes are looked up by
name when a model is built or loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ktr.types import VisionFeatures

# In transformers 5 the vision tower lives at `model.visual` (the bare name "visual" no longer matches).
QUANT_SKIP_MODULES = ("model.visual", "lm_head")


def core(model: nn.Module) -> nn.Module:
    """The `*ForConditionalGeneration` module under any wrapper (peft, torch.compile)."""
    # `_modules`, not hasattr: peft forwards unknown attributes to the wrapped model, so a PeftModel "has" an
    # lm_head while its `.model` is not the Qwen-VL backbone.
    while "lm_head" not in model._modules:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            raise TypeError(f"{type(model).__name__} has no lm_head; not a Qwen-VL policy")
    return model


def vision_tower(model: nn.Module) -> nn.Module:
    return core(model).model.visual


def language_model(model: nn.Module) -> nn.Module:
    """The decoder trunk (embeddings, layers, final norm; no output projection)."""
    return core(model).model.language_model


def row_features(per_prompt: list[Tensor], prompt_index: Tensor) -> Tensor:
    """`[n_vision_tokens, H]`: each row's prompt features, rows in order (prompt features shared by G rows)."""
    return torch.cat([per_prompt[p] for p in prompt_index.tolist()])


@dataclass(frozen=True)
class ModelFamily:
    """Per-family facts and pieces (one instance per transformers `model_type`). Subclass to change a piece."""

    model_type: str
    """transformers' `config.model_type`."""
    model_class: str
    """Name of the `*ForConditionalGeneration` class in `transformers`."""
    video_time_scaling: bool
    """Whether the 3D rotary positions of videos take `second_per_grid_ts` (Qwen2.5-VL: yes; others: no)."""
    tiny_name: str | None = None
    """`policy.name_or_path` that builds this family's random-init tiny model (None: no tiny model)."""
    quant_skip_modules: tuple[str, ...] = QUANT_SKIP_MODULES
    """Module-name prefixes kept in high precision under 4-bit loading (transformers 5 layout)."""
    lora_scope: str = r".*language_model.*"
    """Regex prefix of the module names LoRA may adapt (the vision tower stays out)."""
    processor_class: str = "Qwen2_5_VLProcessor"
    """transformers processor / image / video processor class names written by `ktr.export`."""
    image_processor_type: str = "Qwen2VLImageProcessor"
    video_processor_type: str = "Qwen2VLVideoProcessor"
    shared_prefix_exact: bool = True
    """Whether a packed row (`ktr.model.prefix`: a group's prompt once, its G completions after it) scores each
    completion exactly as its own row does. True for pure-attention decoders; False where a layer carries a state
    along the row (Qwen3.5's Gated DeltaNet), which would run from one completion into the next: such a family's
    scoring passes always take the naive layout (`ktr.model.forward.prefix_layout`)."""
    media_rope_restart: bool = False
    """Whether transformers 5's positions after a video differ from Qwen's reference rule (`ktr.model.rope`):
    Qwen2-VL and Qwen2.5-VL, whose videos span several temporal positions. Qwen3-VL's frames are one temporal
    position each, where both rules agree."""

    def load_class(self):
        import transformers

        return getattr(transformers, self.model_class)

    # ----------------------------------------------------------------------------------- vision and decoder

    def encode(self, model: nn.Module, pixel_values: Tensor, grid_thw: Tensor) -> VisionFeatures:
        """Run the vision tower once on all media (`pixel_values` [sum P, D], `grid_thw` [B, 3])."""
        visual = vision_tower(model)
        out = visual(pixel_values.to(visual.dtype if hasattr(visual, "dtype") else pixel_values.dtype),
                     grid_thw=grid_thw)
        feats = out.pooler_output if hasattr(out, "pooler_output") else out  # [sum P / merge**2, H]
        return VisionFeatures(per_prompt=list(torch.split(feats, self._sizes(visual, grid_thw))))

    @staticmethod
    def _sizes(visual: nn.Module, grid_thw: Tensor) -> list[int]:
        return (grid_thw.prod(-1) // visual.spatial_merge_size**2).tolist()

    def decoder_kwargs(self, model: nn.Module, mm_token_type_ids: Tensor, prompt_index: Tensor,
                       features: VisionFeatures, zero_vision: Tensor | None = None) -> dict:
        """Extra keyword arguments of the decoder trunk for N rows (`mm_token_type_ids` `[N, S]`)."""
        return {}

    # ---------------------------------------------------------------------------------- processor, model

    def patch_settings(self):
        """Default patching constants (a checkpoint's `preprocessor_config.json` overrides them)."""
        from ktr.data.processor import PatchSettings

        return PatchSettings()

    def video_layout(self):
        """How a video placeholder is laid out in the prompt."""
        from ktr.data.processor import VideoLayout

        return VideoLayout()

    def tiny_config(self, cfg):
        raise NotImplementedError(f"{self.model_type} has no tiny model")

    def build_tokenizer(self):
        from ktr.model.tokenizer import build_qwen2_tokenizer

        return build_qwen2_tokenizer()

    # --------------------------------------------------------------------------------------- training

    def shard_units(self, model: nn.Module) -> list[nn.Module]:
        """Modules FSDP2 wraps as units before the embeddings, head, trunk and root (bottom-up order)."""
        visual, lm = vision_tower(model), language_model(model)
        return [*visual.blocks, visual, *lm.layers]

    def repeat_cache(self, cache, repeats: int) -> None:
        """Repeat a prefilled transformers cache `repeats` times along the batch, in place (each prompt's state
        for its G rows): keys and values of every attention layer."""
        cache.batch_repeat_interleave(repeats)

    def lora_target_regex(self, target_modules: list[str]) -> str:
        return rf"{self.lora_scope}\.({'|'.join(target_modules)})"


FAMILIES: dict[str, ModelFamily] = {}
REFUSED: dict[str, str] = {}
"""model_type -> why ktr refuses it (a known relative of a supported family, e.g. Qwen3.5's MoE checkpoints)."""


def register_family(family: ModelFamily) -> ModelFamily:
    FAMILIES[family.model_type] = family
    return family


def get_family(model_type: str, source: str = "") -> ModelFamily:
    """The family of `model_type`; an unsupported one fails naming it, where it came from and the supported ones
    (and, for a refused relative of a supported family, why)."""
    if model_type not in FAMILIES:
        where = f"{source}: " if source else ""
        why = f" ({REFUSED[model_type]})" if model_type in REFUSED else ""
        raise ValueError(f"{where}model_type {model_type!r} is not supported{why}; expected one of {sorted(FAMILIES)}")
    return FAMILIES[model_type]


def tiny_family(name: str) -> ModelFamily | None:
    """The family whose tiny model `name` (`policy.name_or_path`) builds, None for a real checkpoint."""
    return next((f for f in FAMILIES.values() if f.tiny_name is not None and f.tiny_name == name), None)


def family_of(model: nn.Module) -> ModelFamily:
    return get_family(core(model).config.model_type, type(core(model)).__name__)
