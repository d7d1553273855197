"""Attention masks of a pass: causal + padding for every layer, and the sliding-window mask of
local ("sliding_attention") layers (Mistral, Qwen2/Qwen3 with `use_sliding_window`, Gemma 2/3).

The window counts real tokens: a query sees itself and the `sliding_window - 1` real (mask = 1)
tokens before it. With position ids the exclusive cumsum of the mask (this library's
convention) that is `position(query) - position(key) < sliding_window`. transformers counts
sequence slots (`kv_idx > q_idx - sliding_window`, masking_utils' `sliding_window_overlay`),
which is the same for left-padded prompts and right-padded responses, the only padding
transformers sees; counting real tokens also keeps a decode step equal to the full pass when a
pad sits between real tokens (a finished row).

A cached pass keeps the full-length KV cache for local layers too and masks the keys outside the
window, instead of a ring buffer of `sliding_window` slots: the slots a row needs depend on its
padding (left padding, pads written by finished rows), and with a full-length cache prefill,
decode and chunked decode (`SamplingConfig.decode_chunks`) are the same code for every layer.
A ring buffer would save memory for long generations (a possible later optimisation).

Each layer picks its mask (and RoPE table) with `for_layer` from its `is_local` flag, a Python
bool when the layers are unrolled and a traced scalar inside the layer scan, so one `nn.scan`
runs local and global layers alike.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from rlhf_jax.models.config import ModelConfig

# (allowed_BTS for full-attention layers, allowed_BTS for sliding-window layers or None).
Masks = tuple[jax.Array, jax.Array | None]


def _window(config: ModelConfig, allowed_BTS, count_q_BT, count_k_BS) -> jax.Array:
    """`allowed` restricted to keys among the last `sliding_window` real tokens of the query;
    `count_*` are inclusive cumulative sums of the real-token mask at queries and keys."""
    distance_BTS = count_q_BT[:, :, None] - count_k_BS[:, None, :]
    return allowed_BTS & (distance_BTS < config.sliding_window)


def full_pass_masks(config: ModelConfig, mask_BT: jax.Array) -> Masks:
    """Masks `[B, T, T]` of a full pass: query `i` attends to keys `j <= i` with `mask[j]` (and,
    in local layers, within the window)."""
    mask_BT = mask_BT.astype(bool)
    t = mask_BT.shape[1]
    causal_TT = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]
    allowed_BTS = causal_TT[None] & mask_BT[:, None, :]
    if not config.has_local_layers:
        return allowed_BTS, None
    count_BT = jnp.cumsum(mask_BT, axis=1, dtype=jnp.int32)
    return allowed_BTS, _window(config, allowed_BTS, count_BT, count_BT)


def cached_masks(config: ModelConfig, kv_mask_BS: jax.Array, index: Any, t: int) -> Masks:
    """Masks `[B, T, S]` of a cached pass writing slots `[index, index + T)`: query `i` (slot
    `index + i`) attends to slots `j <= index + i` with `kv_mask[j]` (and, in local layers,
    within the window). `kv_mask_BS` already holds the T new slots."""
    q_slot_T = index + jnp.arange(t)
    causal_TS = jnp.arange(kv_mask_BS.shape[1])[None, :] <= q_slot_T[:, None]
    allowed_BTS = causal_TS[None] & kv_mask_BS[:, None, :]
    if not config.has_local_layers:
        return allowed_BTS, None
    count_BS = jnp.cumsum(kv_mask_BS, axis=1, dtype=jnp.int32)
    count_q_BT = lax.dynamic_slice_in_dim(count_BS, index, t, axis=1)
    return allowed_BTS, _window(config, allowed_BTS, count_q_BT, count_BS)


def layer_flags(config: ModelConfig) -> np.ndarray:
    """Bool `[num_layers]`: which layers are sliding-window layers (scanned with the layers)."""
    return np.asarray(config.local_layers, bool)


def for_layer(is_local: Any, global_value: Any, local_value: Any) -> Any:
    """The value of a layer: `local_value` in a local layer (when there is one), else
    `global_value`. `is_local` is a Python/NumPy bool (unrolled layers: picked while tracing) or
    a traced bool scalar (the layer scan: a select)."""
    if local_value is None:
        return global_value
    if isinstance(is_local, bool | np.bool_):
        return local_value if is_local else global_value
    return jax.tree.map(lambda loc, glob: jnp.where(is_local, loc, glob), local_value, global_value)
