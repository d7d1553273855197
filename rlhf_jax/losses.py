"""Policy, value, language-model and preference losses. Each returns `(loss, aux)` or a scalar."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from rlhf_jax.checks import check_same_shape
from rlhf_jax.ops import masked_mean, masked_sum

LOSS_AGGREGATIONS = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)
AggregationMode = Literal[
    "token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"
]


def aggregate_loss(
    per_token_loss_BT: ArrayLike,
    mask_BT: ArrayLike,
    mode: AggregationMode = "token-mean",
    *,
    norm_length: float | None = None,
) -> jax.Array:
    """Reduces a per-token loss `[B, T]` to a scalar (float32).

    - "token-mean": mean over all valid tokens of the batch (PPO / DAPO).
    - "seq-mean-token-mean": mean over tokens within each sequence, then over sequences (GRPO).
    - "seq-mean-token-sum": sum over tokens within each sequence, then mean over sequences.
    - "seq-mean-token-sum-norm": token sum divided by a constant `norm_length` (default `T`), then
      mean over sequences (Dr. GRPO).
    Sequences without a valid token contribute 0 to sequence means.
    """
    check_same_shape("aggregate_loss", per_token_loss=per_token_loss_BT, mask=mask_BT)
    if mode == "token-mean":
        return masked_mean(per_token_loss_BT, mask_BT)
    seq_sum_B = masked_sum(per_token_loss_BT, mask_BT, axis=-1)
    if mode == "seq-mean-token-mean":
        count_B = jnp.sum(jnp.asarray(mask_BT, jnp.float32) > 0, axis=-1)
        return jnp.mean(seq_sum_B / jnp.maximum(count_B, 1.0))
    if mode == "seq-mean-token-sum":
        return jnp.mean(seq_sum_B)
    if mode == "seq-mean-token-sum-norm":
        norm = jnp.shape(per_token_loss_BT)[-1] if norm_length is None else norm_length
        return jnp.mean(seq_sum_B) / norm
    raise ValueError(f"aggregate_loss: unknown mode {mode!r}; choose one of {LOSS_AGGREGATIONS}")


def ppo_policy_loss(
    logprobs: ArrayLike,
    old_logprobs: ArrayLike,
    advantages: ArrayLike,
    mask: ArrayLike,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    aggregation: AggregationMode = "token-mean",
    norm_length: float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO clipped surrogate loss (Schulman et al. 2017), TRL semantics.

    `ratio = exp(logprobs - old_logprobs)`; per token
    `max(-A * ratio, -A * clip(ratio, 1 - clip_eps, 1 + clip_eps_high))`.
    With `dual_clip = c > 1` (Ye et al. 2020), tokens with A < 0 are further bounded by `-A * c`.

    Args:
      logprobs: float `[B, T]` current log-probs (differentiated).
      old_logprobs: float `[B, T]` log-probs at rollout time.
      advantages: float `[B, T]`.
      mask: `[B, T]`, 1 on real response tokens.
      clip_eps, clip_eps_high: lower/upper clip ranges (`clip_eps_high` defaults to `clip_eps`).
      dual_clip: optional lower bound constant c > 1 for negative advantages.
      aggregation, norm_length: see `aggregate_loss` (`norm_length` keeps
        "seq-mean-token-sum-norm" independent of how many padded columns `T` has).
    Returns:
      `(loss, aux)`; aux: `clipfrac` (fraction of tokens where the clipped term is active),
      `approx_kl` (0.5 * masked mean of the squared log-ratio), `ratio_mean`, `ratio_var`,
      `ratio_max`, `dual_clipfrac`, all float32 scalars over masked-in tokens.
    """
    check_same_shape(
        "ppo_policy_loss",
        logprobs=logprobs,
        old_logprobs=old_logprobs,
        advantages=advantages,
        mask=mask,
    )
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"ppo_policy_loss: dual_clip must be > 1, got {dual_clip}")
    high = clip_eps if clip_eps_high is None else clip_eps_high
    adv = jnp.asarray(advantages, jnp.float32)
    log_ratio = jnp.asarray(logprobs, jnp.float32) - jnp.asarray(old_logprobs, jnp.float32)
    ratio = jnp.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + high)
    per_token = jnp.maximum(unclipped, clipped)
    dual_active = jnp.zeros_like(per_token, dtype=bool)
    if dual_clip is not None:
        bound = -adv * dual_clip
        dual_active = (adv < 0) & (per_token > bound)
        per_token = jnp.where(adv < 0, jnp.minimum(per_token, bound), per_token)
    loss = aggregate_loss(per_token, mask, aggregation, norm_length=norm_length)
    ratio_mean = masked_mean(ratio, mask)
    aux = {
        "clipfrac": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
        "dual_clipfrac": masked_mean(dual_active.astype(jnp.float32), mask),
        "approx_kl": 0.5 * masked_mean(jnp.square(log_ratio), mask),
        "ratio_mean": ratio_mean,
        "ratio_var": masked_mean(jnp.square(ratio - ratio_mean), mask),
        "ratio_max": jnp.max(jnp.where(jnp.asarray(mask) > 0, ratio, -jnp.inf)),
    }
    return loss, aux


def ppo_penalty_loss(
    logprobs: ArrayLike,
    old_logprobs: ArrayLike,
    advantages: ArrayLike,
    mask: ArrayLike,
    *,
    beta: ArrayLike,
    aggregation: AggregationMode = "token-mean",
    norm_length: float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO's adaptive-KL-penalty surrogate (Schulman et al. 2017, section 4; "Secrets of RLHF").

    Per token `-A * ratio + beta * kl`, `ratio = exp(logprobs - old_logprobs)`, with
    `kl = (ratio - 1) - log(ratio)` the k3 estimate of KL(pi_old || pi) from tokens sampled by
    pi_old (non-negative, unbiased, gradient 0 at ratio 1). No clipping: the penalty keeps the new
    policy near the old one, and `adapt_penalty_beta` steers `beta` toward a target KL.

    Args:
      logprobs, old_logprobs, advantages, mask: as in `ppo_policy_loss` (`[B, T]`).
      beta: float scalar, the penalty coefficient (not differentiated).
      aggregation, norm_length: see `aggregate_loss`.
    Returns:
      `(loss, aux)`; aux as `ppo_policy_loss` (`clipfrac` and `dual_clipfrac` are 0) plus
      `penalty_kl`, the masked mean of the per-token KL estimate.
    """
    check_same_shape(
        "ppo_penalty_loss",
        logprobs=logprobs,
        old_logprobs=old_logprobs,
        advantages=advantages,
        mask=mask,
    )
    adv = jnp.asarray(advantages, jnp.float32)
    log_ratio = jnp.asarray(logprobs, jnp.float32) - jnp.asarray(old_logprobs, jnp.float32)
    ratio = jnp.exp(log_ratio)
    kl = (ratio - 1.0) - log_ratio
    beta = jax.lax.stop_gradient(jnp.asarray(beta, jnp.float32))
    loss = aggregate_loss(-adv * ratio + beta * kl, mask, aggregation, norm_length=norm_length)
    ratio_mean = masked_mean(ratio, mask)
    zero = jnp.zeros((), jnp.float32)
    aux = {
        "clipfrac": zero,
        "dual_clipfrac": zero,
        "approx_kl": 0.5 * masked_mean(jnp.square(log_ratio), mask),
        "ratio_mean": ratio_mean,
        "ratio_var": masked_mean(jnp.square(ratio - ratio_mean), mask),
        "ratio_max": jnp.max(jnp.where(jnp.asarray(mask) > 0, ratio, -jnp.inf)),
        "penalty_kl": masked_mean(kl, mask),
    }
    return loss, aux


def adapt_penalty_beta(beta: ArrayLike, kl: ArrayLike, target: float) -> jax.Array:
    """The PPO-penalty coefficient after one update (Schulman et al. 2017): halved when the
    measured KL is below `target / 1.5`, doubled when above `target * 1.5`, else kept."""
    beta = jnp.asarray(beta, jnp.float32)
    kl = jnp.asarray(kl, jnp.float32)
    return jnp.where(kl < target / 1.5, beta / 2, jnp.where(kl > target * 1.5, beta * 2, beta))


def ppo_value_loss(
    values: ArrayLike,
    old_values: ArrayLike,
    returns: ArrayLike,
    mask: ArrayLike,
    *,
    clip_range: float | None = 0.2,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped value loss: `0.5 * masked_mean(max((V - R)^2, (V_clip - R)^2))` (TRL).

    `V_clip = old_values + clip(values - old_values, -clip_range, clip_range)`; `clip_range=None`
    gives the plain squared error. All inputs float `[B, T]`, `mask` 1 on valid positions.

    Returns:
      `(loss, aux)`; aux: `clipfrac` (fraction where the clipped error is larger), `values_mean`.
    """
    check_same_shape(
        "ppo_value_loss", values=values, old_values=old_values, returns=returns, mask=mask
    )
    v = jnp.asarray(values, jnp.float32)
    old = jnp.asarray(old_values, jnp.float32)
    ret = jnp.asarray(returns, jnp.float32)
    err_unclipped = jnp.square(v - ret)
    if clip_range is None:
        err_clipped = err_unclipped
    else:
        err_clipped = jnp.square(old + jnp.clip(v - old, -clip_range, clip_range) - ret)
    loss = 0.5 * masked_mean(jnp.maximum(err_unclipped, err_clipped), mask)
    aux = {
        "clipfrac": masked_mean((err_clipped > err_unclipped).astype(jnp.float32), mask),
        "values_mean": masked_mean(v, mask),
    }
    return loss, aux


def lm_loss(logprobs: ArrayLike, mask: ArrayLike) -> jax.Array:
    """Masked negative log-likelihood: `-masked_mean(logprobs, mask)` (SFT, PPO-ptx, RM LM term)."""
    return -masked_mean(logprobs, mask)


def bradley_terry_loss(
    chosen_scores: ArrayLike, rejected_scores: ArrayLike, *, margin: ArrayLike | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Pairwise reward-model loss `-mean(log sigmoid(r_chosen - r_rejected - margin))`.

    Args:
      chosen_scores, rejected_scores: float `[B]`.
      margin: optional `[B]` or scalar margin (Llama 2).
    Returns:
      `(loss, aux)`; aux: `accuracy` (fraction with r_chosen > r_rejected), `margin_mean`.
    """
    check_same_shape("bradley_terry_loss", chosen=chosen_scores, rejected=rejected_scores)
    diff = jnp.asarray(chosen_scores, jnp.float32) - jnp.asarray(rejected_scores, jnp.float32)
    shifted = diff if margin is None else diff - jnp.asarray(margin, jnp.float32)
    loss = -jnp.mean(jax.nn.log_sigmoid(shifted))
    aux = {"accuracy": jnp.mean((diff > 0).astype(jnp.float32)), "margin_mean": jnp.mean(diff)}
    return loss, aux
