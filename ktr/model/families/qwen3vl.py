"""Qwen3-VL (transformers' `Qwen3VLForConditionalGeneration`, model_type `qwen3_vl`).

What differs from Qwen2.5-VL, each checked against transformers 5's `models/qwen3_vl/`:
- vision: patch 16 (resize factor 32), spatial merge 2, temporal patch 2, normalisation mean = std = 0.5;
- *deepstack*: the vision tower also returns, for each of `deepstack_visual_indexes`, merged features of that
  vision layer (`deepstack_features`); `Qwen3VLTextModel` adds feature list entry l to the hidden states after
  decoder layer l at `visual_pos_masks` (`_deepstack_process`). `encode` keeps them per prompt, so the vision
  tower still runs once per pass and the features are scattered into the G rows of each prompt like the main
  ones (`decoder_kwargs`);
- rotary positions: `get_rope_index` splits each video into one (1, h, w) grid per temporal patch and gives
  every frame the temporal index of the text position where it starts (no `second_per_grid_ts`, no temporal
  scaling); the interleaved mRoPE layout lives inside the text model and needs nothing from ktr;
- prompt: each temporal patch is `<t.t seconds><|vision_start|><|video_pad|>*n<|vision_end|>` (`VideoLayout`);
- tokenizer: Qwen3's, with `<think>` = 151667 and `</think>` = 151668; the same image/video/vision ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ktr.model.families.base import ModelFamily, row_features, vision_tower
from ktr.model.families.qwen2 import check_tiny_heads
from ktr.types import VisionFeatures

QWEN3VL_MEAN = QWEN3VL_STD = (0.5, 0.5, 0.5)  # transformers' IMAGENET_STANDARD_MEAN / _STD


def interleaved_mrope_section(head_dim: int) -> list[int]:
    """(temporal, height, width) frequency counts summing to head_dim / 2; Qwen3-VL-8B: [24, 20, 20] of 64."""
    half = head_dim // 2
    hw = (half * 5) // 16  # 20 of 64, as released; at least one pair each on a tiny model
    return [half - 2 * max(hw, 1), max(hw, 1), max(hw, 1)]


@dataclass(frozen=True)
class Qwen3VLFamily(ModelFamily):
    def encode(self, model: nn.Module, pixel_values: Tensor, grid_thw: Tensor) -> VisionFeatures:
        """Main and deepstack features of all media in one vision-tower call (`pixel_values` [sum P, D])."""
        visual = vision_tower(model)
        out = visual(pixel_values.to(visual.dtype), grid_thw=grid_thw, return_dict=True)
        sizes = self._sizes(visual, grid_thw)
        per_layer = [torch.split(f, sizes) for f in out.deepstack_features]  # L tuples of B [n_b, H]
        deepstack = [[layer[b] for layer in per_layer] for b in range(len(sizes))]
        return VisionFeatures(per_prompt=list(torch.split(out.pooler_output, sizes)), deepstack=deepstack)

    def decoder_kwargs(self, model: nn.Module, mm_token_type_ids: Tensor, prompt_index: Tensor,
                       features: VisionFeatures, zero_vision: Tensor | None = None) -> dict:
        """`visual_pos_masks` `[N, S]` and one `[n_vision_tokens, H]` deepstack tensor per deepstack layer.

        The rows' order is the order in which `Qwen3VLModel.forward` lays them out (row-major over the visual
        positions), so the decoder sees exactly what transformers' own forward builds. Positions zeroed by the
        `zero_embeddings` perturbation (`zero_vision` `[N, S]`) get zero deepstack features too.
        """
        if features.deepstack is None:
            raise ValueError("Qwen3-VL needs deepstack features; encode the media with this family's `encode`")
        visual_pos = mm_token_type_ids > 0  # [N, S]
        n_layers = len(features.deepstack[0]) if features.deepstack else 0
        embeds = [row_features([d[l] for d in features.deepstack], prompt_index) for l in range(n_layers)]
        if zero_vision is not None:
            keep = ~zero_vision[visual_pos]  # [n_vision_tokens]
            embeds = [e * keep.unsqueeze(-1).to(e.dtype) for e in embeds]
        return {"visual_pos_masks": visual_pos, "deepstack_visual_embeds": embeds}

    def patch_settings(self):
        from ktr.data.processor import PatchSettings

        return PatchSettings(patch_size=16, image_mean=QWEN3VL_MEAN, image_std=QWEN3VL_STD)

    def video_layout(self):
        from ktr.data.processor import VideoLayout

        return VideoLayout(timestamps=True)

    def build_tokenizer(self):
        from ktr.model.tokenizer import build_qwen3_tokenizer

        return build_qwen3_tokenizer()

    def tiny_config(self, cfg):
        """A Qwen3-VL config with the real vocabulary and token ids, a tiny trunk and deepstack on every
        vision layer that has a decoder layer to feed."""
        from transformers import Qwen3VLConfig

        head_dim = check_tiny_heads(cfg)
        text = dict(
            vocab_size=151936, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
            head_dim=head_dim, max_position_embeddings=32768, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_interleaved": True,
                             "mrope_section": interleaved_mrope_section(head_dim)},
            tie_word_embeddings=cfg.tie_word_embeddings,
        )
        vision = dict(
            depth=cfg.vision_depth, hidden_size=cfg.vision_hidden_size, intermediate_size=2 * cfg.vision_hidden_size,
            num_heads=cfg.vision_heads, out_hidden_size=cfg.hidden_size, patch_size=16, spatial_merge_size=2,
            temporal_patch_size=2, num_position_embeddings=256,
            deepstack_visual_indexes=list(range(min(cfg.vision_depth, cfg.num_layers))),
        )
        return Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=151655, video_token_id=151656,
                             vision_start_token_id=151652, vision_end_token_id=151653,
                             tie_word_embeddings=cfg.tie_word_embeddings)


QWEN3_VL = Qwen3VLFamily("qwen3_vl", "Qwen3VLForConditionalGeneration", video_time_scaling=False,
                         tiny_name="tiny-qwen3vl", processor_class="Qwen3VLProcessor",
                         video_processor_type="Qwen3VLVideoProcessor")
