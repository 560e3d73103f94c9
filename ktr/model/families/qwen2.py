"""Qwen2.5-VL and Qwen2-VL: the base interface as is (no deepstack, placeholder-only video layout)."""

from __future__ import annotations

from dataclasses import dataclass

from ktr.model.families.base import ModelFamily


def mrope_section(head_dim: int) -> list[int]:
    """3D rotary sections (temporal, height, width) summing to head_dim / 2."""
    half = head_dim // 2
    return [half - 2 * (half // 3), half // 3, half // 3]


def check_tiny_heads(cfg) -> int:
    head_dim = cfg.hidden_size // cfg.num_heads
    if cfg.hidden_size % cfg.num_heads or head_dim % 4:
        raise ValueError(f"tiny: hidden_size/num_heads = {head_dim} must be an integer divisible by 4")
    return head_dim


@dataclass(frozen=True)
class Qwen25VLFamily(ModelFamily):
    def tiny_config(self, cfg):
        """A Qwen2.5-VL config with the real vocabulary and special-token ids and a tiny trunk."""
        from transformers import Qwen2_5_VLConfig

        head_dim = check_tiny_heads(cfg)
        text = dict(
            vocab_size=151936, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
            max_position_embeddings=32768, rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope_section(head_dim)},
            tie_word_embeddings=cfg.tie_word_embeddings,
        )
        vision = dict(
            depth=cfg.vision_depth, hidden_size=cfg.vision_hidden_size, intermediate_size=2 * cfg.vision_hidden_size,
            num_heads=cfg.vision_heads, out_hidden_size=cfg.hidden_size, patch_size=14, spatial_merge_size=2,
            temporal_patch_size=2, tokens_per_second=2, window_size=112,
            fullatt_block_indexes=[cfg.vision_depth - 1],
        )
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=151655,
                                video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
                                tie_word_embeddings=cfg.tie_word_embeddings)


QWEN2_5_VL = Qwen25VLFamily("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", video_time_scaling=True,
                            tiny_name="tiny", media_rope_restart=True)
QWEN2_VL = ModelFamily("qwen2_vl", "Qwen2VLForConditionalGeneration", video_time_scaling=False,
                       processor_class="Qwen2VLProcessor", media_rope_restart=True)
