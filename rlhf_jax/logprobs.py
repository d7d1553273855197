"""Log-probabilities and entropies from logits without a float32 `[B, T, V]` log-softmax."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from rlhf_jax.checks import check_floating


def selective_log_softmax(logits: ArrayLike, tokens: ArrayLike) -> jax.Array:
    """`log softmax(logits)[..., token]` computed as a gather minus a float32 logsumexp.

    Args:
      logits: float `[..., V]` (any float dtype; upcast to float32 for the normalisation).
      tokens: int `[...]`, the leading shape of `logits`.
    Returns:
      float32 `[...]` log-probabilities of `tokens`.
    """
    check_floating("selective_log_softmax", "logits", logits)
    logits, tokens = jnp.asarray(logits), jnp.asarray(tokens)
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(
            f"selective_log_softmax: tokens{list(tokens.shape)} must equal the leading shape of "
            f"logits{list(logits.shape)}"
        )
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TypeError(f"selective_log_softmax: tokens must be integers, got {tokens.dtype}")
    picked = jnp.take_along_axis(logits, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    return picked.astype(jnp.float32) - lse


def entropy_from_logits(logits: ArrayLike) -> jax.Array:
    """Entropy of `softmax(logits)` over the last axis, float32 `[...]`."""
    check_floating("entropy_from_logits", "logits", logits)
    logits32 = jnp.asarray(logits, jnp.float32)
    lse = jax.nn.logsumexp(logits32, axis=-1)
    probs = jnp.exp(logits32 - lse[..., None])
    return lse - jnp.sum(probs * logits32, axis=-1)


def logprobs_from_hidden(
    hidden_BTD: ArrayLike,
    tokens_BT: ArrayLike,
    logits_fn: Callable[[jax.Array], jax.Array],
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    with_entropy: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """Log-probs (and optionally entropies) of `tokens_BT` from hidden states, chunked over time.

    `logits_fn` maps hidden `[B, C, D]` to logits `[B, C, V]` (the LM head). Logits are divided by
    `temperature` (the PPO ratio uses the sampling distribution). The sequence is processed
    `chunk_size` positions at a time under `jax.checkpoint`, so neither the forward nor the backward
    pass keeps more than one `[B, chunk_size, V]` logits block alive (None: one block of the whole
    length). Any length works: a last partial chunk is padded (zero hidden states, token 0) and
    the padded positions are dropped from the result.

    Returns:
      `(logprobs_BT, entropy_BT or None)`, float32.
    """
    hidden_BTD, tokens_BT = jnp.asarray(hidden_BTD), jnp.asarray(tokens_BT)
    if hidden_BTD.shape[:2] != tokens_BT.shape:
        raise ValueError(
            f"logprobs_from_hidden: hidden{list(hidden_BTD.shape)} and "
            f"tokens{list(tokens_BT.shape)} must share [B, T]"
        )
    if temperature <= 0:
        raise ValueError(f"logprobs_from_hidden: temperature must be > 0, got {temperature}")
    batch, length, dim = hidden_BTD.shape
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"logprobs_from_hidden: chunk_size must be >= 1, got {chunk_size}")
    chunk = length if chunk_size is None else min(chunk_size, length)

    @jax.checkpoint
    def one_chunk(h_BCD: jax.Array, t_BC: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = logits_fn(h_BCD).astype(jnp.float32) / temperature
        ent = entropy_from_logits(logits) if with_entropy else jnp.zeros(t_BC.shape, jnp.float32)
        return selective_log_softmax(logits, t_BC), ent

    if chunk == length:
        logp, ent = one_chunk(hidden_BTD, tokens_BT)
    else:
        n = -(-length // chunk)
        pad = n * chunk - length
        hidden_BTD = jnp.pad(hidden_BTD, ((0, 0), (0, pad), (0, 0)))
        tokens_BT = jnp.pad(tokens_BT, ((0, 0), (0, pad)))
        h_NBCD = hidden_BTD.reshape(batch, n, chunk, dim).swapaxes(0, 1)
        t_NBC = tokens_BT.reshape(batch, n, chunk).swapaxes(0, 1)
        logp, ent = jax.lax.map(lambda xs: one_chunk(*xs), (h_NBCD, t_NBC))
        logp = logp.swapaxes(0, 1).reshape(batch, n * chunk)[:, :length]
        ent = ent.swapaxes(0, 1).reshape(batch, n * chunk)[:, :length]
    return logp, (ent if with_entropy else None)
