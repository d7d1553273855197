"""Rotary position embeddings: HF rope scaling, float32 tables, rotate-half application.

Gemma 3 gives its sliding-window layers their own plain RoPE (`ModelConfig.rope_local_theta`);
`rope_tables` returns both tables once per pass and each layer picks its own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from rlhf_jax.models.config import ModelConfig

_F32 = jnp.float32


def inv_freq(config: ModelConfig, positions_BT: jax.Array, local: bool = False) -> jax.Array:
    """RoPE inverse frequencies `[rotary_dim // 2]` float32, with HF rope scaling applied
    (`local`: plain RoPE with base `rope_local_theta`, for the sliding-window layers)."""
    dim = config.rotary_dim
    exponents = np.arange(0, dim, 2).astype(np.float32) / np.float32(dim)
    if local:
        return jnp.asarray(np.float32(1.0) / np.float32(config.rope_local_theta) ** exponents)
    scaling = dict(config.rope_scaling or ())
    rope_type = scaling.get("rope_type")
    if rope_type == "dynamic":
        # NTK scaling from the largest position in the call, as transformers does per forward.
        max_pos = config.max_position_embeddings
        seq_len = jnp.maximum(jnp.max(positions_BT) + 1, max_pos).astype(_F32)
        factor = scaling["factor"]
        base = config.rope_theta * (factor * seq_len / max_pos - (factor - 1)) ** (dim / (dim - 2))
        return 1.0 / base ** jnp.asarray(exponents)
    freq = np.float32(1.0) / np.float32(config.rope_theta) ** exponents
    if rope_type == "linear":
        freq = freq / np.float32(scaling["factor"])
    elif rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * np.pi / freq
        scaled = np.where(wavelen > old_len / low, freq / factor, freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        freq = np.where(is_medium, smoothed, scaled).astype(np.float32)
    return jnp.asarray(freq, _F32)


def cos_sin(
    config: ModelConfig, positions_BT: jax.Array, local: bool = False
) -> tuple[jax.Array, jax.Array]:
    """Float32 `(cos, sin)`, each `[B, T, rotary_dim]` (HF layout: frequencies repeated twice)."""
    angles = positions_BT.astype(_F32)[..., None] * inv_freq(config, positions_BT, local)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return materialized(jnp.cos(angles)), materialized(jnp.sin(angles))


def materialized(x: jax.Array) -> jax.Array:
    """Finite `x`, bit for bit (a product with the identity matrix at full precision), as the
    output of a dot.

    XLA:CPU fuses cheap elementwise producers into each consumer: without this, every fusion that
    reads the RoPE tables (q and k, forward, backward and recomputation, in every layer)
    re-evaluates cos and sin for every head. `lax.optimization_barrier` does not prevent that on
    CPU (the barrier is gone before fusion); a dot is never duplicated. Measured on the PPO
    benchmark: an iteration 8-9% faster on configs A and B, decoding 2-3% faster."""
    eye = jnp.eye(x.shape[-1], dtype=x.dtype)
    return jnp.einsum("...r,rs->...s", x, eye, precision=lax.Precision.HIGHEST)


def apply_rope(x_BTHK: jax.Array, cos_BTR: jax.Array, sin_BTR: jax.Array) -> jax.Array:
    """Rotate-half RoPE on the first `rotary_dim` features of each head (float32 math)."""
    rot_dim = cos_BTR.shape[-1]
    x = x_BTHK.astype(_F32)
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    x1, x2 = jnp.split(x_rot, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    x_rot = x_rot * cos_BTR[:, :, None] + rotated * sin_BTR[:, :, None]
    return jnp.concatenate([x_rot, x_pass], axis=-1).astype(x_BTHK.dtype)


Tables = tuple[jax.Array, jax.Array]


def rope_tables(
    config: ModelConfig, positions_BT: jax.Array
) -> tuple[Tables, Tables | None] | None:
    """`(global, local)` RoPE tables of a pass, each `(cos, sin)` `[B, T, rotary_dim]`: `global`
    for full-attention layers (and every layer when `local` is None), `local` for the
    sliding-window layers when they have their own base (`rope_local_theta`); None for learned
    positions."""
    if config.positions != "rope":
        return None
    tables = cos_sin(config, positions_BT)
    if config.rope_local_theta is None or not config.has_local_layers:
        return tables, None
    return tables, cos_sin(config, positions_BT, local=True)
