"""GRPO (Shao et al. 2024) as TRL's GRPOTrainer / verl."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

import jax

from rlhf_jax.algorithms.common import (
    TokenClip,
    TokenClipObjective,
    check_clip,
    group_advantages,
    reward_kl,
)
from rlhf_jax.core.config import Advantages, GroupedConfig
from rlhf_jax.losses import AggregationMode

#: TRL GRPO `loss_type` -> `aggregate_loss` mode. "dapo" is a token mean whose normaliser is the
#: number of valid tokens in the whole minibatch (all gradient-accumulation micro-batches), "bnpo"
#: the token mean of each micro-batch; the two agree with `gradient_accumulation_steps=1`.
#: "dr_grpo" divides each sequence's token sum by `response_length` (the maximum completion length).
TRL_LOSS_TYPES: dict[str, AggregationMode] = {
    "grpo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dapo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
}


def trl_loss_aggregation(loss_type: str) -> AggregationMode:
    """The `aggregate_loss` mode of TRL's GRPO `loss_type` ("grpo", "bnpo", "dapo", "dr_grpo")."""
    if loss_type not in TRL_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {tuple(TRL_LOSS_TYPES)}")
    return TRL_LOSS_TYPES[loss_type]


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOConfig(TokenClipObjective, GroupedConfig):
    """GRPO: `num_prompts` prompts x `num_generations` completions per iteration.

    The advantage is the completion's reward minus its group mean, divided by the group's
    standard deviation (`scale_rewards="group"`, unbiased std as TRL's `torch.std`), by the
    batch's (`"batch"`), or not at all (`"none"`, Dr. GRPO), plus `1e-4`. The same advantage goes
    on every token; the loss is per-token PPO-clip with clip-higher (DAPO) plus `beta` times the
    k3 KL to the reference, aggregated by `loss_type`. With `beta=0` the reference model is never
    run (`frozen.ref` may be None).

    Attributes (TRL names; defaults of recent TRL):
      num_generations: completions per prompt (>= 2).
      num_iterations: passes over each batch (mu); old log-probs come from the sampler, so with
        one pass and one minibatch the ratio is 1 (TRL detaches the current log-probs instead).
      epsilon, epsilon_high: lower and upper clip ranges (`epsilon_high` defaults to `epsilon`).
      beta: weight of the k3 KL loss term.
      loss_type: "grpo" | "bnpo" | "dapo" | "dr_grpo" (see `TRL_LOSS_TYPES`).
      scale_rewards: "group" | "batch" | "none"; True / False mean "group" / "none".
    """

    group_size_field: ClassVar[str] = "num_generations"
    epochs_field: ClassVar[str] = "num_iterations"

    temperature: float = 1.0
    learning_rate: float = 1e-6
    num_generations: int = 8
    num_iterations: int = 1
    epsilon: float = 0.2
    epsilon_high: float | None = None
    beta: float = 0.0
    loss_type: Literal["grpo", "bnpo", "dapo", "dr_grpo"] = "dapo"
    scale_rewards: Literal["group", "batch", "none"] | bool = "group"

    def __post_init__(self) -> None:
        if isinstance(self.scale_rewards, bool):
            object.__setattr__(self, "scale_rewards", "group" if self.scale_rewards else "none")
        if self.num_generations < 2:
            raise ValueError(
                f"num_generations must be >= 2 (a group baseline), got {self.num_generations}"
            )
        if self.scale_rewards not in ("group", "batch", "none"):
            raise ValueError(
                f"scale_rewards must be 'group', 'batch' or 'none', got {self.scale_rewards!r}"
            )
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        check_clip("epsilon", self.epsilon)
        check_clip("epsilon_high", self.epsilon_high)
        trl_loss_aggregation(self.loss_type)
        super().__post_init__()

    @property
    def needs_ref(self) -> bool:
        return self.beta != 0

    @property
    def global_token_norm(self) -> bool:
        return self.loss_type == "dapo"

    def advantages(self, roll: Any, scores_B: jax.Array, kl_coef: jax.Array) -> Advantages:
        # The KL is measured (`objective/kl`) but is a loss term, not in the reward.
        token_rewards, kl_B = reward_kl(roll, kl_coef, "k1", active=False)
        return group_advantages(
            "grpo",
            roll,
            scores_B,
            token_rewards,
            kl_B,
            group_size=self.num_generations,
            scale=self.scale_rewards,
            eps=1e-4,
        )

    def token_clip(self) -> TokenClip:
        aggregation = trl_loss_aggregation(self.loss_type)
        return TokenClip(self.epsilon, self.epsilon_high, aggregation, self.beta, "k3")
