"""Advantage estimators: GAE as a reverse `lax.scan` (more estimators live here as they land)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from rlhf_jax._checks import check_same_shape


def gae(
    rewards: ArrayLike, values: ArrayLike, *, gamma: float, lam: float
) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation (Schulman et al. 2016) over the last (time) axis.

    `delta_t = r_t + gamma * V_{t+1} - V_t` with `V_T = 0` after the last step, and
    `A_t = delta_t + gamma * lam * A_{t+1}`, computed by a reverse `lax.scan`.
    As in TRL there is no masking inside: callers zero rewards and values on padding beforehand and
    mask advantages afterwards.

    Args:
      rewards, values: float `[B, T]`.
    Returns:
      `(advantages_BT, returns_BT)` float32, with `returns = advantages + values`.
    """
    check_same_shape("gae", rewards=rewards, values=values)
    rewards_TB = jnp.asarray(rewards, jnp.float32).T
    values_TB = jnp.asarray(values, jnp.float32).T
    next_values_TB = jnp.concatenate([values_TB[1:], jnp.zeros_like(values_TB[:1])], axis=0)
    deltas_TB = rewards_TB + gamma * next_values_TB - values_TB

    def step(carry: jax.Array, delta_B: jax.Array) -> tuple[jax.Array, jax.Array]:
        advantage_B = delta_B + gamma * lam * carry
        return advantage_B, advantage_B

    _, advantages_TB = jax.lax.scan(step, jnp.zeros_like(deltas_TB[0]), deltas_TB, reverse=True)
    advantages = advantages_TB.T
    return advantages, advantages + values_TB.T
