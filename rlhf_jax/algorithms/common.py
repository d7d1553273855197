"""Pieces the algorithm modules compose: the KL in the reward, group-baseline advantages and
the per-token clipped objective with an optional KL loss term."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax.advantages import AdvantageInputs, estimate_advantages
from rlhf_jax.core.config import Advantages
from rlhf_jax.losses import LOSS_AGGREGATIONS, AggregationMode, aggregate_loss, ppo_policy_loss
from rlhf_jax.ops import masked_mean, masked_sum
from rlhf_jax.rewards import KL_ESTIMATORS, kl_penalty


def check_kl_estimator(name: str, value: str) -> None:
    if value not in KL_ESTIMATORS:
        raise ValueError(f"{name} must be one of {KL_ESTIMATORS}, got {value!r}")


def check_clip(name: str, value: float | None) -> None:
    if value is not None and not 0.0 < value:
        raise ValueError(f"{name} must be > 0, got {value}")


def check_aggregation(value: str) -> None:
    if value not in LOSS_AGGREGATIONS:
        raise ValueError(f"loss_aggregation must be one of {LOSS_AGGREGATIONS}, got {value!r}")


def standardize(x_B: jax.Array, eps: float = 1e-8) -> jax.Array:
    """`(x - mean) / (std + eps)` with the unbiased std (`torch.std`), over a 1-D batch."""
    return (x_B - jnp.mean(x_B)) / (jnp.std(x_B, ddof=1) + eps)


def reward_kl(
    roll: Any, kl_coef: jax.Array, estimator: str, *, on_sequence: bool = False, active: bool = True
) -> tuple[jax.Array, jax.Array]:
    """The KL penalty in the reward: `(token_rewards [B, T], kl [B])`.

    Per token (`-kl_coef * KL_t`, `kl = sum_t KL_t`), or with `on_sequence` the estimator applied
    to the sequence log-ratio `sum_t log pi / pi_ref`, as one reward on the last token. With
    `active=False` (no KL coefficient and no target) the token rewards are zeros; `kl` is still
    measured.
    """
    gen = roll.generation
    kl_BT = kl_penalty(roll.old_logprobs, roll.ref_logprobs, estimator)
    kl_BT = jnp.where(gen.mask, kl_BT, 0.0)
    if on_sequence:
        kl_B = kl_penalty(
            masked_sum(roll.old_logprobs, gen.mask, axis=1),
            masked_sum(roll.ref_logprobs, gen.mask, axis=1),
            estimator,
        )
        last_BT = jnp.arange(gen.tokens.shape[1])[None, :] == gen.sequence_lengths[:, None]
        token_rewards = jnp.where(last_BT, -kl_coef * kl_B[:, None], 0.0)
    else:
        kl_B = jnp.sum(kl_BT, axis=1)
        token_rewards = -kl_coef * kl_BT
    if not active:
        token_rewards = jnp.zeros_like(token_rewards)
    return token_rewards, kl_B


def group_advantages(
    estimator: str,
    roll: Any,
    scores_B: jax.Array,
    token_rewards_BT: jax.Array,
    kl_B: jax.Array,
    *,
    group_size: int,
    **kwargs: Any,
) -> Advantages:
    """`Advantages` from `advantages.estimate_advantages(estimator, ...)` (a group baseline or
    REINFORCE++'s returns) on the scores plus the token rewards."""
    mask = roll.generation.mask
    advantages, returns = estimate_advantages(
        estimator,
        AdvantageInputs(scores=scores_B, token_rewards=token_rewards_BT, mask=mask),
        group_size=group_size,
        **kwargs,
    )
    non_score = masked_sum(token_rewards_BT, mask, axis=1)
    return Advantages(advantages, returns, scores_B, kl_B, non_score)


class TokenClip(NamedTuple):
    """Options of the per-token clipped objective (`clipped_objective`)."""

    clip_low: float
    clip_high: float | None  # None: clip_low
    aggregation: AggregationMode
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    dual_clip: float | None = None


def clipped_objective(
    logprobs_BT: jax.Array,
    mb: Any,
    token_scale: jax.Array | float,
    options: TokenClip,
    norm_length: int,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-token PPO-clip with the range `[1 - clip_low, 1 + clip_high]` (and the dual clip),
    plus `kl_coef * KL_t(policy || ref)` with `kl_estimator`, reduced by `aggregation` and
    multiplied by `token_scale` (1, except for "dapo" where it turns a micro-batch token mean into
    the minibatch token mean). `norm_length`: "seq-mean-token-sum-norm"'s constant (the response
    length, so cutting padded columns changes nothing). aux: `ppo_policy_loss`'s, `pg_loss`, and
    `kl_loss` / `kl_mean` with a KL term."""
    o = options
    pg_loss, aux = ppo_policy_loss(
        logprobs_BT, mb.old_logprobs, mb.advantages, mb.mask, clip_eps=o.clip_low,
        clip_eps_high=o.clip_high, dual_clip=o.dual_clip, aggregation=o.aggregation,
        norm_length=norm_length,
    )  # fmt: skip
    pg_loss = pg_loss * token_scale
    aux = {**aux, "pg_loss": pg_loss}
    loss = pg_loss
    if o.kl_coef != 0:
        kl_BT = kl_penalty(logprobs_BT, mb.ref_logprobs, o.kl_estimator)
        kl_loss = aggregate_loss(kl_BT, mb.mask, o.aggregation, norm_length=norm_length)
        kl_loss = kl_loss * token_scale
        loss = loss + o.kl_coef * kl_loss
        aux["kl_loss"] = kl_loss
        aux["kl_mean"] = masked_mean(kl_BT, mb.mask)
    return loss, aux


class TokenClipObjective:
    """Mixin for an algorithm config whose policy objective is `clipped_objective` with the
    options its `token_clip()` returns."""

    def token_clip(self) -> TokenClip:
        raise NotImplementedError

    def policy_objective(
        self, logprobs_BT: jax.Array, mb: Any, token_scale: jax.Array, algo_state: Any
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        options = self.token_clip()
        return clipped_objective(logprobs_BT, mb, token_scale, options, self.response_length)
