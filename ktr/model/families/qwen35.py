"""Qwen3.5 / Qwen3.6 dense (transformers' `Qwen3_5ForConditionalGeneration`, model_type `qwen3_5`).

What differs from Qwen3-VL, each checked against transformers 5.24's `models/qwen3_5/` (docs/qwen35.md):
- decoder: hybrid. `text_config.layer_types` alternates three Gated DeltaNet (linear attention) layers with one
  gated full-attention layer. A DeltaNet layer carries a recurrent state (and a short causal convolution) along
  the row, so one row must hold one sequence: the packed shared-prefix layouts of `ktr.model.prefix` would run one
  completion's state into the next (`shared_prefix_exact = False`: every scoring pass runs the naive layout).
  Padding is exact: the DeltaNet layers zero the hidden states where the 2D attention mask is 0, so nothing
  enters the state at left padding;
- vision: the Qwen3-VL tower (patch 16, merge 2, temporal patch 2, mean = std = 0.5) without deepstack: one
  merged feature map per medium, as Qwen2.5-VL (the base `encode` and no extra decoder arguments);
- rotary positions: `get_rope_index` is Qwen3-VL's (one (1, h, w) grid per temporal patch, no temporal
  scaling); interleaved mRoPE on the first quarter of each 256-wide head (`partial_rotary_factor` 0.25);
- prompt: Qwen3-VL's timestamped video layout (transformers maps `qwen3_5` to `Qwen3VLProcessor`);
- ids: vocabulary 248,320; specials from 248,044 (`<|im_end|>` 248046, vision start/end 248053/248054, image
  248056, video 248057, `<think>` 248068); tokenizer `ktr.model.tokenizer.build_qwen35_tokenizer`;
- QLoRA keeps each DeltaNet layer's `in_proj_a` / `in_proj_b` (the decay and write-strength projections, one
  output per value head) in high precision, as published AutoRound 4-bit conversions of Qwen3.5 do.
The MoE checkpoints (`qwen3_5_moe`) are refused by name (`REFUSED`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ktr.model.families.base import QUANT_SKIP_MODULES, ModelFamily
from ktr.model.families.qwen3vl import QWEN3VL_MEAN, QWEN3VL_STD

VOCAB_SIZE = 248320
IMAGE_TOKEN_ID, VIDEO_TOKEN_ID = 248056, 248057
VISION_START_ID, VISION_END_ID = 248053, 248054
EOS_TOKEN_ID = 248044  # `<|endoftext|>` (text_config.eos_token_id of the released checkpoints)
PARTIAL_ROTARY_FACTOR = 0.25
FULL_ATTENTION_INTERVAL = 4

REFUSED = {
    "qwen3_5_moe": "the Qwen3.5 / Qwen3.6 MoE checkpoints (Qwen3_5MoeForConditionalGeneration) are not supported: "
                   "ktr has not checked their expert layers against its forward, QLoRA, LoRA scope or FSDP2 units; "
                   "use a dense checkpoint (model_type qwen3_5, e.g. Qwen/Qwen3.5-9B)",
    "qwen3_5_text": "a text-only Qwen3.5 checkpoint (Qwen3_5ForCausalLM) has no vision tower; use the "
                    "vision-language checkpoint (model_type qwen3_5)",
}


def layer_types(num_layers: int) -> list[str]:
    """Three DeltaNet layers, then one full-attention layer (the released pattern); a model of fewer than four
    layers still ends in a full-attention layer (2 layers: linear, full)."""
    every = min(FULL_ATTENTION_INTERVAL, num_layers)
    return ["full_attention" if (i + 1) % every == 0 else "linear_attention" for i in range(num_layers)]


def mrope_section(rotary_dim: int) -> list[int]:
    """Interleaved (temporal, height, width) frequency counts summing to rotary_dim / 2; Qwen3.5: [11, 11, 10] of
    32 (64 rotary dims of a 256-wide head); at least one pair each on a tiny model."""
    half = rotary_dim // 2
    h, w = max(half * 11 // 32, 1), max(half * 10 // 32, 1)
    return [half - h - w, h, w]


def repeat_linear_states(layer, repeats: int) -> None:
    """Repeat a DeltaNet cache layer's convolution and recurrent states along the batch, in place (transformers'
    `LinearAttentionLayer` has no `batch_repeat_interleave`)."""
    for i in range(layer.number_of_states):
        if layer.is_conv_states_initialized[i]:
            layer.conv_states[i] = layer.conv_states[i].repeat_interleave(repeats, dim=0)
        if layer.is_recurrent_states_initialized[i]:
            layer.recurrent_states[i] = layer.recurrent_states[i].repeat_interleave(repeats, dim=0)


@dataclass(frozen=True)
class Qwen35Family(ModelFamily):
    def repeat_cache(self, cache, repeats: int) -> None:
        """Keys and values of the full-attention layers and the DeltaNet layers' convolution windows and
        recurrent states (`[B, v_heads, k_dim, v_dim]`), each prompt's repeated for its G rows."""
        from transformers.cache_utils import LinearAttentionCacheLayerMixin

        for layer in cache.layers:
            if isinstance(layer, LinearAttentionCacheLayerMixin):
                repeat_linear_states(layer, repeats)
            if hasattr(layer, "batch_repeat_interleave"):  # attention layers (and a hybrid layer's attention part)
                layer.batch_repeat_interleave(repeats)

    def patch_settings(self):
        from ktr.data.processor import PatchSettings

        return PatchSettings(patch_size=16, image_mean=QWEN3VL_MEAN, image_std=QWEN3VL_STD)

    def video_layout(self):
        from ktr.data.processor import VideoLayout

        return VideoLayout(timestamps=True)

    def build_tokenizer(self):
        from ktr.model.tokenizer import build_qwen35_tokenizer

        return build_qwen35_tokenizer()

    def tiny_config(self, cfg):
        """A Qwen3.5 config with the real vocabulary and token ids and a tiny hybrid trunk: the released layer
        pattern (at least one DeltaNet and one full-attention layer), full-attention heads twice as wide as
        hidden_size / num_heads so that a quarter of each still holds (2, 1, 1) rotary pairs, DeltaNet heads of
        hidden_size / num_heads (num_kv_heads key heads, num_heads value heads, as 16 / 32 on the 9B)."""
        from transformers import Qwen3_5Config

        if cfg.num_layers < 2:
            raise ValueError("tiny-qwen35: num_layers must be at least 2 (one DeltaNet and one full-attention layer)")
        if cfg.hidden_size % cfg.num_heads or cfg.num_heads % cfg.num_kv_heads:
            raise ValueError("tiny-qwen35: hidden_size must divide by num_heads and num_heads by num_kv_heads")
        width = cfg.hidden_size // cfg.num_heads
        head_dim = 2 * width
        rotary = int(head_dim * PARTIAL_ROTARY_FACTOR)
        if rotary < 6 or rotary % 2:
            raise ValueError(f"tiny-qwen35: a quarter of the head width 2 * hidden_size / num_heads = {head_dim} "
                             f"must be even and at least 6 (three rotary sections)")
        text = dict(
            vocab_size=VOCAB_SIZE, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
            head_dim=head_dim, linear_num_key_heads=cfg.num_kv_heads, linear_num_value_heads=cfg.num_heads,
            linear_key_head_dim=width, linear_value_head_dim=width, linear_conv_kernel_dim=4,
            layer_types=layer_types(cfg.num_layers), max_position_embeddings=262144, rms_norm_eps=1e-6,
            eos_token_id=EOS_TOKEN_ID,
            rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "mrope_interleaved": True,
                             "partial_rotary_factor": PARTIAL_ROTARY_FACTOR, "mrope_section": mrope_section(rotary)},
            tie_word_embeddings=cfg.tie_word_embeddings,
        )
        vision = dict(
            depth=cfg.vision_depth, hidden_size=cfg.vision_hidden_size, intermediate_size=2 * cfg.vision_hidden_size,
            num_heads=cfg.vision_heads, out_hidden_size=cfg.hidden_size, patch_size=16, spatial_merge_size=2,
            temporal_patch_size=2, num_position_embeddings=256,
        )
        return Qwen3_5Config(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN_ID,
                             video_token_id=VIDEO_TOKEN_ID, vision_start_token_id=VISION_START_ID,
                             vision_end_token_id=VISION_END_ID, tie_word_embeddings=cfg.tie_word_embeddings)


QWEN3_5 = Qwen35Family(
    "qwen3_5", "Qwen3_5ForConditionalGeneration", video_time_scaling=False, tiny_name="tiny-qwen35",
    quant_skip_modules=(*QUANT_SKIP_MODULES, "linear_attn.in_proj_a", "linear_attn.in_proj_b"),
    processor_class="Qwen3VLProcessor", video_processor_type="Qwen3VLVideoProcessor", shared_prefix_exact=False)
