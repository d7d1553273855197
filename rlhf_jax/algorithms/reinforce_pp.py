"""REINFORCE++ (Hu 2025) as OpenRLHF's `reinforce` / `reinforce_baseline` estimators."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp

from rlhf_jax.algorithms.common import (
    TokenClip,
    TokenClipObjective,
    check_aggregation,
    check_clip,
    check_kl_estimator,
    group_advantages,
    reward_kl,
)
from rlhf_jax.core.config import Advantages, GroupedConfig
from rlhf_jax.losses import AggregationMode

ESTIMATORS = ("reinforce++", "reinforce++-baseline")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReinforcePPConfig(TokenClipObjective, GroupedConfig):
    """REINFORCE++: `num_prompts` prompts x `n_samples_per_prompt` completions per iteration.

    The score (clipped to +-`reward_clip_range`) goes on the last real token, `-kl_coef * KL_t`
    on every token; advantages are the discounted returns whitened over all valid tokens of the
    batch. "reinforce++-baseline" first subtracts each prompt's mean score (OpenRLHF subtracts it
    before clipping; here the raw score is clipped first). The loss is per-token PPO-clip,
    optionally plus `kl_loss_coef` times a KL loss term (OpenRLHF's `use_kl_loss`).

    Attributes (OpenRLHF names and defaults):
      n_samples_per_prompt: completions per prompt (>= 2 for the baseline variant).
      advantage_estimator: "reinforce++" | "reinforce++-baseline".
      kl_coef (OpenRLHF `init_kl_coef`), kl_estimator, kl_target, kl_horizon: KL in the reward.
      kl_loss_coef: weight of a KL loss term with the same estimator (0 = off).
      gamma: discount of the returns.
      num_epochs (OpenRLHF `max_epochs`): passes over each batch.
      eps_clip, eps_clip_high: clip ranges (`eps_clip_high` defaults to `eps_clip`).
      reward_clip_range: clip the score to +-this (None: off).
      loss_aggregation: see `aggregate_loss`.
    """

    group_size_field: ClassVar[str] = "n_samples_per_prompt"
    epochs_field: ClassVar[str] = "num_epochs"

    temperature: float = 1.0
    learning_rate: float = 1e-6
    n_samples_per_prompt: int = 1
    advantage_estimator: Literal["reinforce++", "reinforce++-baseline"] = "reinforce++"
    kl_coef: float = 0.01
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    kl_target: float | None = None
    kl_horizon: float = 10000.0
    kl_loss_coef: float = 0.0
    gamma: float = 1.0
    num_epochs: int = 1
    eps_clip: float = 0.2
    eps_clip_high: float | None = None
    reward_clip_range: float | None = 10.0
    loss_aggregation: AggregationMode = "token-mean"

    def __post_init__(self) -> None:
        if self.advantage_estimator not in ESTIMATORS:
            raise ValueError(
                f"advantage_estimator must be one of {ESTIMATORS}, got {self.advantage_estimator!r}"
            )
        minimum = 2 if self.advantage_estimator == "reinforce++-baseline" else 1
        if self.n_samples_per_prompt < minimum:
            raise ValueError(
                f"n_samples_per_prompt must be >= {minimum} for {self.advantage_estimator}, got "
                f"{self.n_samples_per_prompt}"
            )
        check_aggregation(self.loss_aggregation)
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")
        check_kl_estimator("kl_estimator", self.kl_estimator)
        for name in ("eps_clip", "eps_clip_high", "reward_clip_range"):
            check_clip(name, getattr(self, name))
        super().__post_init__()

    @property
    def needs_ref(self) -> bool:
        return self.kl_coef != 0 or self.kl_target is not None or self.kl_loss_coef != 0

    def advantages(self, roll: Any, scores_B: jax.Array, kl_coef: jax.Array) -> Advantages:
        if self.reward_clip_range is not None:
            scores_B = jnp.clip(scores_B, -self.reward_clip_range, self.reward_clip_range)
        active = self.kl_coef != 0 or self.kl_target is not None
        token_rewards, kl_B = reward_kl(roll, kl_coef, self.kl_estimator, active=active)
        return group_advantages(
            self.advantage_estimator,
            roll,
            scores_B,
            token_rewards,
            kl_B,
            group_size=self.n_samples_per_prompt,
            gamma=self.gamma,
        )

    def token_clip(self) -> TokenClip:
        return TokenClip(
            self.eps_clip, self.eps_clip_high, self.loss_aggregation, self.kl_loss_coef,
            self.kl_estimator,
        )  # fmt: skip
