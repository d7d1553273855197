"""Masked statistics and response post-processing (TRL semantics).

Masks are boolean or 0/1 arrays broadcastable to the data; a masked-out element (mask 0) never
changes a result. Reductions are computed in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from rlhf_jax.checks import check_if_concrete, check_same_shape

#: Log-prob stored at masked (padding) positions. Both the policy and the reference hold it there,
#: so every KL estimator is exactly 0 on padding.
INVALID_LOGPROB = 1.0

WHITEN_EPS = 1e-8


def _f32(x: ArrayLike) -> jax.Array:
    return jnp.asarray(x, dtype=jnp.float32)


def masked_sum(
    x: ArrayLike, mask: ArrayLike, axis: int | tuple[int, ...] | None = None
) -> jax.Array:
    """Sum of `x` over masked-in elements (float32). `mask` broadcasts to `x`."""
    x, mask = _f32(x), _f32(mask)
    return jnp.sum(jnp.where(mask > 0, x, 0.0), axis=axis)


def masked_mean(
    x: ArrayLike, mask: ArrayLike, axis: int | tuple[int, ...] | None = None
) -> jax.Array:
    """Mean of `x` over masked-in elements, in float32.

    Args:
      x: any shape.
      mask: same shape as `x` (bool or 0/1); 0 excludes an element.
      axis: reduce over these axes (None: all).
    Returns:
      The masked mean; 0 where the mask selects nothing (never NaN).
    """
    check_same_shape("masked_mean", x=x, mask=mask)
    count = masked_sum(jnp.ones(jnp.shape(x), jnp.float32), mask, axis=axis)
    return masked_sum(x, mask, axis=axis) / jnp.maximum(count, 1.0)


def masked_var(x: ArrayLike, mask: ArrayLike, unbiased: bool = True) -> jax.Array:
    """Variance of `x` over all masked-in elements (float32 scalar).

    With `unbiased=True` applies Bessel's correction n / (n - 1) as TRL does; with a single
    masked-in element the unbiased variance is +inf (so a whitened value becomes 0).
    """
    check_same_shape("masked_var", x=x, mask=mask)
    x32 = _f32(x)
    mean = masked_mean(x32, mask)
    var = masked_mean(jnp.square(x32 - mean), mask)
    if unbiased:
        n = jnp.sum(_f32(mask) > 0).astype(jnp.float32)
        var = jnp.where(n > 1.0, var * n / jnp.maximum(n - 1.0, 1.0), jnp.inf)
    return var


def masked_whiten(x: ArrayLike, mask: ArrayLike, shift_mean: bool = True) -> jax.Array:
    """`(x - mean) * rsqrt(var + 1e-8)` with statistics over all masked-in elements (float32).

    The variance is the unbiased masked variance (TRL). With `shift_mean=False` the mean is added
    back, i.e. only the scale changes (TRL's reward whitening). Masked-out elements are transformed
    too (callers zero them); they never influence the statistics.

    Raises:
      ValueError: the mask selects no element (eagerly). Under jit an empty mask makes the whole
        result NaN, which `ppo.check_finite` and the trainers report as an error.
    """
    check_same_shape("masked_whiten", x=x, mask=mask)
    any_real = jnp.any(_f32(mask) > 0)
    check_if_concrete(
        any_real,
        "masked_whiten: the mask selects no element, so mean and variance are undefined; "
        "check that the batch holds at least one real (unmasked) token",
    )
    x32 = _f32(x)
    mean = masked_mean(x32, mask)
    whitened = (x32 - mean) * jax.lax.rsqrt(masked_var(x32, mask, unbiased=True) + WHITEN_EPS)
    whitened = whitened if shift_mean else whitened + mean
    return jnp.where(any_real, whitened, jnp.nan)


def first_true_indices(bools: ArrayLike) -> jax.Array:
    """Index of the first True along the last axis, or the axis length if none (int32)."""
    bools = jnp.asarray(bools, dtype=bool)
    length = bools.shape[-1]
    idx = jnp.arange(length, dtype=jnp.int32)
    return jnp.min(jnp.where(bools, idx, length), axis=-1)


def response_mask(sequence_lengths: ArrayLike, length: int) -> jax.Array:
    """Bool `[B, length]`: True up to and including `sequence_lengths` (last real token)."""
    idx = jnp.arange(length, dtype=jnp.int32)
    return idx[None, :] <= jnp.asarray(sequence_lengths, jnp.int32)[:, None]


def truncate_after_stop(
    tokens: ArrayLike, stop_token_ids: ArrayLike | int, pad_id: int
) -> tuple[jax.Array, jax.Array]:
    """Keeps each row up to and including its first stop token and pads everything after it.

    Args:
      tokens: int `[B, T]` right-aligned responses.
      stop_token_ids: one id or a sequence of ids; any of them stops a row.
      pad_id: id written after the stop token.
    Returns:
      `(truncated_BT, sequence_lengths_B)`: `sequence_lengths` is the index of the last real token
      (the stop token if present, else `T - 1`), int32.
    """
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"truncate_after_stop: tokens must be [B, T], got shape {tokens.shape}")
    stops = jnp.atleast_1d(jnp.asarray(stop_token_ids, dtype=tokens.dtype))
    is_stop = jnp.any(tokens[..., None] == stops, axis=-1)
    first_stop = first_true_indices(is_stop)
    length = tokens.shape[-1]
    idx = jnp.arange(length, dtype=jnp.int32)
    truncated = jnp.where(
        idx[None, :] > first_stop[:, None], jnp.asarray(pad_id, tokens.dtype), tokens
    )
    sequence_lengths = jnp.minimum(first_stop, length - 1).astype(jnp.int32)
    return truncated, sequence_lengths
