"""KL estimators, score placement, missing-stop penalty and KL-coefficient controllers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple, Protocol

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from rlhf_jax.checks import check_same_shape

KL_ESTIMATORS = ("k1", "k2", "k3")
SCORE_POSITIONS = ("last_token", "after_last_token")


def kl_penalty(
    logprobs: ArrayLike, ref_logprobs: ArrayLike, estimator: Literal["k1", "k2", "k3"] = "k1"
) -> jax.Array:
    """Per-token estimate of KL(policy || reference) from sampled-token log-probs (Schulman 2020).

    With `logr = ref_logprobs - logprobs`: k1 = -logr, k2 = logr**2 / 2, k3 = exp(logr) - 1 - logr.
    Positions where both hold `INVALID_LOGPROB` give exactly 0 for every estimator.

    Args:
      logprobs, ref_logprobs: float `[...]` of equal shape.
      estimator: "k1" (unbiased, TRL default), "k2" (biased, non-negative, low variance) or
        "k3" (unbiased, non-negative).
    Returns:
      float32 `[...]`.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(
            f"kl_penalty: unknown estimator {estimator!r}; choose one of {KL_ESTIMATORS}"
        )
    check_same_shape("kl_penalty", logprobs=logprobs, ref_logprobs=ref_logprobs)
    logr = jnp.asarray(ref_logprobs, jnp.float32) - jnp.asarray(logprobs, jnp.float32)
    if estimator == "k1":
        return -logr
    if estimator == "k2":
        return 0.5 * jnp.square(logr)
    return jnp.expm1(logr) - logr


def score_indices(
    sequence_lengths: ArrayLike,
    length: int,
    score_position: Literal["last_token", "after_last_token"] = "last_token",
) -> jax.Array:
    """Index at which a sequence-level score is added, int32 `[B]`.

    "last_token" places it on the last real response token (`sequence_lengths`); "after_last_token"
    reproduces TRL: one position later when that still fits in `length`, else the last token.
    """
    if score_position not in SCORE_POSITIONS:
        raise ValueError(
            f"unknown score_position {score_position!r}; choose one of {SCORE_POSITIONS}"
        )
    lengths = jnp.asarray(sequence_lengths, jnp.int32)
    if score_position == "last_token":
        return lengths
    return jnp.where(lengths + 1 < length, lengths + 1, lengths)


def shape_rewards(
    scores: ArrayLike,
    logprobs: ArrayLike,
    ref_logprobs: ArrayLike,
    sequence_lengths: ArrayLike,
    *,
    kl_coef: float | jax.Array,
    estimator: Literal["k1", "k2", "k3"] = "k1",
    score_position: Literal["last_token", "after_last_token"] = "last_token",
) -> tuple[jax.Array, jax.Array]:
    """Per-token RLHF reward: `-kl_coef * KL_t`, plus the sequence score at one position.

    Args:
      scores: float `[B]` sequence-level scores (reward model output, penalties applied).
      logprobs, ref_logprobs: float `[B, T]` sampled-token log-probs, `INVALID_LOGPROB` on padding.
      sequence_lengths: int `[B]` index of the last real response token.
      kl_coef: scalar (may be traced, e.g. from an adaptive controller).
      estimator: KL estimator, see `kl_penalty`.
      score_position: see `score_indices`.
    Returns:
      `(rewards_BT, kl_BT)`, float32. `-kl_coef * kl_BT` is TRL's `non_score_reward`.
    """
    check_same_shape("shape_rewards", logprobs=logprobs, ref_logprobs=ref_logprobs)
    scores = jnp.asarray(scores, jnp.float32)
    batch, length = jnp.shape(logprobs)
    if scores.shape != (batch,):
        raise ValueError(f"shape_rewards: scores must be [B]=[{batch}], got {list(scores.shape)}")
    kl = kl_penalty(logprobs, ref_logprobs, estimator)
    at = score_indices(sequence_lengths, length, score_position)
    one_hot = jnp.arange(length, dtype=jnp.int32)[None, :] == at[:, None]
    rewards = -jnp.asarray(kl_coef, jnp.float32) * kl + jnp.where(one_hot, scores[:, None], 0.0)
    return rewards, kl


def apply_missing_stop_penalty(
    scores: ArrayLike, contains_stop: ArrayLike, penalty: float | None
) -> jax.Array:
    """Subtracts `penalty` from the score of every row without a stop token (TRL's
    `missing_eos_penalty`). `None` leaves scores unchanged."""
    scores = jnp.asarray(scores, jnp.float32)
    if penalty is None:
        return scores
    return scores - jnp.where(jnp.asarray(contains_stop, bool), 0.0, float(penalty))


def check_missing_stop_penalty(penalty: float | None, stop_token_ids: tuple[int, ...]) -> None:
    """Config check: a missing-stop penalty needs stop tokens, or every row would count as
    unfinished and be penalised."""
    if penalty is not None and not stop_token_ids:
        raise ValueError(
            f"missing_eos_penalty={penalty} is set but stop_token_ids is empty, so every response "
            "would count as unfinished and be penalised; set stop_token_ids (e.g. the "
            "tokenizer's EOS id) or leave missing_eos_penalty unset"
        )


# ----------------------------------------------------------------------------- KL controllers


class KLState(NamedTuple):
    """State of a KL-coefficient controller: the current coefficient (float32 scalar)."""

    kl_coef: jax.Array


class KLUpdateFn(Protocol):
    def __call__(self, state: KLState, observed_kl: ArrayLike, n_steps: ArrayLike) -> KLState: ...


class KLController(NamedTuple):
    """A pure controller, optax-style: `init() -> state`, `update(state, kl, n_steps) -> state`."""

    init: Callable[[], KLState]
    update: KLUpdateFn


def fixed_kl_controller(kl_coef: float) -> KLController:
    """A constant KL coefficient with the adaptive controller's interface."""

    def init() -> KLState:
        return KLState(kl_coef=jnp.asarray(kl_coef, jnp.float32))

    def update(state: KLState, observed_kl: ArrayLike, n_steps: ArrayLike) -> KLState:
        del observed_kl, n_steps
        return state

    return KLController(init, update)


def adaptive_kl_controller(init_kl_coef: float, *, target: float, horizon: float) -> KLController:
    """Adaptive KL coefficient of Ziegler et al. (2019).

    `error = clip(observed_kl / target - 1, -0.2, 0.2)`;
    `kl_coef *= 1 + error * n_steps / horizon`, where `n_steps` is the number of samples
    (episodes) seen since the last update.
    """
    if target <= 0 or horizon <= 0:
        raise ValueError(f"adaptive KL needs target > 0 and horizon > 0, got {target}, {horizon}")

    def init() -> KLState:
        return KLState(kl_coef=jnp.asarray(init_kl_coef, jnp.float32))

    def update(state: KLState, observed_kl: ArrayLike, n_steps: ArrayLike) -> KLState:
        error = jnp.clip(jnp.asarray(observed_kl, jnp.float32) / target - 1.0, -0.2, 0.2)
        mult = 1.0 + error * jnp.asarray(n_steps, jnp.float32) / horizon
        return KLState(kl_coef=state.kl_coef * mult)

    return KLController(init, update)
