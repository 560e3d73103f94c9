"""Model families: what differs between Qwen-VL generations, behind one small interface (layer L2, bottom).

Everything that asks "which model is this?" asks here: finding the `*ForConditionalGeneration` module under a
wrapper (`core`), its vision tower and decoder, the transformers class to load a checkpoint with, whether the
video rotary positions take `second_per_grid_ts`, the modules FSDP2 shards as units and the ones QLoRA keeps in
high precision. `ktr.policy`, `ktr.distributed`, `ktr.quant`, `ktr.forward` and `ktr.rollout` import from this
file and never from each other for these facts, so there is no import cycle among them. Adding a family is
one `register_family` call; the probes and the module never see it.

This file imports only torch at module level: transformers classes are looked up by name when a checkpoint
is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

# In transformers 5 the vision tower lives at `model.visual` (the bare name "visual" no longer matches).
QUANT_SKIP_MODULES = ("model.visual", "lm_head")


@dataclass(frozen=True)
class ModelFamily:
    """Per-family facts (one instance per transformers `model_type`)."""

    model_type: str
    """transformers' `config.model_type`."""
    model_class: str
    """Name of the `*ForConditionalGeneration` class in `transformers`."""
    video_time_scaling: bool
    """Whether the 3D rotary positions of videos take `second_per_grid_ts` (Qwen2.5-VL: yes; Qwen2-VL: no)."""
    quant_skip_modules: tuple[str, ...] = QUANT_SKIP_MODULES
    """Module-name prefixes kept in high precision under 4-bit loading (transformers 5 layout)."""

    def load_class(self):
        import transformers

        return getattr(transformers, self.model_class)


FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    FAMILIES[family.model_type] = family
    return family


register_family(ModelFamily("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", video_time_scaling=True))
register_family(ModelFamily("qwen2_vl", "Qwen2VLForConditionalGeneration", video_time_scaling=False))


def get_family(model_type: str, source: str = "") -> ModelFamily:
    """The family of `model_type`; an unsupported one fails naming it, where it came from and the supported ones."""
    if model_type not in FAMILIES:
        where = f"{source}: " if source else ""
        raise ValueError(f"{where}model_type {model_type!r} is not supported; expected one of {sorted(FAMILIES)}")
    return FAMILIES[model_type]


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


def family_of(model: nn.Module) -> ModelFamily:
    return get_family(core(model).config.model_type, type(core(model)).__name__)


def vision_tower(model: nn.Module) -> nn.Module:
    return core(model).model.visual


def language_model(model: nn.Module) -> nn.Module:
    """The decoder trunk (embeddings, layers, final norm; no output projection)."""
    return core(model).model.language_model
