"""Preallocated key/value cache for ktr's decode loop (layer L2): written in place, never concatenated.

transformers' `DynamicLayer` grows its keys and values with `torch.cat` on every token, so each decode step
allocates and copies the whole cache of every layer (`[N, kv_heads, L + t, head_dim]`, twice): the cost grows
with the position and, at 768 new tokens after a ~1k-token video prompt, rivals the matrix products of a
small decoder. `preallocate` swaps each full-attention layer of a prefilled (and repeated) cache for a
`PreallocatedLayer` that holds `[N, kv_heads, L + max_new_tokens, head_dim]` buffers: the prompt's keys and
values are copied in once, each step writes its token's key/value at its index, and attention gets a view of
the filled part. The view is the same values at the same length as the dynamic cache would return, with the
same mask, so the attention (and the sampled tokens) are those of transformers' `generate`.

Other cache layers stay as they are: a sliding-window layer, and the fixed-size DeltaNet states of a hybrid
decoder (Qwen3.5's `LinearAttentionCacheLayerMixin` layers: convolution window and recurrent state, already
updated in place by transformers).

`static=True` instead uses transformers' own `StaticLayer` (the full buffer and a tensor length each step, the
mask sized to the buffer): fixed shapes for a `torch.compile`d decode step on CUDA (`sampling.compile_decode`).
Attention then runs over the whole buffer with the unfilled part masked: the same distribution up to rounding,
not bitwise the dynamic cache's, and more work per step early in a long completion.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import CacheLayerMixin, DynamicLayer, StaticLayer


class PreallocatedLayer(CacheLayerMixin):
    """A full-attention cache layer over preallocated `[N, kv_heads, capacity, head_dim]` buffers.

    `update` writes the new keys/values at positions `length .. length + q - 1` and returns views
    `[N, kv_heads, length + q, head_dim]` of the filled part (no allocation, no copy of the past).
    """

    is_compileable = False  # the returned length changes every step; `static=True` is the compile path
    is_croppable = False
    is_sliding = False

    def __init__(self, keys: Tensor, values: Tensor, capacity: int):
        super().__init__()
        n, heads, length, _ = keys.shape  # [N, kv_heads, L, head_dim]
        if capacity < length:
            raise ValueError(f"capacity {capacity} is below the prompt's {length} cached tokens")
        self.device = keys.device
        self.capacity = capacity
        self.key_buffer = keys.new_empty((n, heads, capacity, keys.shape[-1]))  # [N, kv_heads, C, head_dim]
        self.value_buffer = values.new_empty((n, values.shape[1], capacity, values.shape[-1]))
        self.key_buffer[:, :, :length] = keys
        self.value_buffer[:, :, :length] = values
        self.length = length
        self._set_views()
        self.is_initialized = True

    def _set_views(self) -> None:
        self.keys = self.key_buffer[:, :, :self.length]  # [N, kv_heads, length, head_dim]
        self.values = self.value_buffer[:, :, :self.length]

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        raise RuntimeError("PreallocatedLayer is built from a prefilled layer (ktr.rollout.kv_cache.preallocate)")

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Write `key_states`/`value_states` `[N, kv_heads, q, head_dim]` after the filled part; the filled views."""
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"preallocated cache full: {end} tokens > capacity {self.capacity}")
        self.key_buffer[:, :, self.length:end] = key_states
        self.value_buffer[:, :, self.length:end] = value_states
        self.length = end
        self._set_views()
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """`(kv_length, kv_offset)` as `DynamicLayer`: the filled length plus the query."""
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.capacity

    def reset(self) -> None:
        self.length = 0
        self._set_views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise RuntimeError("repeat the cache before preallocating it (ktr.rollout.kv_cache.preallocate)")


def _static_layer(keys: Tensor, values: Tensor, capacity: int):
    """transformers' `StaticLayer` of `capacity` positions holding `keys`/`values` `[N, kv_heads, L, head_dim]`."""
    layer = StaticLayer(max_cache_len=capacity)
    layer.lazy_initialization(keys, values)  # zeros [N, kv_heads, capacity, head_dim], static addresses
    length = keys.shape[-2]
    layer.keys[:, :, :length] = keys
    layer.values[:, :, :length] = values
    layer.cumulative_length.fill_(length)
    return layer


def preallocate(cache, new_tokens: int, static: bool = False) -> int:
    """Swap, in place, each full-attention `DynamicLayer` of a prefilled `cache` for preallocated buffers with
    room for `new_tokens` more tokens (`PreallocatedLayer`, or transformers' `StaticLayer` when `static`).

    Returns how many layers were swapped. Other layers (sliding window, DeltaNet states) are left as they are.
    """
    swapped = 0
    for i, layer in enumerate(cache.layers):
        if type(layer) is not DynamicLayer or not layer.is_initialized or layer.keys.numel() == 0:
            continue
        capacity = layer.keys.shape[-2] + new_tokens
        make = _static_layer if static else PreallocatedLayer
        cache.layers[i] = make(layer.keys, layer.values, capacity)
        swapped += 1
    return swapped


def cache_buffers(cache) -> list[Tensor]:
    """The key/value tensors of every attention layer of `cache` (buffers, for a preallocated layer): to check
    that they keep their storage over the decode."""
    out = []
    for layer in cache.layers:
        if isinstance(layer, PreallocatedLayer):
            out += [layer.key_buffer, layer.value_buffer]
        elif getattr(layer, "keys", None) is not None and isinstance(layer.keys, torch.Tensor):
            out += [layer.keys, layer.values]
    return out
