"""PPO as TRL's PPOTrainer, with PPO-Penalty ("Secrets of RLHF"; Schulman et al. 2017).

Four models: the policy (trained), a frozen reference (the initial policy), a reward model and a
value model (trained; usually initialised from the reward model), or instead of the value model a
value head on the policy's trunk (`RLModels(value=None)`). The rewards are KL-shaped per token
with the score at the last (or TRL's one-after-last) token; advantages come from GAE on the
values, whitened over the batch; the loss is the clipped surrogate (or PPO-Penalty's `-ratio * A
+ beta * KL(pi_old || pi)` with beta adapted toward a target KL) plus `vf_coef` times the clipped
value loss.

Metrics carry TRL's names (`objective/kl`, `policy/approxkl_avg`, `val/ratio`, ...). Per-token
averages are masked means over the response tokens. TRL 0.17 takes some of them over every
position, padding included: `policy/approxkl_avg`, `val/ratio` and `policy/entropy_avg` are plain
means there, and its `objective/entropy` adds -1 for each padded position (its INVALID_LOGPROB).
Where no row stops early the values agree; on padded batches TRL's are diluted by the padding.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp

from rlhf_jax.advantages import gae
from rlhf_jax.algorithms.common import TokenClip, clipped_objective
from rlhf_jax.core.config import Advantages, RLConfig
from rlhf_jax.losses import AggregationMode, adapt_penalty_beta, ppo_penalty_loss
from rlhf_jax.ops import masked_mean, masked_sum, masked_whiten, response_mask
from rlhf_jax.rewards import score_indices, shape_rewards


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOConfig(RLConfig):
    """PPO hyperparameters. Defaults equal TRL's `PPOConfig` where TRL has the option.

    Sampling, the update loop's sizes, the optimiser, its schedule and PPO-ptx (`ptx_coef`) are
    `RLConfig`'s options; the rest are PPO's own. One completion per prompt.

    Attributes:
      batch_size: prompts (episodes) per iteration.
      score_position: "last_token" (default) or "after_last_token" (TRL's exact placement);
        values are trained up to the same position.
      kl_coef: initial KL coefficient. kl_estimator: "k1" | "k2" | "k3".
      kl_target, kl_horizon: when `kl_target` is set the coefficient is adapted (Ziegler et al.).
      whiten_rewards: whiten per-token rewards (without shifting the mean) before GAE.
      whiten_advantages: whiten advantages over the whole batch (TRL always does).
      gamma, lam: GAE discount and lambda.
      num_ppo_epochs: passes over each batch.
      policy_loss: "clip" (the clipped surrogate, `ppo_policy_loss`) or "penalty" (PPO-Penalty:
        `-ratio * A + beta * KL(pi_old || pi)` without a clip, `ppo_penalty_loss`).
      cliprange, cliprange_high, dual_clip: policy clipping (see `ppo_policy_loss`).
      penalty_beta: PPO-Penalty's initial beta. penalty_kl_target: after each iteration's update
        beta is halved when the update's mean KL estimate is below `target / 1.5` and doubled
        above `target * 1.5` (`adapt_penalty_beta`).
      cliprange_value: value clipping range. vf_coef: value loss weight.
      loss_aggregation: how the policy loss reduces over tokens (see `aggregate_loss`).
      value_learning_rate: the value optimiser's peak learning rate (default: `learning_rate`).
    """

    has_critic: ClassVar[bool] = True
    epochs_field: ClassVar[str] = "num_ppo_epochs"

    batch_size: int
    score_position: Literal["last_token", "after_last_token"] = "last_token"
    kl_coef: float = 0.05
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    kl_target: float | None = None
    kl_horizon: float = 10000.0
    whiten_rewards: bool = False
    whiten_advantages: bool = True
    gamma: float = 1.0
    lam: float = 0.95
    num_ppo_epochs: int = 4
    policy_loss: Literal["clip", "penalty"] = "clip"
    cliprange: float = 0.2
    cliprange_high: float | None = None
    dual_clip: float | None = None
    penalty_beta: float = 1.0
    penalty_kl_target: float = 0.01
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    loss_aggregation: AggregationMode = "token-mean"
    value_learning_rate: float | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"{self.batch_description} must be a positive multiple")
        if not 0.0 <= self.lam <= 1.0 or not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma and lam must be in [0, 1], got {self.gamma}, {self.lam}")
        if self.policy_loss not in ("clip", "penalty"):
            raise ValueError(f"policy_loss must be 'clip' or 'penalty', got {self.policy_loss!r}")
        if self.penalty_beta <= 0 or self.penalty_kl_target <= 0:
            raise ValueError(
                f"penalty_beta and penalty_kl_target must be > 0, got {self.penalty_beta}, "
                f"{self.penalty_kl_target}"
            )
        super().__post_init__()

    @property
    def num_prompts(self) -> int:
        return self.batch_size

    @property
    def batch_description(self) -> str:
        return f"batch_size={self.batch_size}"

    @property
    def score_extra_columns(self) -> int:
        return int(self.score_position == "after_last_token")

    def value_mask(self, sequence_lengths: jax.Array, length: int) -> jax.Array:
        """Positions whose values are trained: up to and including the score position."""
        return response_mask(score_indices(sequence_lengths, length, self.score_position), length)

    def advantages(self, roll: Any, scores_B: jax.Array, kl_coef: jax.Array) -> Advantages:
        """Scores -> KL-shaped per-token rewards -> GAE -> whitened advantages."""
        gen = roll.generation
        value_mask = self.value_mask(gen.sequence_lengths, gen.tokens.shape[1])
        shaping = dict(estimator=self.kl_estimator, score_position=self.score_position)
        logprobs = (roll.old_logprobs, roll.ref_logprobs)
        rewards, kl = shape_rewards(
            scores_B, *logprobs, gen.sequence_lengths, kl_coef=kl_coef, **shaping
        )
        if self.whiten_rewards:
            rewards = masked_whiten(rewards, value_mask, shift_mean=False)
        rewards = jnp.where(value_mask, rewards, 0.0)
        advantages, returns = gae(rewards, roll.values, gamma=self.gamma, lam=self.lam)
        if self.whiten_advantages:
            advantages = masked_whiten(advantages, gen.mask)
        advantages = jnp.where(gen.mask, advantages, 0.0)
        kl_B = masked_sum(kl, gen.mask, axis=1)
        mask_f = gen.mask.astype(jnp.float32)
        metrics = {
            "val/values_mean": masked_mean(roll.values, value_mask),
            "val/returns_mean": masked_mean(returns, value_mask),
            "nonfinite/rewards": jnp.sum(~jnp.isfinite(rewards) * mask_f).astype(jnp.float32),
        }
        return Advantages(
            advantages, returns, scores_B, kl_B, -kl_coef * kl_B, rewards=rewards, metrics=metrics
        )

    def policy_objective(
        self, logprobs_BT: jax.Array, mb: Any, token_scale: jax.Array, algo_state: Any
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        if self.policy_loss == "clip":
            options = TokenClip(
                self.cliprange, self.cliprange_high, self.loss_aggregation,
                dual_clip=self.dual_clip,
            )  # fmt: skip
            return clipped_objective(logprobs_BT, mb, 1.0, options, self.response_length)
        return ppo_penalty_loss(
            logprobs_BT, mb.old_logprobs, mb.advantages, mb.mask, beta=algo_state,
            aggregation=self.loss_aggregation, norm_length=self.response_length,
        )  # fmt: skip

    def init_algo_state(self) -> jax.Array | None:
        """PPO-Penalty's beta (float32 scalar); None with the clip."""
        if self.policy_loss != "penalty":
            return None
        return jnp.asarray(self.penalty_beta, jnp.float32)

    def after_update(
        self, algo_state: Any, metrics: dict[str, jax.Array]
    ) -> tuple[Any, dict[str, jax.Array]]:
        """PPO-Penalty: logs the beta this update used, then adapts it to the update's KL."""
        if algo_state is None:
            return algo_state, metrics
        metrics = {**metrics, "policy/penalty_beta": algo_state}
        beta = adapt_penalty_beta(algo_state, metrics["policy/penalty_kl"], self.penalty_kl_target)
        return beta, metrics
