"""RLOO, GRPO and REINFORCE++: critic-free policy optimisation on the PPO core.

No value model is built or kept. One iteration samples `k` completions for each of `num_prompts`
prompts (prompt `n`'s completions at rows `n*k .. n*k + k - 1`: each prompt is prefilled once and
its KV cache repeated with `jnp.repeat`, so groups stay contiguous and a batch sharded over whole
groups needs no communication for the baselines), scores them, computes advantages with a group
baseline, and runs `epochs x num_mini_batches x gradient_accumulation_steps` clipped policy
updates as nested `lax.scan`s with a fresh permutation per epoch:

    rollout (generate, reference log-probs when a KL is used, reward model when given)
      -> scores [B] (reward model in the jitted rollout, or Python functions on the host)
      -> KL in the reward (RLOO, REINFORCE++) -> advantages (rloo | grpo | reinforce++ ...)
      -> update (PPO-clip on the sequence ratio (RLOO) or per token (GRPO, REINFORCE++),
         optional KL loss term (GRPO's beta))

Each algorithm is a frozen config (`RLOOConfig`, `GRPOConfig`, `ReinforcePPConfig`, with the
option names of TRL / OpenRLHF) over the same functions: `rollout`, `build_experience`, `update`,
`finish_iteration`, `iteration` (reward model, one jitted function) and `make_host_iteration`
(jit(rollout) -> host reward functions -> jit(build_experience + update)).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax import models
from rlhf_jax import sharding as sh
from rlhf_jax.advantages import AdvantageInputs, estimate_advantages
from rlhf_jax.losses import LOSS_AGGREGATIONS, AggregationMode, aggregate_loss, ppo_policy_loss
from rlhf_jax.models import lora
from rlhf_jax.ops import masked_mean, masked_sum
from rlhf_jax.optim import (
    accumulate_grads,
    apply_if_finite,
    check_trainable,
    scan_epochs,
    summarize_update,
)
from rlhf_jax.ppo import policy_logprobs, reward_scores
from rlhf_jax.rewards import (
    KL_ESTIMATORS,
    KLController,
    KLState,
    adaptive_kl_controller,
    apply_missing_stop_penalty,
    check_missing_stop_penalty,
    fixed_kl_controller,
    kl_penalty,
)
from rlhf_jax.rl_config import RLConfig
from rlhf_jax.sampling import Generation, SamplingConfig, generate

Params = Any

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


# ------------------------------------------------------------------------------------ configs


@dataclasses.dataclass(frozen=True)
class CoreSpec:
    """The algorithm-independent view of a critic-free config that the functions below read
    (built by each config's `core()`; hashable)."""

    estimator: str
    group_size: int
    epochs: int
    sequence_ratio: bool
    clip_low: float
    clip_high: float
    reward_kl_coef: float
    reward_kl_estimator: str
    reward_kl_on_sequence: bool
    kl_target: float | None
    kl_horizon: float
    loss_kl_coef: float
    loss_kl_estimator: str
    aggregation: AggregationMode
    global_token_norm: bool
    normalize_reward: bool
    reward_clip_range: float | None
    normalize_advantages: bool
    gamma: float
    grpo_scale: str
    grpo_eps: float

    @property
    def needs_ref(self) -> bool:
        """Whether any KL term (hence the reference forward) is used."""
        return self.reward_kl_coef != 0 or self.kl_target is not None or self.loss_kl_coef != 0


@dataclasses.dataclass(frozen=True)
class RolloutSpec:
    """Everything `rollout` depends on (hashable). Configs that differ only in update options
    share it, so their jitted rollouts share one compilation (see `make_host_iteration`)."""

    num_prompts: int
    group_size: int
    sampling: SamplingConfig
    recompute_old_logprobs: bool
    logprob_chunk_size: int | None
    needs_ref: bool
    shared_prefill: bool = True
    lora_merged_decode: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class CriticFreeConfig(RLConfig):
    """Options shared by RLOO, GRPO and REINFORCE++ (use one of the subclasses).

    Sampling, the update loop's sizes, the optimiser and its schedule are `RLConfig`'s options
    (shared with PPO); each subclass adds its advantage, loss and KL options.

    Batch layout: `num_prompts` prompts x `group_size` completions = `batch_size` rows per
    iteration, split into `num_mini_batches` minibatches (one optimiser step each) of
    `gradient_accumulation_steps` micro-batches whose gradients are averaged.

    Attributes:
      num_prompts: prompts per iteration.
      shared_prefill: prefill each distinct prompt once and repeat its KV cache to its
        `group_size` completions (`generate(..., num_samples=group_size)`). False prefills the
        `num_prompts * group_size` repeated prompts (the same samples for the same key; kept to
        measure the difference, see `benchmarks/critic_free.py --repeat-prefill`).
    """

    num_prompts: int
    shared_prefill: bool = True

    def __post_init__(self) -> None:
        if type(self) is CriticFreeConfig:
            raise TypeError("use RLOOConfig, GRPOConfig or ReinforcePPConfig")
        if self.num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1, got {self.num_prompts}")
        core = self.core()  # validates the algorithm's options
        if core.epochs < 1:
            raise ValueError(f"the number of update epochs must be >= 1, got {core.epochs}")
        per_update = self.num_mini_batches * self.gradient_accumulation_steps
        if self.num_mini_batches < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError("num_mini_batches and gradient_accumulation_steps must be >= 1")
        if self.batch_size % per_update:
            raise ValueError(
                f"the batch of num_prompts x group_size = {self.num_prompts} x {core.group_size} "
                f"= {self.batch_size} completions must be a multiple of num_mini_batches "
                f"({self.num_mini_batches}) x gradient_accumulation_steps "
                f"({self.gradient_accumulation_steps}) = {per_update}; change one of them"
            )
        self.check_common()
        self.kl_controller()

    def core(self) -> CoreSpec:
        raise NotImplementedError

    @property
    def group_size(self) -> int:
        """Completions per prompt (`k`)."""
        return self.core().group_size

    @property
    def batch_size(self) -> int:
        """Completions per iteration: `num_prompts * group_size`."""
        return self.num_prompts * self.core().group_size

    @property
    def steps_per_iteration(self) -> int:
        return self.core().epochs * self.num_mini_batches

    def rollout_spec(self) -> RolloutSpec:
        core = self.core()
        return RolloutSpec(
            num_prompts=self.num_prompts,
            group_size=core.group_size,
            sampling=self.sampling_config(),
            recompute_old_logprobs=self.recompute_old_logprobs,
            logprob_chunk_size=self.logprob_chunk_size,
            needs_ref=core.needs_ref,
            shared_prefill=self.shared_prefill,
            lora_merged_decode=self.lora_merged_decode,
        )

    def kl_controller(self) -> KLController:
        """Controller of the KL coefficient in the reward (fixed unless `kl_target` is set)."""
        core = self.core()
        if core.kl_target is None:
            return fixed_kl_controller(core.reward_kl_coef)
        return adaptive_kl_controller(
            core.reward_kl_coef, target=core.kl_target, horizon=core.kl_horizon
        )


def _check_kl_estimator(name: str, value: str) -> None:
    if value not in KL_ESTIMATORS:
        raise ValueError(f"{name} must be one of {KL_ESTIMATORS}, got {value!r}")


def _check_clip(name: str, value: float | None) -> None:
    if value is not None and not 0.0 < value:
        raise ValueError(f"{name} must be > 0, got {value}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLOOConfig(CriticFreeConfig):
    """RLOO (Ahmadian et al. 2024) as TRL's RLOOTrainer: each completion is one action.

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

    def core(self) -> CoreSpec:
        if self.rloo_k < 2:
            raise ValueError(f"rloo_k must be >= 2 (a leave-one-out baseline), got {self.rloo_k}")
        _check_kl_estimator("kl_estimator", self.kl_estimator)
        _check_clip("cliprange", self.cliprange)
        _check_clip("reward_clip_range", self.reward_clip_range)
        if self.kl_level not in ("token", "sequence"):
            raise ValueError(f"kl_level must be 'token' or 'sequence', got {self.kl_level!r}")
        return CoreSpec(
            estimator="rloo",
            group_size=self.rloo_k,
            epochs=self.num_ppo_epochs,
            sequence_ratio=True,
            clip_low=self.cliprange,
            clip_high=self.cliprange,
            reward_kl_coef=self.kl_coef,
            reward_kl_estimator=self.kl_estimator,
            reward_kl_on_sequence=self.kl_level == "sequence",
            kl_target=self.kl_target,
            kl_horizon=self.kl_horizon,
            loss_kl_coef=0.0,
            loss_kl_estimator="k3",
            aggregation="token-mean",
            global_token_norm=False,
            normalize_reward=self.normalize_reward,
            reward_clip_range=self.reward_clip_range if self.normalize_reward else None,
            normalize_advantages=self.normalize_advantage,
            gamma=1.0,
            grpo_scale="none",
            grpo_eps=0.0,
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOConfig(CriticFreeConfig):
    """GRPO (Shao et al. 2024) as TRL's GRPOTrainer / verl.

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
        super().__post_init__()

    def core(self) -> CoreSpec:
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
        _check_clip("epsilon", self.epsilon)
        _check_clip("epsilon_high", self.epsilon_high)
        return CoreSpec(
            estimator="grpo",
            group_size=self.num_generations,
            epochs=self.num_iterations,
            sequence_ratio=False,
            clip_low=self.epsilon,
            clip_high=self.epsilon if self.epsilon_high is None else self.epsilon_high,
            reward_kl_coef=0.0,
            reward_kl_estimator="k1",
            reward_kl_on_sequence=False,
            kl_target=None,
            kl_horizon=1.0,
            loss_kl_coef=self.beta,
            loss_kl_estimator="k3",
            aggregation=trl_loss_aggregation(self.loss_type),
            global_token_norm=self.loss_type == "dapo",
            normalize_reward=False,
            reward_clip_range=None,
            normalize_advantages=False,
            gamma=1.0,
            grpo_scale=self.scale_rewards,
            grpo_eps=1e-4,
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReinforcePPConfig(CriticFreeConfig):
    """REINFORCE++ (Hu 2025) as OpenRLHF's `reinforce` / `reinforce_baseline` estimators.

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

    def core(self) -> CoreSpec:
        if self.advantage_estimator not in ("reinforce++", "reinforce++-baseline"):
            raise ValueError(
                "advantage_estimator must be 'reinforce++' or 'reinforce++-baseline', got "
                f"{self.advantage_estimator!r}"
            )
        minimum = 2 if self.advantage_estimator == "reinforce++-baseline" else 1
        if self.n_samples_per_prompt < minimum:
            raise ValueError(
                f"n_samples_per_prompt must be >= {minimum} for {self.advantage_estimator}, got "
                f"{self.n_samples_per_prompt}"
            )
        if self.loss_aggregation not in LOSS_AGGREGATIONS:
            raise ValueError(
                f"loss_aggregation must be one of {LOSS_AGGREGATIONS}, got "
                f"{self.loss_aggregation!r}"
            )
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")
        _check_kl_estimator("kl_estimator", self.kl_estimator)
        _check_clip("eps_clip", self.eps_clip)
        _check_clip("eps_clip_high", self.eps_clip_high)
        _check_clip("reward_clip_range", self.reward_clip_range)
        return CoreSpec(
            estimator=self.advantage_estimator,
            group_size=self.n_samples_per_prompt,
            epochs=self.num_epochs,
            sequence_ratio=False,
            clip_low=self.eps_clip,
            clip_high=self.eps_clip if self.eps_clip_high is None else self.eps_clip_high,
            reward_kl_coef=self.kl_coef,
            reward_kl_estimator=self.kl_estimator,
            reward_kl_on_sequence=False,
            kl_target=self.kl_target,
            kl_horizon=self.kl_horizon,
            loss_kl_coef=self.kl_loss_coef,
            loss_kl_estimator=self.kl_estimator,
            aggregation=self.loss_aggregation,
            global_token_norm=False,
            normalize_reward=False,
            reward_clip_range=self.reward_clip_range,
            normalize_advantages=False,
            gamma=self.gamma,
            grpo_scale="none",
            grpo_eps=0.0,
        )


#: Algorithm name -> config class, for a command line / trainer registry.
ALGORITHMS: dict[str, type[CriticFreeConfig]] = {
    "rloo": RLOOConfig,
    "grpo": GRPOConfig,
    "reinforce++": ReinforcePPConfig,
}


# ------------------------------------------------------------------------------ models, state


@dataclasses.dataclass(frozen=True, kw_only=True)
class CriticFreeModels:
    """Static architectures (hashable). The reference model shares `policy`; `reward` is None when
    rewards come only from host functions."""

    policy: models.ModelConfig
    reward: models.ModelConfig | None = None

    def __post_init__(self) -> None:
        if self.policy.head != "lm":
            raise ValueError("the policy must be a causal LM (head='lm')")
        if self.reward is not None:
            if self.reward.head != "score" or self.reward.num_labels != 1:
                raise ValueError(
                    "the reward model must have a scalar score head (head='score', num_labels=1), "
                    f"got head={self.reward.head!r}, num_labels={self.reward.num_labels}"
                )
            if self.reward.vocab_size < self.policy.vocab_size:
                raise ValueError(
                    f"the reward model's vocabulary ({self.reward.vocab_size}) is smaller than "
                    f"the policy's ({self.policy.vocab_size}); they must share a tokenizer"
                )


class CriticFreeFrozen(NamedTuple):
    """Parameters never updated: the reference policy (None when no KL is used) and the reward
    model (None when rewards come from host functions)."""

    ref: Params | None = None
    reward: Params | None = None


class CriticFreeState(flax.struct.PyTreeNode):
    """Everything an iteration updates (a pytree; checkpoint it whole)."""

    policy_params: Params
    opt_state: optax.OptState
    kl: KLState
    iteration: jax.Array  # int32 scalar: completed iterations
    episode: jax.Array  # int32 scalar: completions sampled


class GroupRollout(NamedTuple):
    """Model outputs of a rollout, rows `[B = num_prompts * group_size]` in contiguous groups.

    `ref_logprobs` equals `old_logprobs` when the config uses no KL (the reference never runs);
    `model_scores` is the reward model's score `[B]`, or None without a reward model.
    """

    prompts: jax.Array
    prompt_mask: jax.Array
    generation: Generation
    old_logprobs: jax.Array
    ref_logprobs: jax.Array
    model_scores: jax.Array | None


class Experience(flax.struct.PyTreeNode):
    """One batch of completions with everything the update needs. Arrays are `[B, ...]`.

    `advantages` are per token (constant along a row for RLOO and GRPO), 0 outside `mask`;
    log-probs hold `INVALID_LOGPROB` outside `mask`.
    """

    prompts: jax.Array  # int32 [B, P], left-padded, each prompt repeated group_size times
    prompt_mask: jax.Array  # bool [B, P]
    responses: jax.Array  # int32 [B, T]
    mask: jax.Array  # bool [B, T]
    old_logprobs: jax.Array  # float32 [B, T]
    ref_logprobs: jax.Array  # float32 [B, T]
    scores: jax.Array  # float32 [B], penalties / normalisation applied
    advantages: jax.Array  # float32 [B, T]
    returns: jax.Array  # float32 [B, T]
    sequence_lengths: jax.Array  # int32 [B]


def init_state(
    policy_params: Params, config: CriticFreeConfig, cf_models: CriticFreeModels | None = None
) -> CriticFreeState:
    """Fresh optimiser and KL state around a copy of `policy_params` (so iterations can donate the
    state while the same arrays serve as the frozen reference). Trained params must be float32
    (`optim.check_trainable`). With a LoRA policy (pass `cf_models`) only the trainable half
    (`lora.split`) has optimiser state and must be float32."""
    if cf_models is None and lora.has_adapters(policy_params):
        raise ValueError("the params hold LoRA adapters: pass cf_models to init_state")
    policy_lora = None if cf_models is None else cf_models.policy.lora
    trainable, _ = lora.split(policy_params, policy_lora)
    check_trainable(trainable, "policy params")
    return CriticFreeState(
        policy_params=jax.tree.map(jnp.copy, policy_params),
        opt_state=config.optimizer().init(trainable),  # (only shapes are read)
        kl=config.kl_controller().init(),
        iteration=jnp.zeros((), jnp.int32),
        episode=jnp.zeros((), jnp.int32),
    )


# ----------------------------------------------------------------------------------- rollout


def rollout(
    state: CriticFreeState,
    frozen: CriticFreeFrozen,
    prompts_NP: jax.Array,
    prompt_mask_NP: jax.Array,
    key: jax.Array,
    *,
    config: CriticFreeConfig,
    cf_models: CriticFreeModels,
) -> GroupRollout:
    """Samples `group_size` completions per prompt and runs the reference (only when a KL term is
    used) and the reward model (only when `cf_models.reward` is set). Each prompt is prefilled
    once and its KV cache repeated to its completions (`CriticFreeConfig.shared_prefill`).

    Args:
      prompts_NP, prompt_mask_NP: `[num_prompts, P]` left-padded prompts and their mask.
    Returns:
      A `GroupRollout` with `B = num_prompts * group_size` rows, prompt `n` at rows
      `n*k .. n*k + k - 1`.
    """
    check_missing_stop_penalty(config.missing_eos_penalty, config.stop_token_ids)
    return rollout_from_spec(
        state,
        frozen,
        prompts_NP,
        prompt_mask_NP,
        key,
        spec=config.rollout_spec(),
        cf_models=cf_models,
    )


def rollout_from_spec(
    state: CriticFreeState,
    frozen: CriticFreeFrozen,
    prompts_NP: jax.Array,
    prompt_mask_NP: jax.Array,
    key: jax.Array,
    *,
    spec: RolloutSpec,
    cf_models: CriticFreeModels,
) -> GroupRollout:
    """`rollout` given the config's `rollout_spec()`."""
    prompts_NP = jnp.asarray(prompts_NP, jnp.int32)
    prompt_mask_NP = jnp.asarray(prompt_mask_NP, bool)
    if prompts_NP.ndim != 2 or prompts_NP.shape[0] != spec.num_prompts:
        raise ValueError(
            f"expected prompts of shape [num_prompts={spec.num_prompts}, P], got "
            f"{list(prompts_NP.shape)}"
        )
    if prompt_mask_NP.shape != prompts_NP.shape:
        raise ValueError(
            f"prompt_mask{list(prompt_mask_NP.shape)} must match prompts{list(prompts_NP.shape)}"
        )
    if spec.needs_ref and frozen.ref is None and cf_models.policy.lora is None:
        raise ValueError(
            "this config uses a KL to the reference policy (a KL coefficient, kl_target or beta "
            "is set) but frozen.ref is None; pass the reference parameters or set the KL "
            "coefficients to 0"
        )
    if cf_models.reward is not None and frozen.reward is None:
        raise ValueError("cf_models.reward is set but frozen.reward is None; pass its parameters")
    k = spec.group_size
    prompts_BP = jnp.repeat(prompts_NP, k, axis=0)
    prompt_mask_BP = jnp.repeat(prompt_mask_NP, k, axis=0)
    if spec.shared_prefill:  # one prefill per prompt, its cache repeated to the k rows
        prompts_in, mask_in, num_samples = prompts_NP, prompt_mask_NP, k
    else:
        prompts_in, mask_in, num_samples = prompts_BP, prompt_mask_BP, 1
    sample_params, sample_config = state.policy_params, cf_models.policy
    if spec.lora_merged_decode:
        sample_params, sample_config = lora.merged_for_decode(sample_params, sample_config)
    gen = generate(
        sample_params,
        sample_config,
        prompts_in,
        mask_in,
        key,
        spec.sampling,
        num_samples=num_samples,
    )
    common = (prompts_BP, prompt_mask_BP, gen.tokens, gen.mask)
    logprob_kwargs = dict(temperature=spec.sampling.temperature, chunk_size=spec.logprob_chunk_size)
    old_logprobs = gen.logprobs
    if spec.recompute_old_logprobs:
        old_logprobs, _ = policy_logprobs(
            state.policy_params, cf_models.policy, *common, **logprob_kwargs
        )
    ref_logprobs = old_logprobs
    if spec.needs_ref:
        # With LoRA the reference is the policy's base, adapters off (no second copy).
        ref = frozen.ref if frozen.ref is not None else lora.base(state.policy_params)
        ref_logprobs, _ = policy_logprobs(ref, cf_models.policy, *common, **logprob_kwargs)
    model_scores = None
    if cf_models.reward is not None:
        model_scores = reward_scores(frozen.reward, cf_models.reward, *common)
    return GroupRollout(prompts_BP, prompt_mask_BP, gen, old_logprobs, ref_logprobs, model_scores)


#: `rollout_from_spec` jitted once per (spec, models): shared by every `make_host_iteration`.
_shared_rollout = jax.jit(rollout_from_spec, static_argnames=("spec", "cf_models"))


# -------------------------------------------------------------------------------- experience


def _standardize(x_B: jax.Array, eps: float = 1e-8) -> jax.Array:
    """`(x - mean) / (std + eps)` with the unbiased std (`torch.std`), over a 1-D batch."""
    return (x_B - jnp.mean(x_B)) / (jnp.std(x_B, ddof=1) + eps)


def build_experience(
    roll: GroupRollout, scores_B: jax.Array, kl_coef: jax.Array, *, config: CriticFreeConfig
) -> tuple[Experience, dict[str, jax.Array]]:
    """Scores -> penalised / normalised scores -> KL in the reward -> advantages.

    Args:
      roll: output of `rollout`.
      scores_B: float `[B]` sequence-level rewards (reward model and/or reward functions).
      kl_coef: coefficient of the KL in the reward (the state's `kl.kl_coef`).
    """
    core = config.core()
    gen = roll.generation
    batch = gen.tokens.shape[0]
    raw_scores = jnp.asarray(scores_B, jnp.float32)
    if raw_scores.shape != (batch,):
        raise ValueError(
            f"scores must have shape [B]=[{batch}] (num_prompts x group_size), got "
            f"{list(raw_scores.shape)}"
        )
    scores = apply_missing_stop_penalty(raw_scores, gen.stopped, config.missing_eos_penalty)
    if core.normalize_reward:
        scores = _standardize(scores)
    if core.reward_clip_range is not None:
        scores = jnp.clip(scores, -core.reward_clip_range, core.reward_clip_range)
    kl_coef = jnp.asarray(kl_coef, jnp.float32)
    kl_BT = kl_penalty(roll.old_logprobs, roll.ref_logprobs, core.reward_kl_estimator)
    kl_BT = jnp.where(gen.mask, kl_BT, 0.0)
    if core.reward_kl_on_sequence:
        kl_B = kl_penalty(
            masked_sum(roll.old_logprobs, gen.mask, axis=1),
            masked_sum(roll.ref_logprobs, gen.mask, axis=1),
            core.reward_kl_estimator,
        )
        last_BT = jnp.arange(gen.tokens.shape[1])[None, :] == gen.sequence_lengths[:, None]
        token_rewards = jnp.where(last_BT, -kl_coef * kl_B[:, None], 0.0)
    else:
        kl_B = jnp.sum(kl_BT, axis=1)
        token_rewards = -kl_coef * kl_BT
    if core.reward_kl_coef == 0 and core.kl_target is None:
        token_rewards = jnp.zeros_like(token_rewards)
    advantages, returns = estimate_advantages(
        core.estimator,
        AdvantageInputs(scores=scores, token_rewards=token_rewards, mask=gen.mask),
        group_size=core.group_size,
        gamma=core.gamma,
        scale=core.grpo_scale,
        eps=core.grpo_eps,
    )
    if core.normalize_advantages:  # sequence-level advantages: constant along each row
        adv_B = _standardize(advantages[:, 0])
        advantages = jnp.where(gen.mask, adv_B[:, None], 0.0)
    exp = Experience(
        prompts=roll.prompts,
        prompt_mask=roll.prompt_mask,
        responses=gen.tokens,
        mask=gen.mask,
        old_logprobs=roll.old_logprobs,
        ref_logprobs=roll.ref_logprobs,
        scores=scores,
        advantages=advantages,
        returns=returns,
        sequence_lengths=gen.sequence_lengths,
    )
    group_scores = raw_scores.reshape(-1, core.group_size)
    group_std = (
        jnp.std(group_scores, axis=1, ddof=1)
        if core.group_size > 1
        else jnp.zeros(group_scores.shape[0])
    )
    non_score_B = masked_sum(token_rewards, gen.mask, axis=1)
    lengths = (gen.sequence_lengths + 1).astype(jnp.float32)
    metrics = {
        "objective/kl": jnp.mean(kl_B),
        "objective/entropy": jnp.mean(masked_sum(-roll.old_logprobs, gen.mask, axis=1)),
        "objective/non_score_reward": jnp.mean(non_score_B),
        "objective/rlhf_reward": jnp.mean(non_score_B + scores),
        "objective/scores": jnp.mean(scores),
        "objective/raw_scores": jnp.mean(raw_scores),
        "objective/kl_coef": kl_coef,
        "reward/group_std": jnp.mean(group_std),
        "reward/frac_zero_std": jnp.mean((group_std == 0).astype(jnp.float32)),
        "val/num_eos_tokens": jnp.sum(gen.stopped).astype(jnp.float32),
        "response/length_mean": jnp.mean(lengths),
        "response/length_min": jnp.min(lengths),
        "response/length_max": jnp.max(lengths),
        "val/advantages_mean": masked_mean(advantages, gen.mask),
        "val/advantages_abs_mean": masked_mean(jnp.abs(advantages), gen.mask),
        "nonfinite/scores": jnp.sum(~jnp.isfinite(raw_scores)).astype(jnp.float32),
        "nonfinite/advantages": jnp.sum(~jnp.isfinite(advantages) & gen.mask).astype(jnp.float32),
    }
    if gen.decode_steps is not None:  # steps run before every row stopped (early exit)
        metrics["perf/decode_steps"] = gen.decode_steps.astype(jnp.float32)
    return exp, metrics


# ------------------------------------------------------------------------------------ update


def policy_loss(
    logprobs_BT: jax.Array,
    old_logprobs_BT: jax.Array,
    ref_logprobs_BT: jax.Array,
    advantages_BT: jax.Array,
    mask_BT: jax.Array,
    *,
    spec: CoreSpec,
    token_scale: jax.Array | float = 1.0,
    norm_length: float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The critic-free policy loss on log-probs (float `[B, T]`, `INVALID_LOGPROB` or anything
    outside `mask_BT`; every row must have at least one valid token).

    - `spec.sequence_ratio` (RLOO): PPO-clip on the sequence ratio
      `exp(sum_t logp - sum_t logp_old)` with the sequence advantage (`advantages_BT[:, 0]`: rows
      are constant), averaged over completions.
    - otherwise (GRPO, REINFORCE++): per-token PPO-clip with clip range
      `[1 - clip_low, 1 + clip_high]`, plus `loss_kl_coef * KL_t(policy || ref)` with the
      `loss_kl_estimator`, reduced by `spec.aggregation` and multiplied by `token_scale` (1, except
      for "dapo" where it turns a micro-batch token mean into the minibatch token mean).
      `norm_length` is "seq-mean-token-sum-norm"'s constant (default `T`; the trainers pass the
      response length, so cutting padded columns changes nothing).

    Returns:
      `(loss, aux)`: aux holds `approx_kl`, `clipfrac`, `ratio_mean`, `ratio_var`, `ratio_max`
      (sequence-level for RLOO), `pg_loss`, and `kl_loss` / `kl_mean` when a KL loss is used.
    """
    mask_BT = jnp.asarray(mask_BT, bool)
    clip = dict(clip_eps=spec.clip_low, clip_eps_high=spec.clip_high)
    if spec.sequence_ratio:
        seq_logprobs = masked_sum(logprobs_BT, mask_BT, axis=1)[:, None]
        seq_old = masked_sum(old_logprobs_BT, mask_BT, axis=1)[:, None]
        seq_adv = jnp.asarray(advantages_BT, jnp.float32)[:, :1]
        ones = jnp.ones_like(seq_adv)
        pg_loss, aux = ppo_policy_loss(seq_logprobs, seq_old, seq_adv, ones, **clip)
    else:
        pg_loss, aux = ppo_policy_loss(
            logprobs_BT,
            old_logprobs_BT,
            advantages_BT,
            mask_BT,
            aggregation=spec.aggregation,
            norm_length=norm_length,
            **clip,
        )
        pg_loss = pg_loss * token_scale
    aux = {**aux, "pg_loss": pg_loss}
    loss = pg_loss
    if spec.loss_kl_coef != 0:
        kl_BT = kl_penalty(logprobs_BT, ref_logprobs_BT, spec.loss_kl_estimator)
        kl_loss = aggregate_loss(kl_BT, mask_BT, spec.aggregation, norm_length=norm_length)
        kl_loss = kl_loss * token_scale
        loss = loss + spec.loss_kl_coef * kl_loss
        aux["kl_loss"] = kl_loss
        aux["kl_mean"] = masked_mean(kl_BT, mask_BT)
    return loss, aux


def loss_fn(
    policy_params: Params,
    mb: Experience,
    token_scale: jax.Array,
    *,
    config: CriticFreeConfig,
    cf_models: CriticFreeModels,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`policy_loss` of one micro-batch under `policy_params`, minus `entropy_coef` times the mean
    token entropy; returns `(loss, metrics)`."""
    logprobs, entropy = policy_logprobs(
        policy_params,
        cf_models.policy,
        mb.prompts,
        mb.prompt_mask,
        mb.responses,
        mb.mask,
        temperature=config.temperature,
        chunk_size=config.logprob_chunk_size,
        with_entropy=config.entropy_coef != 0 or config.log_entropy,
    )
    loss, pl_aux = policy_loss(
        logprobs,
        mb.old_logprobs,
        mb.ref_logprobs,
        mb.advantages,
        mb.mask,
        spec=config.core(),
        token_scale=token_scale,
        norm_length=config.response_length,
    )
    if config.entropy_coef:
        loss = loss - config.entropy_coef * masked_mean(entropy, mb.mask)
    aux = {
        "policy/approxkl_avg": pl_aux["approx_kl"],
        "policy/clipfrac_avg": pl_aux["clipfrac"],
        "loss/policy_avg": pl_aux["pg_loss"],
        "val/ratio": pl_aux["ratio_mean"],
        "val/ratio_var": pl_aux["ratio_var"],
        "val/ratio_max": pl_aux["ratio_max"],
    }
    if entropy is not None:
        aux["policy/entropy_avg"] = masked_mean(entropy, mb.mask)
    if "kl_loss" in pl_aux:
        aux["loss/kl_avg"] = pl_aux["kl_loss"]
        aux["policy/kl_avg"] = pl_aux["kl_mean"]
    return loss, aux


def minibatch_token_scales(mask_AUT: jax.Array) -> jax.Array:
    """Per-micro-batch factors `[A]` that turn each micro-batch's token-mean loss into the token
    mean over the whole minibatch once the `A` micro-batch gradients are averaged (TRL's "dapo"
    normaliser): `count_a * A / sum_a count_a`, with `mask_AUT` the minibatch's response masks
    split into `A` micro-batches."""
    mask_AUT = jnp.asarray(mask_AUT, jnp.float32)
    counts_A = jnp.maximum(jnp.sum(mask_AUT, axis=(1, 2)), 1.0)
    return counts_A * mask_AUT.shape[0] / jnp.maximum(jnp.sum(mask_AUT), 1.0)


def update(
    state: CriticFreeState,
    exp: Experience,
    key: jax.Array,
    *,
    config: CriticFreeConfig,
    cf_models: CriticFreeModels,
) -> tuple[CriticFreeState, dict[str, jax.Array]]:
    """`epochs` passes over the experience, each in a fresh random order of the completions, as
    nested `lax.scan`s (epochs -> minibatches -> gradient-accumulation micro-batches).

    A minibatch whose loss or gradients are not finite is skipped (parameters and optimiser state
    keep their values) and counted in `nonfinite/updates`.
    """
    core = config.core()
    tx = config.optimizer()
    n_mb, n_acc = config.num_mini_batches, config.gradient_accumulation_steps
    # Only the trainable half (all of the policy without LoRA) is differentiated, accumulated,
    # optimised and carried; a LoRA base is a loop-invariant closure.
    policy_lora = cf_models.policy.lora
    trainable, frozen = lora.split(state.policy_params, policy_lora)
    state = state.replace(policy_params=trainable)
    grad_fn = jax.value_and_grad(
        lambda t, *args, **kwargs: loss_fn(lora.join(t, frozen), *args, **kwargs), has_aux=True
    )
    param_specs = lora.split(models.logical_axes(cf_models.policy), policy_lora)[0]
    mask_f = exp.mask.astype(jnp.float32)

    def minibatch_step(state: CriticFreeState, inputs):
        idx_AU, _ = inputs
        if core.global_token_norm:
            scales_A = minibatch_token_scales(mask_f[idx_AU])
        else:
            scales_A = jnp.ones((n_acc,), jnp.float32)

        def micro_grads(inputs):
            idx_U, scale = inputs
            # Rows picked through a global permutation: split them over the mesh like the batch.
            mb = sh.constrain_batch(jax.tree.map(lambda x: x[idx_U], exp))
            (loss, aux), grads = grad_fn(
                state.policy_params, mb, scale, config=config, cf_models=cf_models
            )
            return grads, {**aux, "loss/total": loss}

        grads, aux = accumulate_grads(
            micro_grads, state.policy_params, (idx_AU, scales_A), n_acc, param_specs=param_specs
        )
        [(params, opt_state)], ok, [norm] = apply_if_finite(
            [(tx, grads, state.opt_state, state.policy_params)], aux["loss/total"]
        )
        state = state.replace(policy_params=params, opt_state=opt_state)
        aux["nonfinite/updates"] = 1.0 - ok.astype(jnp.float32)
        aux["grad_norm/policy"] = norm
        return state, aux

    state, aux = scan_epochs(
        minibatch_step,
        state,
        key,
        epochs=core.epochs,
        batch_size=config.batch_size,
        num_mini_batches=n_mb,
        gradient_accumulation_steps=n_acc,
    )
    state = state.replace(policy_params=lora.join(state.policy_params, frozen))
    return state, summarize_update(aux)


# --------------------------------------------------------------------------------- iteration


def finish_iteration(
    state: CriticFreeState,
    exp: Experience,
    exp_metrics: dict[str, jax.Array],
    key: jax.Array,
    *,
    config: CriticFreeConfig,
    cf_models: CriticFreeModels,
) -> tuple[CriticFreeState, dict[str, jax.Array]]:
    """Update on `exp`, then advance the KL controller and the iteration / episode counters
    (episodes count completions)."""
    lr = config.learning_rate_at(state.iteration)
    state, update_metrics = update(state, exp, key, config=config, cf_models=cf_models)
    kl = config.kl_controller().update(state.kl, exp_metrics["objective/kl"], config.batch_size)
    state = state.replace(
        kl=kl, iteration=state.iteration + 1, episode=state.episode + config.batch_size
    )
    return state, {**exp_metrics, **update_metrics, "lr": lr, "episode": state.episode}


def finish_with_scores(
    state: CriticFreeState,
    roll: GroupRollout,
    scores_B: jax.Array,
    key: jax.Array,
    *,
    config: CriticFreeConfig,
    cf_models: CriticFreeModels,
) -> tuple[CriticFreeState, dict[str, jax.Array]]:
    """`build_experience` + `finish_iteration` for scores computed outside (host functions).
    `key` is the update key: `jax.random.split(iteration_key)[1]`, as `iteration` uses it.
    Adds `perf/padded_fraction`: the fraction of the `[B, T]` response positions of `roll`
    (T: its width, the length bucket in `make_host_iteration`) that are padding."""
    exp, exp_metrics = build_experience(roll, scores_B, state.kl.kl_coef, config=config)
    state, metrics = finish_iteration(
        state, exp, exp_metrics, key, config=config, cf_models=cf_models
    )
    # Response positions the update pays for but that hold padding (the width is the length
    # bucket in `make_host_iteration`, `response_length` in `iteration`).
    metrics["perf/padded_fraction"] = 1.0 - jnp.mean(roll.generation.mask.astype(jnp.float32))
    return state, metrics


def iteration(
    state: CriticFreeState,
    frozen: CriticFreeFrozen,
    prompts_NP: jax.Array,
    prompt_mask_NP: jax.Array,
    key: jax.Array,
    *,
    config: CriticFreeConfig,
    cf_models: CriticFreeModels,
) -> tuple[CriticFreeState, dict[str, jax.Array]]:
    """One whole iteration scored by the reward model (`cf_models.reward`). Pure; jit it with
    `config` and `cf_models` static (see `jit_iteration`)."""
    if cf_models.reward is None:
        raise ValueError(
            "iteration() scores with the reward model but cf_models.reward is None; use "
            "make_host_iteration() for Python reward functions"
        )
    rollout_key, update_key = jax.random.split(key)
    roll = rollout(
        state,
        frozen,
        prompts_NP,
        prompt_mask_NP,
        rollout_key,
        config=config,
        cf_models=cf_models,
    )
    return finish_with_scores(
        state, roll, roll.model_scores, update_key, config=config, cf_models=cf_models
    )


class CriticFreeShardings(NamedTuple):
    """Shardings of an iteration's inputs and outputs on a mesh (see `critic_free_shardings`)."""

    state: CriticFreeState
    frozen: CriticFreeFrozen
    replicated: jax.sharding.NamedSharding


def critic_free_shardings(
    config: CriticFreeConfig,
    cf_models: CriticFreeModels,
    mesh: jax.sharding.Mesh,
    rules: tuple[tuple[str, Any], ...] | None = None,
) -> CriticFreeShardings:
    """Shardings on `mesh` (shapes only; nothing is computed): the policy, reference and reward
    params and the optimiser moments by the models' logical axes; the KL state, counters, key
    and metrics replicated. Prompts are replicated too (`N x P` ints): the rows are split over
    `("data", "fsdp")` after the group expansion, by the models' activation constraints, so
    `num_prompts` need not divide the mesh."""
    policy = models.param_shardings(cf_models.policy, mesh, rules)
    abstract_policy = jax.eval_shape(
        lambda k: models.init_params(cf_models.policy, k), jax.random.key(0)
    )
    abstract = jax.eval_shape(lambda p: init_state(p, config, cf_models), abstract_policy)
    rep = sh.replicated(mesh)
    state = CriticFreeState(
        policy_params=policy,
        opt_state=sh.optimizer_state_shardings(abstract.opt_state, policy, mesh),
        kl=jax.tree.map(lambda _: rep, abstract.kl),
        iteration=rep,
        episode=rep,
    )
    reward = None
    if cf_models.reward is not None:
        reward = models.param_shardings(cf_models.reward, mesh, rules)
    needs_ref = config.core().needs_ref and cf_models.policy.lora is None  # LoRA: the base
    frozen = CriticFreeFrozen(ref=policy if needs_ref else None, reward=reward)
    return CriticFreeShardings(state=state, frozen=frozen, replicated=rep)


def jit_iteration(
    config: CriticFreeConfig,
    cf_models: CriticFreeModels,
    mesh: jax.sharding.Mesh | None = None,
    rules: tuple[tuple[str, Any], ...] | None = None,
    **jit_kwargs: Any,
):
    """`iteration` jitted with the configs bound and the state donated:
    `fn(state, frozen, prompts_NP, prompt_mask_NP, key) -> (state, metrics)`.

    With a `mesh` the inputs and outputs get the shardings of `critic_free_shardings` and the
    function is traced inside `sharding.with_rules(mesh, rules)`; the returned state keeps the
    input state's shardings. Statistics (group baselines, whitening, metric means) are over the
    global batch."""

    def fn(state, frozen, prompts_NP, prompt_mask_NP, key):
        return iteration(
            state, frozen, prompts_NP, prompt_mask_NP, key, config=config, cf_models=cf_models
        )

    if mesh is None:
        return sh.jit_with_rules(fn, None, rules, donate_argnums=(0,), **jit_kwargs)
    s = critic_free_shardings(config, cf_models, mesh, rules)
    rep = s.replicated
    return sh.jit_with_rules(
        fn,
        mesh,
        rules,
        in_shardings=(s.state, s.frozen, rep, rep, rep),
        out_shardings=(s.state, rep),
        donate_argnums=(0,),
        **jit_kwargs,
    )


ScoreFn = Callable[[GroupRollout], Any]


def slice_group_rollout(roll: GroupRollout, width: int) -> GroupRollout:
    """`roll` with its completion columns cut to the first `width` (see `ppo.slice_rollout`):
    when every completion fits, only padding is cut."""
    if width == roll.generation.tokens.shape[1]:
        return roll
    cut = lambda x: x[:, :width]
    gen = roll.generation._replace(
        tokens=cut(roll.generation.tokens),
        logprobs=cut(roll.generation.logprobs),
        mask=cut(roll.generation.mask),
    )
    return roll._replace(
        generation=gen, old_logprobs=cut(roll.old_logprobs), ref_logprobs=cut(roll.ref_logprobs)
    )


def _global_values(x: jax.Array) -> np.ndarray:
    """The global values of a (possibly multi-process) array on every host."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def make_host_iteration(
    config: CriticFreeConfig,
    cf_models: CriticFreeModels,
    score_fn: ScoreFn,
    *,
    rollout_jit_kwargs: dict[str, Any] | None = None,
    update_jit_kwargs: dict[str, Any] | None = None,
) -> Callable[..., tuple[CriticFreeState, dict[str, Any]]]:
    """An iteration whose scores come from Python: `jit(rollout)` -> `score_fn` on the host ->
    `jit(build_experience + update)` (state donated), the latter on the response columns cut to
    the smallest length bucket holding the batch (`RLConfig.bucket_width`, `slice_group_rollout`:
    only padding is cut; one compilation per bucket met).

    Args:
      score_fn: called as `score_fn(roll, *score_args, **score_kwargs)` with the `GroupRollout`
        (device arrays; `model_scores` holds the reward model's scores when `cf_models.reward` is
        set) and whatever extra arguments `step` got (e.g. the batch's prompt texts); returns the
        scores `[B]` (array or list of floats) or `(scores, metrics)` with a dict of host floats
        added to the metrics (see `reward_functions.make_score_fn`).
      rollout_jit_kwargs: `jax.jit` options (shardings) for the rollout; without them the rollout
        is one module-level jitted function shared by all configs with the same `rollout_spec()`.
      update_jit_kwargs: `jax.jit` options for `finish_with_scores`.
    Returns:
      `step(state, frozen, prompts_NP, prompt_mask_NP, key, *score_args, **score_kwargs) ->
      (state, metrics)`; with the same key and a `score_fn` returning the reward model's scores
      it computes what `iteration` computes (same functions and keys; XLA may round differently
      across the two compilations). `step.rollout` and `step.finish` are the two jitted halves.
    """
    if rollout_jit_kwargs:
        jit_rollout = jax.jit(
            functools.partial(rollout, config=config, cf_models=cf_models), **rollout_jit_kwargs
        )
    else:  # one compilation for all configs with the same rollout_spec()
        jit_rollout = functools.partial(
            _shared_rollout, spec=config.rollout_spec(), cf_models=cf_models
        )

    def finish(state, roll, scores, key, *, width):
        roll = slice_group_rollout(roll, width)
        return finish_with_scores(state, roll, scores, key, config=config, cf_models=cf_models)

    jit_finish = jax.jit(
        finish, donate_argnums=(0,), static_argnames="width", **(update_jit_kwargs or {})
    )

    def step(state, frozen, prompts_NP, prompt_mask_NP, key, *score_args, **score_kwargs):
        rollout_key, update_key = jax.random.split(key)
        roll = jit_rollout(state, frozen, prompts_NP, prompt_mask_NP, rollout_key)
        out = score_fn(roll, *score_args, **score_kwargs)
        host_metrics: dict[str, Any] = {}
        if isinstance(out, tuple):
            out, host_metrics = out
        scores = np.asarray(out, np.float32)
        if scores.shape != (config.batch_size,):
            raise ValueError(
                f"score_fn must return {config.batch_size} scores (num_prompts x group_size), "
                f"got shape {list(scores.shape)}"
            )
        width = config.bucket_width(_global_values(roll.generation.sequence_lengths))
        state, metrics = jit_finish(state, roll, scores, update_key, width=width)
        return state, {**metrics, **host_metrics, "perf/response_bucket": float(width)}

    step.rollout = jit_rollout  # type: ignore[attr-defined]
    step.finish = jit_finish  # type: ignore[attr-defined]
    return step
