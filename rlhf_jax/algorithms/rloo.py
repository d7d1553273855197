"""RLOO (Ahmadian et al. 2024) as TRL's RLOOTrainer: each completion is one action."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp

from rlhf_jax.algorithms.common import (
    check_clip,
    check_kl_estimator,
    group_advantages,
    reward_kl,
    standardize,
)
from rlhf_jax.core.config import Advantages, GroupedConfig
from rlhf_jax.losses import ppo_policy_loss
from rlhf_jax.ops import masked_sum


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLOOConfig(GroupedConfig):
    """RLOO: `num_prompts` prompts x `rloo_k` completions per iteration.

    The sequence reward is `score - kl_coef * KL` with `KL = sum_t KL_t` ("token": the per-token
    estimates summed) or the estimator applied to the sequence log-ratio `sum_t log pi/pi_ref`
    ("sequence"). With TRL's k1 estimator both are the same number, which is also what both of
    TRL's `token_level_kl` settings compute. The advantage is the reward minus the mean reward of
    the other `rloo_k - 1` completions of the prompt; the loss is PPO-clip on the sequence ratio
    `exp(sum_t logp - sum_t logp_old)`, averaged over completions.

    Attributes (TRL names and defaults):
      rloo_k: completions per prompt (>= 2).
      num_ppo_epochs: passes over each batch.
      cliprange: clip range of the sequence ratio.
      kl_coef, kl_estimator, kl_level: KL penalty in the reward (see above).
      kl_target, kl_horizon: adapt `kl_coef` (Ziegler et al.) when `kl_target` is set.
      normalize_reward: standardise scores over the batch (`(s - mean) / (std + 1e-8)`, unbiased
        std) and clip them to +-`reward_clip_range` (TRL clips only when normalising).
      normalize_advantage: standardise the advantages over the batch the same way.
    """

    group_size_field: ClassVar[str] = "rloo_k"
    epochs_field: ClassVar[str] = "num_ppo_epochs"

    rloo_k: int = 2
    num_ppo_epochs: int = 4
    cliprange: float = 0.2
    kl_coef: float = 0.05
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    kl_level: Literal["token", "sequence"] = "token"
    kl_target: float | None = None
    kl_horizon: float = 10000.0
    normalize_reward: bool = False
    reward_clip_range: float = 10.0
    normalize_advantage: bool = False

    def __post_init__(self) -> None:
        if self.rloo_k < 2:
            raise ValueError(f"rloo_k must be >= 2 (a leave-one-out baseline), got {self.rloo_k}")
        check_kl_estimator("kl_estimator", self.kl_estimator)
        check_clip("cliprange", self.cliprange)
        check_clip("reward_clip_range", self.reward_clip_range)
        if self.kl_level not in ("token", "sequence"):
            raise ValueError(f"kl_level must be 'token' or 'sequence', got {self.kl_level!r}")
        super().__post_init__()

    @property
    def needs_ref(self) -> bool:
        return self.kl_coef != 0 or self.kl_target is not None

    def advantages(self, roll: Any, scores_B: jax.Array, kl_coef: jax.Array) -> Advantages:
        if self.normalize_reward:
            scores_B = standardize(scores_B)
            scores_B = jnp.clip(scores_B, -self.reward_clip_range, self.reward_clip_range)
        token_rewards, kl_B = reward_kl(
            roll,
            kl_coef,
            self.kl_estimator,
            on_sequence=self.kl_level == "sequence",
            active=self.needs_ref,
        )
        adv = group_advantages("rloo", roll, scores_B, token_rewards, kl_B, group_size=self.rloo_k)
        if self.normalize_advantage:  # sequence-level advantages: constant along each row
            mask = roll.generation.mask
            adv = adv._replace(
                advantages=jnp.where(mask, standardize(adv.advantages[:, 0])[:, None], 0.0)
            )
        return adv

    def policy_objective(
        self, logprobs_BT: jax.Array, mb: Any, token_scale: jax.Array, algo_state: Any
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """PPO-clip on the sequence ratio with the sequence advantage, averaged over rows."""
        seq_logprobs = masked_sum(logprobs_BT, mb.mask, axis=1)[:, None]
        seq_old = masked_sum(mb.old_logprobs, mb.mask, axis=1)[:, None]
        seq_adv = jnp.asarray(mb.advantages, jnp.float32)[:, :1]
        ones = jnp.ones_like(seq_adv)
        clip = dict(clip_eps=self.cliprange, clip_eps_high=self.cliprange)
        return ppo_policy_loss(seq_logprobs, seq_old, seq_adv, ones, **clip)
