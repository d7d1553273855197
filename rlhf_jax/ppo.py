"""RLHF PPO (TRL's PPOTrainer semantics) as pure functions.

Four models: the policy (trained), a frozen reference (the initial policy), a frozen reward model
and a value model (trained; usually initialised from the reward model), or instead of the value
model a value head on the policy's trunk (`PPOModels(value=None)`). One iteration is

    rollout (generate) -> reference log-probs, values, reward scores -> per-token KL-shaped
    rewards -> GAE -> advantage whitening -> num_ppo_epochs x num_mini_batches x
    gradient_accumulation_steps clipped policy + value updates

with every loop a `lax.scan`. `ppo_iteration` is the whole thing as one jittable function when
the reward is a model; `rollout`, `build_experience` and `update` are the pieces for rewards
computed on the host (verifiable rewards): jit(rollout) -> host scores -> jit(build_experience +
update).

Metrics carry TRL's names (`objective/kl`, `policy/approxkl_avg`, `val/ratio`, ...). Per-token
averages are masked means over the response tokens. TRL 0.17 takes some of them over every
position, padding included: `policy/approxkl_avg`, `val/ratio` and `policy/entropy_avg` are plain
means there, and its `objective/entropy` adds -1 for each padded position (its INVALID_LOGPROB).
Where no row stops early the values agree; on padded batches TRL's are diluted by the padding.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax import models
from rlhf_jax import sharding as sh
from rlhf_jax.advantages import gae
from rlhf_jax.logprobs import logprobs_from_hidden
from rlhf_jax.losses import (
    AggregationMode,
    adapt_penalty_beta,
    lm_loss,
    ppo_penalty_loss,
    ppo_policy_loss,
    ppo_value_loss,
)
from rlhf_jax.models import lora
from rlhf_jax.models.lora import LoRAConfig
from rlhf_jax.ops import INVALID_LOGPROB, masked_mean, masked_sum, masked_whiten, response_mask
from rlhf_jax.optim import (
    accumulate_grads,
    apply_if_finite,
    check_trainable,
    scan_epochs,
    summarize_update,
)
from rlhf_jax.rewards import (
    KLController,
    KLState,
    adaptive_kl_controller,
    apply_missing_stop_penalty,
    check_missing_stop_penalty,
    fixed_kl_controller,
    score_indices,
    shape_rewards,
)
from rlhf_jax.rl_config import RLConfig
from rlhf_jax.sampling import Generation, generate, prompt_positions

Params = Any


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOConfig(RLConfig):
    """PPO hyperparameters. Defaults equal TRL's `PPOConfig` where TRL has the option.

    Sampling, the update loop's sizes, the optimiser and its schedule are `RLConfig`'s options
    (shared with the critic-free algorithms); the rest are PPO's own.

    Batch layout: `batch_size` prompts per iteration, split into `num_mini_batches` minibatches
    (one optimiser step each), each split into `gradient_accumulation_steps` micro-batches whose
    gradients are averaged.

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
      ptx_coef: weight of the PPO-ptx language-modelling loss on a pretraining batch.
    """

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
    ptx_coef: float = 0.0

    def __post_init__(self) -> None:
        per_update = self.num_mini_batches * self.gradient_accumulation_steps
        if self.batch_size < 1 or per_update < 1 or self.batch_size % per_update:
            raise ValueError(
                f"batch_size={self.batch_size} must be a positive multiple of num_mini_batches "
                f"({self.num_mini_batches}) x gradient_accumulation_steps "
                f"({self.gradient_accumulation_steps}) = {per_update}; change one of them"
            )
        if self.num_ppo_epochs < 1:
            raise ValueError(f"num_ppo_epochs must be >= 1, got {self.num_ppo_epochs}")
        if not 0.0 <= self.lam <= 1.0 or not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma and lam must be in [0, 1], got {self.gamma}, {self.lam}")
        if self.policy_loss not in ("clip", "penalty"):
            raise ValueError(f"policy_loss must be 'clip' or 'penalty', got {self.policy_loss!r}")
        if self.penalty_beta <= 0 or self.penalty_kl_target <= 0:
            raise ValueError(
                f"penalty_beta and penalty_kl_target must be > 0, got {self.penalty_beta}, "
                f"{self.penalty_kl_target}"
            )
        self.check_common()
        self.kl_controller()  # validates the KL options with their own messages

    @property
    def steps_per_iteration(self) -> int:
        return self.num_ppo_epochs * self.num_mini_batches

    def kl_controller(self) -> KLController:
        if self.kl_target is None:
            return fixed_kl_controller(self.kl_coef)
        return adaptive_kl_controller(self.kl_coef, target=self.kl_target, horizon=self.kl_horizon)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOModels:
    """Static architecture of the models (hashable). The reference model shares `policy`.

    `value=None` puts the value function on the policy: a scalar head (`value_head_init`) reads
    the policy trunk's final hidden states, the value loss (times `vf_coef`) trains the trunk
    together with the policy loss, and `PPOState.value_params` holds only that head (its own
    optimiser and `value_learning_rate`). One trunk forward and backward per minibatch instead of
    two; the policy and value objectives then share (and compete for) the trunk.

    `value_shares_reward_base=True` (a LoRA value model of the reward model's architecture): the
    value model's frozen half in `PPOState.value_params` *is* the reward model's base, and
    `FrozenParams.reward` holds only the reward model's own score head; the reward model is that
    base with its head (`reward_params`). With LoRA on the policy too, a run holds two base
    models, not four.
    """

    policy: models.ModelConfig
    value: models.ModelConfig | None
    reward: models.ModelConfig
    value_shares_reward_base: bool = False

    @property
    def shared_value_head(self) -> bool:
        return self.value is None

    @property
    def value_lora(self) -> LoRAConfig | None:
        """The value model's LoRA (None: its params train whole; a shared head always does)."""
        return None if self.value is None else self.value.lora

    @property
    def value_head(self) -> models.ModelConfig:
        """Config whose `score` head the value function uses: the value model's, or with a shared
        head the policy's architecture with a scalar score head."""
        if self.value is not None:
            return self.value
        policy_lora = self.policy.lora  # the trunk's adapters; heads are the policy's business
        value_lora = (
            None if policy_lora is None else dataclasses.replace(policy_lora, train_modules=())
        )
        return dataclasses.replace(self.policy, head="score", num_labels=1, lora=value_lora)

    def __post_init__(self) -> None:
        if self.policy.head != "lm":
            raise ValueError("the policy must be a causal LM (head='lm')")
        if self.value_shares_reward_base and (
            self.value is None
            or self.value.lora is None
            or "score" not in self.value.lora.train_modules
            or dataclasses.replace(self.value, lora=None) != self.reward
        ):
            raise ValueError(
                "value_shares_reward_base needs a LoRA value model (with its score head in "
                "train_modules) of the reward model's exact architecture"
            )
        for name in ("value", "reward"):
            config = getattr(self, name)
            if config is None and name == "value":
                continue
            if config.head != "score" or config.num_labels != 1:
                raise ValueError(
                    f"the {name} model must have a scalar score head (head='score', "
                    f"num_labels=1), got head={config.head!r}, num_labels={config.num_labels}"
                )
            if config.vocab_size < self.policy.vocab_size:
                raise ValueError(
                    f"the {name} model's vocabulary ({config.vocab_size}) is smaller than the "
                    f"policy's ({self.policy.vocab_size}); they must share a tokenizer"
                )


class FrozenParams(NamedTuple):
    """Parameters that PPO never updates. With LoRA on the policy (`policy.lora`) `ref` is None:
    the reference is the policy's own base with the adapters off (`lora.base`)."""

    ref: Params | None
    reward: Params


class PPOState(flax.struct.PyTreeNode):
    """Everything an iteration updates (a pytree; checkpoint it whole)."""

    policy_params: Params
    value_params: Params
    policy_opt_state: optax.OptState
    value_opt_state: optax.OptState
    kl: KLState
    iteration: jax.Array  # int32 scalar: completed iterations
    episode: jax.Array  # int32 scalar: prompts seen
    penalty_beta: jax.Array | None = None  # float32 scalar with policy_loss="penalty", else None


class Experience(flax.struct.PyTreeNode):
    """One batch of rollouts with everything the update needs. Arrays are `[B, ...]`.

    `mask` marks real response tokens (policy loss); `value_mask` marks the positions whose values
    are trained (up to the score position: equal to `mask` unless the score sits one later).
    Log-probs hold `INVALID_LOGPROB` and values 0 outside their masks.
    """

    prompts: jax.Array  # int32 [B, P], left-padded
    prompt_mask: jax.Array  # bool [B, P]
    responses: jax.Array  # int32 [B, T], truncated, right-padded
    mask: jax.Array  # bool [B, T]
    value_mask: jax.Array  # bool [B, T]
    old_logprobs: jax.Array  # float32 [B, T]
    ref_logprobs: jax.Array  # float32 [B, T]
    values: jax.Array  # float32 [B, T]
    scores: jax.Array  # float32 [B], penalties applied
    rewards: jax.Array  # float32 [B, T]
    advantages: jax.Array  # float32 [B, T]
    returns: jax.Array  # float32 [B, T]
    sequence_lengths: jax.Array  # int32 [B]


class Rollout(NamedTuple):
    """Model outputs of a rollout before scoring (what a host reward function needs)."""

    prompts: jax.Array
    prompt_mask: jax.Array
    generation: Generation
    old_logprobs: jax.Array
    ref_logprobs: jax.Array
    values: jax.Array


# ---------------------------------------------------------------------------------- forwards


def _sequence(prompts_BP, prompt_mask_BP, responses_BT, mask_BT):
    tokens = jnp.concatenate([prompts_BP, responses_BT], axis=1)
    mask = jnp.concatenate([prompt_mask_BP, mask_BT], axis=1).astype(bool)
    return tokens, prompt_positions(mask), mask


def response_hidden(
    params: Params,
    config: models.ModelConfig,
    prompts_BP: jax.Array,
    prompt_mask_BP: jax.Array,
    responses_BT: jax.Array,
    mask_BT: jax.Array,
) -> jax.Array:
    """Hidden states `[B, T, D]` at positions `P-1 .. P+T-2` of prompt + response: entry `t` is
    the state from which response token `t` is predicted (and valued)."""
    tokens, positions, mask = _sequence(prompts_BP, prompt_mask_BP, responses_BT, mask_BT)
    outputs = (prompts_BP.shape[1] - 1, responses_BT.shape[1])
    return models.forward(params, config, tokens, positions, mask, outputs=outputs)[0]


def policy_logprobs(
    params: Params,
    config: models.ModelConfig,
    prompts_BP: jax.Array,
    prompt_mask_BP: jax.Array,
    responses_BT: jax.Array,
    mask_BT: jax.Array,
    *,
    temperature: float,
    chunk_size: int | None = None,
    with_entropy: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """Temperature-scaled log-probs `[B, T]` of the response tokens (`INVALID_LOGPROB` outside
    `mask_BT`) and optionally the per-token entropy, float32."""
    hidden = response_hidden(params, config, prompts_BP, prompt_mask_BP, responses_BT, mask_BT)
    return _policy_logprobs_from_hidden(
        params, config, hidden, responses_BT, mask_BT, temperature, chunk_size, with_entropy
    )


def _policy_logprobs_from_hidden(
    params, config, hidden_BTD, responses_BT, mask_BT, temperature, chunk_size, with_entropy
):
    logprobs, entropy = logprobs_from_hidden(
        hidden_BTD,
        responses_BT,
        lambda h: models.lm_logits(params, config, h),
        temperature=temperature,
        chunk_size=chunk_size,
        with_entropy=with_entropy,
    )
    return jnp.where(mask_BT, logprobs, INVALID_LOGPROB), entropy


def value_estimates(
    params: Params,
    config: models.ModelConfig,
    prompts_BP: jax.Array,
    prompt_mask_BP: jax.Array,
    responses_BT: jax.Array,
    mask_BT: jax.Array,
    value_mask_BT: jax.Array,
) -> jax.Array:
    """Values `[B, T]` (float32) of the states before each response token; 0 outside
    `value_mask_BT`."""
    hidden = response_hidden(params, config, prompts_BP, prompt_mask_BP, responses_BT, mask_BT)
    return _values_from_hidden(params, config, hidden, value_mask_BT)


def _values_from_hidden(
    params: Params, config: models.ModelConfig, hidden_BTD: jax.Array, value_mask_BT: jax.Array
) -> jax.Array:
    values = models.score(params, config, hidden_BTD)[..., 0].astype(jnp.float32)
    return jnp.where(value_mask_BT, values, 0.0)


def reward_scores(
    params: Params,
    config: models.ModelConfig,
    prompts_BP: jax.Array,
    prompt_mask_BP: jax.Array,
    responses_BT: jax.Array,
    mask_BT: jax.Array,
) -> jax.Array:
    """Reward-model score `[B]` (float32) read at the last real token of prompt + response (the
    last layer computes only positions `P-1 ..`: prompts are left-padded, so the last real token
    is never earlier)."""
    tokens, positions, mask = _sequence(prompts_BP, prompt_mask_BP, responses_BT, mask_BT)
    scores = models.sequence_scores(
        params, config, tokens, positions, mask, first_scored=prompts_BP.shape[1] - 1
    )
    return scores[:, 0].astype(jnp.float32)


def value_head_init(config: models.ModelConfig) -> Params:
    """Params of a value head on the trunk of `config` (`PPOModels(value=None)`):
    `{"score": {"kernel": [hidden, 1]}}`, zero-initialised (values start at 0), in the params
    dtype."""
    return {"score": {"kernel": jnp.zeros((config.hidden_size, 1), config.params_dtype)}}


def state_values(
    policy_params: Params,
    value_params: Params,
    ppo_models: PPOModels,
    prompts_BP: jax.Array,
    prompt_mask_BP: jax.Array,
    responses_BT: jax.Array,
    mask_BT: jax.Array,
    value_mask_BT: jax.Array,
) -> jax.Array:
    """Values `[B, T]` (float32, 0 outside `value_mask_BT`) from the value model, or from the
    value head on the policy trunk when `ppo_models.value is None`."""
    common = (prompts_BP, prompt_mask_BP, responses_BT, mask_BT)
    if ppo_models.shared_value_head:
        hidden = response_hidden(policy_params, ppo_models.policy, *common)
        return _values_from_hidden(value_params, ppo_models.value_head, hidden, value_mask_BT)
    return value_estimates(value_params, ppo_models.value, *common, value_mask_BT)


def value_mask_for(
    sequence_lengths: jax.Array, length: int, score_position: str = "last_token"
) -> jax.Array:
    """Positions whose values are trained: up to and including the score position."""
    return response_mask(score_indices(sequence_lengths, length, score_position), length)


# -------------------------------------------------------------------------------- experience


def rollout(
    state: PPOState,
    frozen: FrozenParams,
    prompts_BP: jax.Array,
    prompt_mask_BP: jax.Array,
    key: jax.Array,
    *,
    config: PPOConfig,
    ppo_models: PPOModels,
) -> Rollout:
    """Samples responses and runs the policy (optionally), reference and value forwards."""
    prompts_BP = jnp.asarray(prompts_BP, jnp.int32)
    prompt_mask_BP = jnp.asarray(prompt_mask_BP, bool)
    if prompts_BP.shape[0] != config.batch_size:
        raise ValueError(
            f"got {prompts_BP.shape[0]} prompts but PPOConfig.batch_size={config.batch_size}"
        )
    check_missing_stop_penalty(config.missing_eos_penalty, config.stop_token_ids)
    sample_params, sample_config = state.policy_params, ppo_models.policy
    if config.lora_merged_decode:
        sample_params, sample_config = lora.merged_for_decode(sample_params, sample_config)
    gen = generate(
        sample_params,
        sample_config,
        prompts_BP,
        prompt_mask_BP,
        key,
        config.sampling_config(),
    )
    common = (prompts_BP, prompt_mask_BP, gen.tokens, gen.mask)
    logprob_kwargs = dict(temperature=config.temperature, chunk_size=config.logprob_chunk_size)
    old_logprobs = gen.logprobs
    if config.recompute_old_logprobs:
        old_logprobs, _ = policy_logprobs(
            state.policy_params, ppo_models.policy, *common, **logprob_kwargs
        )
    ref_params = reference_params(state, frozen, ppo_models)
    ref_logprobs, _ = policy_logprobs(ref_params, ppo_models.policy, *common, **logprob_kwargs)
    value_mask = value_mask_for(gen.sequence_lengths, gen.tokens.shape[1], config.score_position)
    values = state_values(state.policy_params, state.value_params, ppo_models, *common, value_mask)
    return Rollout(prompts_BP, prompt_mask_BP, gen, old_logprobs, ref_logprobs, values)


def reference_params(state: PPOState, frozen: FrozenParams, ppo_models: PPOModels) -> Params:
    """The reference policy's params: `frozen.ref`, or with LoRA (and `frozen.ref` None) the
    policy's base without its adapters (the same arrays: no second copy)."""
    if frozen.ref is not None:
        return frozen.ref
    if ppo_models.policy.lora is None:
        raise ValueError("frozen.ref is None; pass the reference policy's params")
    return lora.base(state.policy_params)


def response_buckets(config: PPOConfig) -> tuple[int, ...]:
    """`config.response_buckets()`: the static widths of `length_buckets`."""
    return config.response_buckets()


def bucket_width(sequence_lengths: Any, config: PPOConfig) -> int:
    """The smallest of `response_buckets(config)` holding every response of a batch
    (`sequence_lengths`: host ints, the index of each row's last real token); one column more
    with `score_position="after_last_token"`, whose score sits after the last token."""
    return config.bucket_width(
        sequence_lengths, extra=int(config.score_position == "after_last_token")
    )


def slice_rollout(roll: Rollout, width: int) -> Rollout:
    """`roll` with its response columns cut to the first `width`. When every response fits
    (`bucket_width`), only padding is cut (masks 0, `INVALID_LOGPROB`, values 0), and scoring,
    `build_experience` and `update` on the result equal the full-width ones up to float
    rounding: every statistic is a masked one, and the policy loss normalises by
    `response_length`, not by the width."""
    if width == roll.generation.tokens.shape[1]:
        return roll
    cut = lambda x: x[:, :width]
    gen = roll.generation._replace(
        tokens=cut(roll.generation.tokens),
        logprobs=cut(roll.generation.logprobs),
        mask=cut(roll.generation.mask),
    )
    return roll._replace(
        generation=gen,
        old_logprobs=cut(roll.old_logprobs),
        ref_logprobs=cut(roll.ref_logprobs),
        values=cut(roll.values),
    )


def build_experience(
    roll: Rollout, scores_B: jax.Array, kl_coef: jax.Array, *, config: PPOConfig
) -> tuple[Experience, dict[str, jax.Array]]:
    """Scores -> penalised scores -> KL-shaped rewards -> GAE -> whitened advantages."""
    gen = roll.generation
    length = gen.tokens.shape[1]
    raw_scores = jnp.asarray(scores_B, jnp.float32)
    scores = apply_missing_stop_penalty(raw_scores, gen.stopped, config.missing_eos_penalty)
    value_mask = value_mask_for(gen.sequence_lengths, length, config.score_position)
    rewards, kl = shape_rewards(
        scores,
        roll.old_logprobs,
        roll.ref_logprobs,
        gen.sequence_lengths,
        kl_coef=kl_coef,
        estimator=config.kl_estimator,
        score_position=config.score_position,
    )
    if config.whiten_rewards:
        rewards = masked_whiten(rewards, value_mask, shift_mean=False)
    rewards = jnp.where(value_mask, rewards, 0.0)
    advantages, returns = gae(rewards, roll.values, gamma=config.gamma, lam=config.lam)
    if config.whiten_advantages:
        advantages = masked_whiten(advantages, gen.mask)
    advantages = jnp.where(gen.mask, advantages, 0.0)
    exp = Experience(
        prompts=roll.prompts,
        prompt_mask=roll.prompt_mask,
        responses=gen.tokens,
        mask=gen.mask,
        value_mask=value_mask,
        old_logprobs=roll.old_logprobs,
        ref_logprobs=roll.ref_logprobs,
        values=roll.values,
        scores=scores,
        rewards=rewards,
        advantages=advantages,
        returns=returns,
        sequence_lengths=gen.sequence_lengths,
    )
    kl_B = masked_sum(kl, gen.mask, axis=1)
    non_score_B = -kl_coef * kl_B
    lengths = (gen.sequence_lengths + 1).astype(jnp.float32)
    mask_f = gen.mask.astype(jnp.float32)
    metrics = {
        "objective/kl": jnp.mean(kl_B),
        "objective/entropy": jnp.mean(masked_sum(-roll.old_logprobs, gen.mask, axis=1)),
        "objective/non_score_reward": jnp.mean(non_score_B),
        "objective/rlhf_reward": jnp.mean(non_score_B) + jnp.mean(scores),
        "objective/scores": jnp.mean(scores),
        "objective/raw_scores": jnp.mean(raw_scores),
        "objective/kl_coef": jnp.asarray(kl_coef, jnp.float32),
        "val/num_eos_tokens": jnp.sum(gen.stopped).astype(jnp.float32),
        "response/length_mean": jnp.mean(lengths),
        "response/length_min": jnp.min(lengths),
        "response/length_max": jnp.max(lengths),
        "val/values_mean": masked_mean(roll.values, value_mask),
        "val/advantages_mean": masked_mean(advantages, gen.mask),
        "val/returns_mean": masked_mean(returns, value_mask),
        "nonfinite/scores": jnp.sum(~jnp.isfinite(raw_scores)).astype(jnp.float32),
        "nonfinite/rewards": jnp.sum(~jnp.isfinite(rewards) * mask_f).astype(jnp.float32),
    }
    if gen.decode_steps is not None:  # steps run before every row stopped (early exit)
        metrics["perf/decode_steps"] = gen.decode_steps.astype(jnp.float32)
    return exp, metrics


def make_experience(
    state: PPOState,
    frozen: FrozenParams,
    prompts_BP: jax.Array,
    prompt_mask_BP: jax.Array,
    key: jax.Array,
    *,
    config: PPOConfig,
    ppo_models: PPOModels,
) -> tuple[Experience, dict[str, jax.Array]]:
    """Rollout, reward-model scores and advantages for one batch of left-padded prompts."""
    roll = rollout(
        state, frozen, prompts_BP, prompt_mask_BP, key, config=config, ppo_models=ppo_models
    )
    gen = roll.generation
    reward = reward_params(state, frozen, ppo_models)
    scores = reward_scores(
        reward, ppo_models.reward, roll.prompts, roll.prompt_mask, gen.tokens, gen.mask
    )
    return build_experience(roll, scores, state.kl.kl_coef, config=config)


def reward_params(state: PPOState, frozen: FrozenParams, ppo_models: PPOModels) -> Params:
    """The reward model's params: `frozen.reward`, or with `value_shares_reward_base` the value
    model's frozen base (the same arrays) with the reward head `frozen.reward["score"]`."""
    if not ppo_models.value_shares_reward_base:
        return frozen.reward
    base = lora.split(state.value_params, ppo_models.value_lora)[1]
    return {**base, "score": frozen.reward["score"]}


# ------------------------------------------------------------------------------------ update


def optimizers(config: PPOConfig) -> tuple[optax.GradientTransformation, ...]:
    """`(policy_optimizer, value_optimizer)`."""
    value_lr = config.value_learning_rate or config.learning_rate
    return config.optimizer(), config.optimizer(value_lr)


def init_state(
    policy_params: Params,
    value_params: Params,
    config: PPOConfig,
    ppo_models: PPOModels | None = None,
) -> PPOState:
    """Fresh optimiser and KL-controller state around copies of the given parameters
    (`value_params`: the value model's, or `value_head_init(policy_config)` for a value head on
    the policy trunk).

    The state owns its buffers, so iterations can donate it even when `policy_params` are the same
    arrays as the frozen reference (the usual start) or `value_params` the reward model's.
    Trained params must be float32 (`optim.check_trainable`; cast frozen ones as you like). With
    LoRA models (pass `ppo_models`) only the trainable half (`lora.split`: adapters and the
    modules in `train_modules`) has optimiser state and must be float32; the base may be 16-bit.
    """
    policy_lora, value_lora = _loras(policy_params, value_params, ppo_models)
    policy_train, _ = lora.split(policy_params, policy_lora)
    value_train, _ = lora.split(value_params, value_lora)
    check_trainable(policy_train, "policy params")
    check_trainable(value_train, "value params")
    policy_tx, value_tx = optimizers(config)
    policy_params, value_params = jax.tree.map(jnp.copy, (policy_params, value_params))
    return PPOState(
        policy_params=policy_params,
        value_params=value_params,
        policy_opt_state=policy_tx.init(policy_train),  # (only shapes are read)
        value_opt_state=value_tx.init(value_train),
        kl=config.kl_controller().init(),
        iteration=jnp.zeros((), jnp.int32),
        episode=jnp.zeros((), jnp.int32),
        penalty_beta=(
            jnp.asarray(config.penalty_beta, jnp.float32)
            if config.policy_loss == "penalty"
            else None
        ),
    )


def _loras(policy_params, value_params, ppo_models):
    if ppo_models is None:
        if lora.has_adapters(policy_params) or lora.has_adapters(value_params):
            raise ValueError("the params hold LoRA adapters: pass ppo_models to init_state")
        return None, None
    return ppo_models.policy.lora, ppo_models.value_lora


class PtxBatch(NamedTuple):
    """Pretraining batch for PPO-ptx: `tokens`/`mask` `[N, S]` (N divisible by
    num_mini_batches x gradient_accumulation_steps); the LM loss covers tokens 1.. of each row
    where the mask is 1."""

    tokens: jax.Array
    mask: jax.Array


def _ptx_loss(params: Params, config: models.ModelConfig, batch: PtxBatch) -> jax.Array:
    tokens, mask = batch.tokens, batch.mask.astype(bool)
    hidden, _ = models.forward(params, config, tokens, prompt_positions(mask), mask)
    logprobs, _ = logprobs_from_hidden(
        hidden[:, :-1], tokens[:, 1:], lambda h: models.lm_logits(params, config, h)
    )
    return lm_loss(logprobs, mask[:, 1:] & mask[:, :-1])


def _loss(
    policy_params: Params,
    value_params: Params,
    mb: Experience,
    ptx: PtxBatch | None,
    config: PPOConfig,
    ppo_models: PPOModels,
    penalty_beta: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    common = (mb.prompts, mb.prompt_mask, mb.responses, mb.mask)
    # One trunk pass feeds both heads when the value head shares the policy trunk.
    hidden = response_hidden(policy_params, ppo_models.policy, *common)
    logprobs, entropy = _policy_logprobs_from_hidden(
        policy_params,
        ppo_models.policy,
        hidden,
        mb.responses,
        mb.mask,
        config.temperature,
        config.logprob_chunk_size,
        config.entropy_coef != 0 or config.log_entropy,
    )
    if config.entropy_coef == 0 and entropy is not None:
        # Only a metric then: no backward pass through the [B, T, V] entropy computation.
        entropy = jax.lax.stop_gradient(entropy)
    if config.policy_loss == "penalty":
        pg_loss, pg_aux = ppo_penalty_loss(
            logprobs,
            mb.old_logprobs,
            mb.advantages,
            mb.mask,
            beta=penalty_beta,
            aggregation=config.loss_aggregation,
            norm_length=config.response_length,
        )
    else:
        pg_loss, pg_aux = ppo_policy_loss(
            logprobs,
            mb.old_logprobs,
            mb.advantages,
            mb.mask,
            clip_eps=config.cliprange,
            clip_eps_high=config.cliprange_high,
            dual_clip=config.dual_clip,
            aggregation=config.loss_aggregation,
            norm_length=config.response_length,
        )
    if ppo_models.shared_value_head:
        values = _values_from_hidden(value_params, ppo_models.value_head, hidden, mb.value_mask)
    else:
        values = value_estimates(value_params, ppo_models.value, *common, mb.value_mask)
    vf_loss, vf_aux = ppo_value_loss(
        values, mb.values, mb.returns, mb.value_mask, clip_range=config.cliprange_value
    )
    loss = pg_loss + config.vf_coef * vf_loss
    if config.entropy_coef:
        loss = loss - config.entropy_coef * masked_mean(entropy, mb.mask)
    aux = {
        "policy/approxkl_avg": pg_aux["approx_kl"],
        "policy/clipfrac_avg": pg_aux["clipfrac"],
        "policy/dual_clipfrac_avg": pg_aux["dual_clipfrac"],
        "loss/policy_avg": pg_loss,
        "loss/value_avg": vf_loss,
        "val/clipfrac_avg": vf_aux["clipfrac"],
        "val/ratio": pg_aux["ratio_mean"],
        "val/ratio_var": pg_aux["ratio_var"],
        "val/ratio_max": pg_aux["ratio_max"],
    }
    if entropy is not None:
        aux["policy/entropy_avg"] = masked_mean(entropy, mb.mask)
    if "penalty_kl" in pg_aux:
        aux["policy/penalty_kl"] = pg_aux["penalty_kl"]
    if ptx is not None and config.ptx_coef > 0:
        ptx_loss = _ptx_loss(policy_params, ppo_models.policy, ptx)
        loss = loss + config.ptx_coef * ptx_loss
        aux["loss/ptx_avg"] = ptx_loss
    return loss, aux


def param_logical_axes(ppo_models: PPOModels) -> tuple[Params, Params]:
    """Logical `PartitionSpec`s of `(PPOState.policy_params, PPOState.value_params)` (the value
    model's, or only the shared value head's)."""
    value = models.logical_axes(ppo_models.value_head)
    if ppo_models.shared_value_head:
        value = {"score": value["score"]}
    return models.logical_axes(ppo_models.policy), value


def update(
    state: PPOState,
    exp: Experience,
    key: jax.Array,
    *,
    config: PPOConfig,
    ppo_models: PPOModels,
    ptx: PtxBatch | None = None,
) -> tuple[PPOState, dict[str, jax.Array]]:
    """`num_ppo_epochs` passes over the experience, each in a fresh random order, as nested
    `lax.scan`s (epochs -> minibatches -> gradient-accumulation micro-batches).

    A minibatch whose loss or gradients are not finite is skipped (parameters and optimiser state
    keep their values) and counted in the `nonfinite/*` metrics so the caller can stop the run.
    """
    policy_tx, value_tx = optimizers(config)
    n_mb, n_acc = config.num_mini_batches, config.gradient_accumulation_steps
    # Only the trainable halves (all of a model without LoRA) are differentiated, accumulated,
    # optimised and carried through the loops; a LoRA base is a loop-invariant closure.
    policy_lora, value_lora = ppo_models.policy.lora, ppo_models.value_lora
    policy_params, policy_frozen = lora.split(state.policy_params, policy_lora)
    value_params, value_frozen = lora.split(state.value_params, value_lora)
    state = state.replace(policy_params=policy_params, value_params=value_params)

    def trainable_loss(policy_train, value_train, *args):
        policy = lora.join(policy_train, policy_frozen)
        return _loss(policy, lora.join(value_train, value_frozen), *args)

    grad_fn = jax.value_and_grad(trainable_loss, argnums=(0, 1), has_aux=True)
    policy_specs, value_specs = param_logical_axes(ppo_models)
    param_specs = (lora.split(policy_specs, policy_lora)[0], lora.split(value_specs, value_lora)[0])
    if ptx is not None:
        n = ptx.tokens.shape[0]
        if n % (n_mb * n_acc):
            raise ValueError(
                f"the PPO-ptx batch ({n} rows) must divide into num_mini_batches x "
                f"gradient_accumulation_steps = {n_mb * n_acc} parts"
            )
        ptx = jax.tree.map(lambda x: x.reshape(n_mb, n_acc, n // (n_mb * n_acc), *x.shape[1:]), ptx)

    def minibatch_step(state: PPOState, inputs):
        def micro_grads(micro_inputs):
            idx_U, ptx_micro = micro_inputs
            # Rows picked through a global permutation: split them over the mesh like the batch.
            mb = sh.constrain_batch(jax.tree.map(lambda x: x[idx_U], exp))
            ptx_micro = sh.constrain_batch(ptx_micro)
            (loss, aux), grads = grad_fn(
                state.policy_params,
                state.value_params,
                mb,
                ptx_micro,
                config,
                ppo_models,
                state.penalty_beta,
            )
            return grads, {**aux, "loss/total": loss}

        params = (state.policy_params, state.value_params)
        (policy_grads, value_grads), aux = accumulate_grads(
            micro_grads, params, inputs, n_acc, param_specs=param_specs
        )
        updated, ok, (policy_norm, value_norm) = apply_if_finite(
            [
                (policy_tx, policy_grads, state.policy_opt_state, state.policy_params),
                (value_tx, value_grads, state.value_opt_state, state.value_params),
            ],
            aux["loss/total"],
        )
        (policy_params, policy_opt), (value_params, value_opt) = updated
        state = state.replace(
            policy_params=policy_params,
            value_params=value_params,
            policy_opt_state=policy_opt,
            value_opt_state=value_opt,
        )
        aux["nonfinite/updates"] = 1.0 - ok.astype(jnp.float32)
        aux["grad_norm/policy"], aux["grad_norm/value"] = policy_norm, value_norm
        return state, aux

    state, aux = scan_epochs(
        minibatch_step,
        state,
        key,
        epochs=config.num_ppo_epochs,
        batch_size=config.batch_size,
        num_mini_batches=n_mb,
        gradient_accumulation_steps=n_acc,
        per_minibatch=ptx,
    )
    state = state.replace(
        policy_params=lora.join(state.policy_params, policy_frozen),
        value_params=lora.join(state.value_params, value_frozen),
    )
    return state, summarize_update(aux)


# --------------------------------------------------------------------------------- iteration


def finish_iteration(
    state: PPOState,
    exp: Experience,
    exp_metrics: dict[str, jax.Array],
    key: jax.Array,
    *,
    config: PPOConfig,
    ppo_models: PPOModels,
    ptx: PtxBatch | None = None,
) -> tuple[PPOState, dict[str, jax.Array]]:
    """Update on `exp`, then advance the KL controller, iteration and episode counters."""
    lr = config.learning_rate_at(state.iteration)
    state, update_metrics = update(state, exp, key, config=config, ppo_models=ppo_models, ptx=ptx)
    kl = config.kl_controller().update(state.kl, exp_metrics["objective/kl"], config.batch_size)
    if state.penalty_beta is not None:
        update_metrics["policy/penalty_beta"] = state.penalty_beta  # the beta this update used
        state = state.replace(
            penalty_beta=adapt_penalty_beta(
                state.penalty_beta, update_metrics["policy/penalty_kl"], config.penalty_kl_target
            )
        )
    state = state.replace(
        kl=kl, iteration=state.iteration + 1, episode=state.episode + config.batch_size
    )
    metrics = {**exp_metrics, **update_metrics, "lr": lr, "episode": state.episode}
    return state, metrics


def ppo_iteration(
    state: PPOState,
    frozen: FrozenParams,
    prompts_BP: jax.Array,
    prompt_mask_BP: jax.Array,
    key: jax.Array,
    *,
    config: PPOConfig,
    ppo_models: PPOModels,
    ptx: PtxBatch | None = None,
) -> tuple[PPOState, dict[str, jax.Array]]:
    """One whole PPO iteration with a reward model: experience, then update. Pure; jit it with
    `config` and `ppo_models` static (see `jit_ppo_iteration`). Scoring and the update run on all
    `response_length` columns here (shapes are static inside one program); the trainer's phased
    path cuts them to the batch's length bucket (`bucket_width`, `slice_rollout`)."""
    rollout_key, update_key = jax.random.split(key)
    exp, exp_metrics = make_experience(
        state,
        frozen,
        prompts_BP,
        prompt_mask_BP,
        rollout_key,
        config=config,
        ppo_models=ppo_models,
    )
    return finish_iteration(
        state, exp, exp_metrics, update_key, config=config, ppo_models=ppo_models, ptx=ptx
    )


def jit_ppo_iteration(
    config: PPOConfig,
    ppo_models: PPOModels,
    mesh: jax.sharding.Mesh | None = None,
    rules: tuple[tuple[str, Any], ...] | None = None,
    **jit_kwargs: Any,
):
    """`ppo_iteration` jitted with the configs bound and the state donated:
    `fn(state, frozen, prompts_BP, prompt_mask_BP, key, ptx=None) -> (state, metrics)`.

    Without a `mesh` this is a plain `jax.jit`. With a `mesh` (and logical-axis `rules`, default
    `sharding.DEFAULT_RULES`) the inputs and outputs get the shardings of `ppo_shardings`: params
    and optimiser states sharded by the models' logical axes, prompts/masks (and a `PtxBatch`)
    split over `("data", "fsdp")`, the key, scalars and metrics replicated; the returned state
    keeps the input state's shardings, so the donated buffers are reused. The function is traced
    inside `sharding.with_rules(mesh, rules)`, so the models' logical constraints apply without
    the caller entering a context. Batch statistics (advantage whitening, metric means) are over
    the global batch: the arrays are global `jax.Array`s. Build the state with `jit_init_state`
    and the batch with `sharding.place_batch` (in a multi-process run each process passes its
    own rows).
    """

    def fn(state, frozen, prompts_BP, prompt_mask_BP, key, ptx=None):
        return ppo_iteration(
            state,
            frozen,
            prompts_BP,
            prompt_mask_BP,
            key,
            config=config,
            ppo_models=ppo_models,
            ptx=ptx,
        )

    if mesh is None:
        return sh.jit_with_rules(fn, None, rules, donate_argnums=(0,), **jit_kwargs)
    s = ppo_shardings(config, ppo_models, mesh, rules)
    return sh.jit_with_rules(
        fn,
        mesh,
        rules,
        in_shardings=(s.state, s.frozen, s.batch, s.batch, s.replicated, s.batch),
        out_shardings=(s.state, s.replicated),
        donate_argnums=(0,),
        **jit_kwargs,
    )


class NonFiniteError(FloatingPointError):
    """Raised by `check_finite` when an iteration produced NaN/inf."""


def check_finite(metrics: dict[str, Any], iteration: int) -> None:
    """Raises `NonFiniteError` naming the iteration and quantity when scores, rewards, losses or
    gradients were not finite (updates with non-finite gradients were already skipped)."""
    bad = {k: float(v) for k, v in metrics.items() if k.startswith("nonfinite/") and float(v) > 0}
    for name in ("loss/policy_avg", "loss/value_avg", "objective/scores"):
        if name in metrics and not np.isfinite(metrics[name]):  # host values: no device work
            bad[name] = float(metrics[name])
    if bad:
        described = ", ".join(f"{k}={v:g}" for k, v in sorted(bad.items()))
        raise NonFiniteError(
            f"iteration {iteration}: non-finite values ({described}); the parameters were not "
            "updated with them. Lower the learning rate, check the reward function/model, or "
            "resume from the last checkpoint."
        )


# ---------------------------------------------------------------------------------- sharding


class PPOShardings(NamedTuple):
    """Where the inputs of a PPO iteration live on a mesh (`NamedSharding` leaves).

    Attributes:
      state: a `PPOState` of shardings: params by the models' logical axes, optimiser states
        mirroring their params (`sharding.optimizer_state_shardings`), KL state and counters
        replicated.
      frozen: `FrozenParams` of shardings (reference like the policy, reward by its own axes).
      batch: for `[B, ...]` batch arrays (prompts, masks, `PtxBatch` fields): leading axis over
        `("data", "fsdp")`.
      replicated: for keys, scalars and metrics.
    """

    state: PPOState
    frozen: FrozenParams
    batch: jax.sharding.NamedSharding
    replicated: jax.sharding.NamedSharding


def ppo_shardings(
    config: PPOConfig,
    ppo_models: PPOModels,
    mesh: jax.sharding.Mesh,
    rules: tuple[tuple[str, Any], ...] | None = None,
) -> PPOShardings:
    """The shardings `jit_ppo_iteration` uses on `mesh` (shapes only; nothing is computed)."""

    def abstract_params(model_config: models.ModelConfig) -> Params:
        return jax.eval_shape(lambda k: models.init_params(model_config, k), jax.random.key(0))

    policy = models.param_shardings(ppo_models.policy, mesh, rules)
    value = models.param_shardings(ppo_models.value_head, mesh, rules)
    if ppo_models.shared_value_head:
        value = {"score": value["score"]}
    reward = models.param_shardings(ppo_models.reward, mesh, rules)
    abstract = jax.eval_shape(
        lambda p, v: init_state(p, v, config, ppo_models),
        abstract_params(ppo_models.policy),
        abstract_value_params(ppo_models),
    )
    rep = sh.replicated(mesh)
    state = PPOState(
        policy_params=policy,
        value_params=value,
        policy_opt_state=sh.optimizer_state_shardings(abstract.policy_opt_state, policy, mesh),
        value_opt_state=sh.optimizer_state_shardings(abstract.value_opt_state, value, mesh),
        kl=jax.tree.map(lambda _: rep, abstract.kl),
        iteration=rep,
        episode=rep,
        penalty_beta=None if abstract.penalty_beta is None else rep,
    )
    return PPOShardings(
        state=state,
        frozen=FrozenParams(
            ref=None if ppo_models.policy.lora else policy,
            reward={"score": reward["score"]} if ppo_models.value_shares_reward_base else reward,
        ),
        batch=sh.batch_sharding(mesh, 2),
        replicated=rep,
    )


def abstract_value_params(ppo_models: PPOModels) -> Params:
    """Shapes and dtypes of `PPOState.value_params` (the value model's params, or the shared
    value head's)."""
    if ppo_models.shared_value_head:
        return jax.eval_shape(lambda: value_head_init(ppo_models.policy))
    return jax.eval_shape(lambda k: models.init_params(ppo_models.value, k), jax.random.key(0))


def jit_init_state(
    config: PPOConfig,
    ppo_models: PPOModels,
    mesh: jax.sharding.Mesh | None = None,
    rules: tuple[tuple[str, Any], ...] | None = None,
):
    """`init_state` jitted: `fn(policy_params, value_params) -> PPOState`. With a `mesh` the
    params are expected (and the state is born) with the shardings of `ppo_shardings`, so the
    optimiser moments never exist unsharded. The inputs are not donated (the policy params are
    usually also the frozen reference)."""

    def fn(policy_params, value_params):
        return init_state(policy_params, value_params, config, ppo_models)

    if mesh is None:
        return sh.jit_with_rules(fn, None, rules)
    s = ppo_shardings(config, ppo_models, mesh, rules)
    return sh.jit_with_rules(
        fn,
        mesh,
        rules,
        in_shardings=(s.state.policy_params, s.state.value_params),
        out_shardings=s.state,
    )
