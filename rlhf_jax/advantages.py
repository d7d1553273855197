"""Advantage estimators: GAE and discounted returns as reverse `lax.scan`s, RLOO / GRPO group
baselines, REINFORCE++ whitening, and a registry selecting them by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from rlhf_jax.checks import check_same_shape
from rlhf_jax.ops import masked_sum, masked_whiten


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


# ------------------------------------------------------------------ critic-free estimators

GRPO_SCALES = ("group", "batch", "none")


def _grouped(where: str, rewards: ArrayLike, group_size: int, *, min_size: int) -> jax.Array:
    """Sequence rewards `[N * k]` (contiguous groups) as float32 `[N, k]`, with clear errors."""
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.ndim != 1:
        raise ValueError(
            f"{where}: rewards must be 1-D [num_prompts * group_size], got shape "
            f"{list(rewards.shape)}"
        )
    if not isinstance(group_size, int) or group_size < min_size:
        raise ValueError(f"{where}: group_size must be an integer >= {min_size}, got {group_size}")
    if rewards.shape[0] % group_size:
        raise ValueError(
            f"{where}: {rewards.shape[0]} rewards do not split into groups of {group_size}; "
            "pass num_prompts * group_size rewards, each prompt's completions contiguous"
        )
    return rewards.reshape(-1, group_size)


def rloo_advantages(rewards: ArrayLike, group_size: int) -> jax.Array:
    """REINFORCE leave-one-out advantages (Kool et al. 2019; Ahmadian et al. 2024).

    Each completion's baseline is the mean reward of the other `k - 1` completions of its prompt:
    `A_i = r_i - (sum_j r_j - r_i) / (k - 1)`.

    Args:
      rewards: float `[N * k]`, prompt `n`'s completions at rows `n*k .. n*k + k - 1`.
      group_size: `k >= 2` completions per prompt.
    Returns:
      float32 `[N * k]`.
    """
    r_NK = _grouped("rloo_advantages", rewards, group_size, min_size=2)
    baseline_NK = (jnp.sum(r_NK, axis=1, keepdims=True) - r_NK) / (group_size - 1)
    return (r_NK - baseline_NK).reshape(-1)


def grpo_advantages(
    rewards: ArrayLike,
    group_size: int,
    *,
    scale: Literal["group", "batch", "none"] = "group",
    eps: float = 1e-4,
) -> jax.Array:
    """Group-relative advantages (GRPO, Shao et al. 2024; TRL's `scale_rewards`).

    `A_i = (r_i - mean(group)) / (std + eps)`, where `std` is the standard deviation of the
    completion's group (`scale="group"`, GRPO), of all rewards in the batch (`"batch"`), or 1
    with no `eps` (`"none"`: Dr. GRPO, Liu et al. 2025). Standard deviations are unbiased (Bessel's
    correction, `n - 1` in the denominator) as `torch.std` computes them in TRL.

    Args:
      rewards: float `[N * k]` in contiguous groups.
      group_size: `k >= 2` completions per prompt (an unbiased std needs two).
      scale: "group" | "batch" | "none".
      eps: added to the standard deviation (TRL: 1e-4).
    Returns:
      float32 `[N * k]`.
    """
    if scale not in GRPO_SCALES:
        raise ValueError(f"grpo_advantages: unknown scale {scale!r}; choose one of {GRPO_SCALES}")
    r_NK = _grouped("grpo_advantages", rewards, group_size, min_size=2)
    centred_NK = r_NK - jnp.mean(r_NK, axis=1, keepdims=True)
    if scale == "group":
        centred_NK = centred_NK / (jnp.std(r_NK, axis=1, ddof=1, keepdims=True) + eps)
    elif scale == "batch":
        centred_NK = centred_NK / (jnp.std(r_NK, ddof=1) + eps)
    return centred_NK.reshape(-1)


def discounted_returns(rewards_BT: ArrayLike, mask_BT: ArrayLike, *, gamma: float) -> jax.Array:
    """Discounted reward-to-go `G_t = r_t + gamma * G_{t+1}` over the last (time) axis, by a reverse
    `lax.scan` (REINFORCE / REINFORCE++).

    Rewards outside `mask_BT` are treated as 0 and the returned returns are 0 there.

    Args:
      rewards_BT: float `[B, T]` per-token rewards.
      mask_BT: `[B, T]`, 1 on real response tokens.
      gamma: discount in [0, 1].
    Returns:
      float32 `[B, T]`.
    """
    check_same_shape("discounted_returns", rewards=rewards_BT, mask=mask_BT)
    if jnp.ndim(rewards_BT) != 2:
        raise ValueError(
            f"discounted_returns: rewards must be [B, T], got shape {list(jnp.shape(rewards_BT))}"
        )
    valid_BT = jnp.asarray(mask_BT) > 0
    rewards_TB = jnp.where(valid_BT, jnp.asarray(rewards_BT, jnp.float32), 0.0).T

    def step(carry_B: jax.Array, reward_B: jax.Array) -> tuple[jax.Array, jax.Array]:
        carry_B = reward_B + gamma * carry_B
        return carry_B, carry_B

    _, returns_TB = jax.lax.scan(step, jnp.zeros_like(rewards_TB[0]), rewards_TB, reverse=True)
    return jnp.where(valid_BT, returns_TB.T, 0.0)


def _last_valid_one_hot(mask_BT: jax.Array) -> jax.Array:
    """Bool `[B, T]`, True at the last position of each row where the mask is set."""
    valid = jnp.asarray(mask_BT) > 0
    length = valid.shape[-1]
    idx = jnp.arange(length, dtype=jnp.int32)
    last_B = jnp.max(jnp.where(valid, idx, -1), axis=-1)
    return idx[None, :] == last_B[:, None]


class AdvantageInputs(NamedTuple):
    """What an advantage estimator may use (`ADVANTAGE_ESTIMATORS`).

    Attributes:
      scores: float `[B]` sequence-level reward (reward model / reward functions, penalties
        applied). Rows are `N` groups of `group_size` contiguous completions.
      token_rewards: float `[B, T]` per-token reward besides the score, e.g. `-kl_coef * KL_t`
        (zeros when the KL is a loss term instead).
      mask: `[B, T]`, 1 on real response tokens (a prefix of each row).
      values: float `[B, T]` value estimates (only "gae" uses them), or None.
    """

    scores: jax.Array
    token_rewards: jax.Array
    mask: jax.Array
    values: jax.Array | None = None


def _token_rewards_with_score(inputs: AdvantageInputs) -> jax.Array:
    scores_B = jnp.asarray(inputs.scores, jnp.float32)
    at_end = _last_valid_one_hot(inputs.mask)
    rewards = jnp.asarray(inputs.token_rewards, jnp.float32) + jnp.where(
        at_end, scores_B[:, None], 0.0
    )
    return jnp.where(jnp.asarray(inputs.mask) > 0, rewards, 0.0)


def _broadcast_sequence(adv_B: jax.Array, returns_B: jax.Array, mask: jax.Array):
    valid = jnp.asarray(mask) > 0
    return jnp.where(valid, adv_B[:, None], 0.0), jnp.where(valid, returns_B[:, None], 0.0)


def _gae_estimator(inputs: AdvantageInputs, *, gamma: float, lam: float, **_):
    if inputs.values is None:
        raise ValueError("advantage estimator 'gae' needs value estimates (inputs.values)")
    valid = jnp.asarray(inputs.mask) > 0
    values = jnp.where(valid, jnp.asarray(inputs.values, jnp.float32), 0.0)
    advantages, returns = gae(_token_rewards_with_score(inputs), values, gamma=gamma, lam=lam)
    return jnp.where(valid, advantages, 0.0), jnp.where(valid, returns, 0.0)


def _sequence_rewards(inputs: AdvantageInputs) -> jax.Array:
    return jnp.asarray(inputs.scores, jnp.float32) + masked_sum(
        inputs.token_rewards, inputs.mask, axis=-1
    )


def _rloo_estimator(inputs: AdvantageInputs, *, group_size: int, **_):
    rewards_B = _sequence_rewards(inputs)
    return _broadcast_sequence(rloo_advantages(rewards_B, group_size), rewards_B, inputs.mask)


def _grpo_estimator(inputs: AdvantageInputs, *, group_size: int, scale: str, eps: float, **_):
    rewards_B = _sequence_rewards(inputs)
    adv_B = grpo_advantages(rewards_B, group_size, scale=scale, eps=eps)
    return _broadcast_sequence(adv_B, rewards_B, inputs.mask)


def _reinforce_pp_estimator(inputs: AdvantageInputs, *, gamma: float, **_):
    returns = discounted_returns(_token_rewards_with_score(inputs), inputs.mask, gamma=gamma)
    advantages = masked_whiten(returns, inputs.mask)
    return jnp.where(jnp.asarray(inputs.mask) > 0, advantages, 0.0), returns


def _reinforce_pp_baseline_estimator(
    inputs: AdvantageInputs, *, group_size: int, gamma: float, **_
):
    centred_B = grpo_advantages(inputs.scores, group_size, scale="none")
    return _reinforce_pp_estimator(inputs._replace(scores=centred_B), gamma=gamma)


#: Advantage estimators by name. Each maps `(AdvantageInputs, *, group_size, gamma, lam, scale,
#: eps)` to `(advantages_BT, returns_BT)`, float32 and 0 outside the mask:
#: - "gae": GAE over token rewards + score at the last token (not whitened; PPO whitens).
#: - "rloo": leave-one-out advantage of the sequence reward `score + sum_t token_rewards`,
#:   the same for every token of a completion.
#: - "grpo": group-relative advantage of the sequence reward (`scale` and `eps` as
#:   `grpo_advantages`), the same for every token.
#: - "reinforce++": discounted returns of token rewards + score, whitened over all valid tokens of
#:   the batch (`masked_whiten`: unbiased variance, `rsqrt(var + 1e-8)`; OpenRLHF uses the biased
#:   variance, a factor n / (n - 1) that vanishes for real batch sizes).
#: - "reinforce++-baseline": as "reinforce++" after subtracting each group's mean score.
#: For the sequence-level estimators `returns` holds the sequence reward on every token.
ADVANTAGE_ESTIMATORS: dict[str, Callable[..., tuple[jax.Array, jax.Array]]] = {
    "gae": _gae_estimator,
    "rloo": _rloo_estimator,
    "grpo": _grpo_estimator,
    "reinforce++": _reinforce_pp_estimator,
    "reinforce++-baseline": _reinforce_pp_baseline_estimator,
}


def estimate_advantages(
    name: str,
    inputs: AdvantageInputs,
    *,
    group_size: int = 1,
    gamma: float = 1.0,
    lam: float = 0.95,
    scale: Literal["group", "batch", "none"] = "group",
    eps: float = 1e-4,
) -> tuple[jax.Array, jax.Array]:
    """Runs the estimator registered under `name` in `ADVANTAGE_ESTIMATORS`.

    Args:
      name: "gae" | "rloo" | "grpo" | "reinforce++" | "reinforce++-baseline".
      inputs: scores `[B]`, token rewards `[B, T]`, mask `[B, T]`, values (gae only).
      group_size: completions per prompt (rloo, grpo, reinforce++-baseline; contiguous groups).
      gamma, lam: discount (gae, reinforce++) and GAE lambda.
      scale, eps: GRPO's standard-deviation scaling (see `grpo_advantages`).
    Returns:
      `(advantages_BT, returns_BT)`, float32, 0 outside the mask.
    """
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(
            f"unknown advantage estimator {name!r}; choose one of {tuple(ADVANTAGE_ESTIMATORS)}"
        )
    check_same_shape("estimate_advantages", token_rewards=inputs.token_rewards, mask=inputs.mask)
    batch = jnp.shape(inputs.mask)[0]
    if jnp.shape(inputs.scores) != (batch,):
        raise ValueError(
            f"estimate_advantages: scores must be [B]=[{batch}], got "
            f"{list(jnp.shape(inputs.scores))}"
        )
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"estimate_advantages: gamma must be in [0, 1], got {gamma}")
    return ADVANTAGE_ESTIMATORS[name](
        inputs, group_size=group_size, gamma=gamma, lam=lam, scale=scale, eps=eps
    )
