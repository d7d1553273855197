"""`RLConfig`: the options every RL algorithm shares, and the hooks an algorithm implements.

An algorithm is a frozen subclass (`algorithms.PPOConfig`, `RLOOConfig`, `GRPOConfig`,
`ReinforcePPConfig`) that adds its own options (named as TRL / OpenRLHF name them) and implements:

- the batch layout: `num_prompts` and `batch_size` (`GroupedConfig` derives the latter), and the
  names of its options for the completions per prompt and the update epochs
  (`group_size_field`, `epochs_field`: `group_size` and `epochs` read them);
- `has_critic` (a value function trained beside the policy: then also `vf_coef`,
  `cliprange_value`, `value_learning_rate` and `value_mask`), `needs_ref` (whether a reference
  forward is needed: any KL term) and, where its options differ from `kl_coef` /
  `kl_target` / `kl_horizon`, `kl_controller` (the coefficient of a KL in the reward);
- `advantages(roll, scores, kl_coef) -> Advantages`: scores to per-token advantages (where the
  KL in the reward goes);
- `policy_objective(logprobs, mb, token_scale, algo_state) -> (loss, aux)`: the policy objective of
  one micro-batch (where a KL loss term goes);
- optionally `init_algo_state` / `after_update`: state the algorithm adapts between iterations
  (PPO-Penalty's beta).

Everything else (rollout, experience, the update loop, the optimiser, the iteration, sharding,
the training loop) is the core's (`rlhf_jax.core`) and the same for every algorithm. Sampling,
the update loop's sizes, the optimiser and the learning-rate schedule are declared and validated
here once: an option added here reaches every algorithm.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rlhf_jax.optim import Decay, adamw, check_schedule, lr_schedule
from rlhf_jax.rewards import KLController, adaptive_kl_controller, fixed_kl_controller
from rlhf_jax.sampling import SamplingConfig


class Advantages(NamedTuple):
    """What an algorithm's `advantages` hook returns (`[B]` / `[B, T]` float32).

    Attributes:
      advantages: per-token advantages, 0 outside the response mask.
      returns: per-token returns (the value targets with a critic).
      scores: the sequence scores after the algorithm's processing (normalising, clipping).
      kl: the KL estimate per sequence (`objective/kl`).
      non_score: the KL part of each sequence's reward (`objective/non_score_reward`).
      rewards: the per-token rewards when the algorithm builds them (PPO), else None.
      metrics: the algorithm's own experience metrics.
    """

    advantages: jax.Array
    returns: jax.Array
    scores: jax.Array
    kl: jax.Array
    non_score: jax.Array
    rewards: jax.Array | None = None
    metrics: dict[str, jax.Array] = {}  # (read, never mutated)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLConfig:
    """Sampling, update-loop and optimiser options of every RL algorithm (use a subclass; the
    module docstring lists the hooks a subclass implements).

    Batch layout: `num_prompts` prompts x `group_size` completions = `batch_size` rows per
    iteration, split into `num_mini_batches` minibatches (one optimiser step each) of
    `gradient_accumulation_steps` micro-batches whose gradients are averaged; `epochs` passes.

    Attributes:
      response_length: new tokens sampled per row (the maximum response length).
      temperature, top_k, top_p, min_p: sampling (see `SamplingConfig`; the filters are off by
        default); log-probs for the ratio use the temperature-scaled, unfiltered distribution,
        at rollout and in the update (TRL, OpenRLHF).
      stop_token_ids: a response ends at the first of these (kept); the rest is padding.
      pad_token_id: token written after the stop token.
      missing_eos_penalty: subtracted from the score of responses without a stop token.
      num_mini_batches, gradient_accumulation_steps: each iteration's batch is split into
        `num_mini_batches` minibatches (one optimiser step each) of
        `gradient_accumulation_steps` micro-batches whose gradients are averaged.
      learning_rate: AdamW peak learning rate, constant within an iteration (TRL steps its
        scheduler once per iteration).
      total_iterations: the decay reaches its floor after this many iterations.
      warmup_iterations: linear warm-up; iteration `i` uses `(i + 1) / warmup` of the peak.
      lr_decay, min_lr_ratio: "linear" (TRL) or "cosine" decay after warm-up, to
        `min_lr_ratio` of the peak (0: TRL; "Secrets of RLHF" decays cosine to 0.1). See
        `optim.lr_schedule`.
      weight_decay, adam_eps, max_grad_norm: AdamW settings (`max_grad_norm=None`: no
        global-norm clipping).
      entropy_coef: entropy bonus weight (0 = off).
      recompute_old_logprobs: recompute rollout log-probs with a training-style forward pass
        instead of taking them from the sampler (removes the sampler/trainer numeric gap).
      lora_merged_decode: with a LoRA policy, sample from a copy of the weights with the
        adapters merged (`lora.merged_for_decode`: one merge per rollout, a copy of the
        projection weights while decoding) instead of applying them unmerged at every decode
        step (the default: no third copy of the policy; on a 2-core CPU host decode took 1.11x
        the base model's time unmerged and 1.05x merged, benchmarks/lora_decode.py). In 16-bit
        compute the merged weights round the update, so set `recompute_old_logprobs` with it.
      logprob_chunk_size: positions per chunk when computing log-probs (and entropies) from
        hidden states, so at most `[micro_batch, chunk, V]` float32 logits are alive at once
        (any response length works; None: the whole response in one block, which at a 128k
        vocabulary is 0.5 MB per token of float32 logits).
      log_entropy: compute the policy's token entropy in the update for the
        `policy/entropy_avg` metric (a softmax over the vocabulary at every position; it is
        computed anyway when `entropy_coef > 0`).
      decode_chunks: `SamplingConfig.decode_chunks` of the rollout (None: automatic).
      length_buckets: the phased trainers score and update on the smallest of this many static
        response widths (`response_buckets`) that holds the batch's longest response, so those
        passes cost what the real lengths need; only padding is cut (1: always
        `response_length`). One-jit iterations always use `response_length`.
      shared_prefill: with `group_size > 1`, prefill each distinct prompt once and repeat its KV
        cache to its completions (`generate(..., num_samples=group_size)`). False prefills the
        repeated prompts (the same samples for the same key; kept to measure the difference).
      ptx_coef: weight of the PPO-ptx language-modelling loss on a pretraining batch (the
        trainers' `ptx_data`; 0: none).
    """

    #: Whether the algorithm trains a value function (a critic) beside the policy.
    has_critic: ClassVar[bool] = False

    response_length: int = 53
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    stop_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    missing_eos_penalty: float | None = None
    num_mini_batches: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: float = 3e-6
    total_iterations: int = 1000
    warmup_iterations: int = 0
    lr_decay: Decay = "linear"
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    adam_eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    entropy_coef: float = 0.0
    recompute_old_logprobs: bool = False
    lora_merged_decode: bool = False
    logprob_chunk_size: int | None = 128
    log_entropy: bool = True
    decode_chunks: int | None = None
    length_buckets: int = 4
    shared_prefill: bool = True
    ptx_coef: float = 0.0

    def __post_init__(self) -> None:
        """Validates the shared options and the batch layout (ValueError naming the option);
        a subclass validates its own options first, then calls this."""
        if type(self).advantages is RLConfig.advantages:
            raise TypeError(
                f"{type(self).__name__} is not an algorithm: use PPOConfig, RLOOConfig, "
                "GRPOConfig or ReinforcePPConfig, or implement the hooks"
            )
        if self.num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1, got {self.num_prompts}")
        if self.epochs < 1:
            raise ValueError(f"the number of update epochs must be >= 1, got {self.epochs}")
        per_update = self.num_mini_batches * self.gradient_accumulation_steps
        if self.num_mini_batches < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError("num_mini_batches and gradient_accumulation_steps must be >= 1")
        if self.batch_size % per_update:
            raise ValueError(
                f"{self.batch_description} must be a positive multiple of num_mini_batches "
                f"({self.num_mini_batches}) x gradient_accumulation_steps "
                f"({self.gradient_accumulation_steps}) = {per_update}; change one of them"
            )
        if self.ptx_coef < 0:
            raise ValueError(f"ptx_coef must be >= 0, got {self.ptx_coef}")
        self.check_common()
        self.kl_controller()  # validates the KL options with their own messages

    # ------------------------------------------------------------------- the algorithm's hooks

    # A subclass also defines (as fields or properties) `num_prompts` (prompts per iteration)
    # and `batch_size` (rows per iteration, `num_prompts * group_size`: `GroupedConfig` derives
    # it), and names its own options for these two:

    #: The field holding the completions per prompt (None: one).
    group_size_field: ClassVar[str | None] = None
    #: The field holding the passes of the update over each batch.
    epochs_field: ClassVar[str] = ""

    @property
    def group_size(self) -> int:
        """Completions per prompt (contiguous rows `n*k .. n*k + k - 1` for prompt `n`)."""
        return 1 if self.group_size_field is None else getattr(self, self.group_size_field)

    @property
    def epochs(self) -> int:
        """Passes of the update over each batch."""
        return getattr(self, self.epochs_field)

    @property
    def needs_ref(self) -> bool:
        """Whether the reference policy's log-probs are needed (any KL term)."""
        return True

    @property
    def global_token_norm(self) -> bool:
        """Whether the policy loss is a token mean over the whole minibatch (TRL's "dapo"):
        each micro-batch's loss is scaled by `token_scale` (`update.minibatch_token_scales`)."""
        return False

    @property
    def score_extra_columns(self) -> int:
        """Response columns the score may sit after the last token (PPO's "after_last_token")."""
        return 0

    def value_mask(self, sequence_lengths: jax.Array, length: int) -> jax.Array | None:
        """With a critic: bool `[B, length]`, the positions whose values are trained."""
        return None

    def kl_controller(self) -> KLController:
        """The controller of the KL coefficient in the reward: `kl_coef`, adapted toward
        `kl_target` over `kl_horizon` (Ziegler et al.) when that is set, for algorithms with
        these options; 0 for those without (their KL, if any, is a loss term)."""
        kl_coef = getattr(self, "kl_coef", 0.0)
        if getattr(self, "kl_target", None) is None:
            return fixed_kl_controller(kl_coef)
        return adaptive_kl_controller(kl_coef, target=self.kl_target, horizon=self.kl_horizon)

    def advantages(self, roll: Any, scores_B: jax.Array, kl_coef: jax.Array) -> Advantages:
        """Scores `[B]` (stop penalty applied) and the `core.Rollout` -> `Advantages`."""
        raise NotImplementedError

    def policy_objective(
        self, logprobs_BT: jax.Array, mb: Any, token_scale: jax.Array, algo_state: Any
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The policy loss of a micro-batch (`mb`: a `core.Experience` of `U` rows) from the
        current policy's log-probs `[U, T]`
        (`INVALID_LOGPROB` outside `mb.mask`). aux: `approx_kl`, `clipfrac`, `ratio_mean`,
        `ratio_var`, `ratio_max`, optionally `dual_clipfrac`, `kl_loss`, `kl_mean`,
        `penalty_kl`."""
        raise NotImplementedError

    def init_algo_state(self) -> Any:
        """State the algorithm adapts across iterations (a pytree; None: none)."""
        return None

    def after_update(
        self, algo_state: Any, metrics: dict[str, jax.Array]
    ) -> tuple[Any, dict[str, jax.Array]]:
        """The algorithm state for the next iteration from this iteration's update metrics."""
        return algo_state, metrics

    # ----------------------------------------------------------------------- derived values

    @property
    def batch_description(self) -> str:
        return (
            f"the batch of num_prompts x group_size = {self.num_prompts} x {self.group_size} = "
            f"{self.batch_size} completions"
        )

    @property
    def steps_per_iteration(self) -> int:
        """Optimiser steps per iteration (epochs x minibatches)."""
        return self.epochs * self.num_mini_batches

    def check_common(self) -> None:
        """Normalises `stop_token_ids` and validates the shared options."""
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        for name in ("response_length", "total_iterations", "num_mini_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.length_buckets < 1:
            raise ValueError(f"length_buckets must be >= 1, got {self.length_buckets}")
        if self.gradient_accumulation_steps < 1 or self.warmup_iterations < 0:
            raise ValueError(
                "gradient_accumulation_steps must be >= 1 and warmup_iterations >= 0, got "
                f"{self.gradient_accumulation_steps}, {self.warmup_iterations}"
            )
        if self.logprob_chunk_size is not None and self.logprob_chunk_size < 1:
            raise ValueError(
                f"logprob_chunk_size must be >= 1 (or null: no chunking), got "
                f"{self.logprob_chunk_size}"
            )
        check_schedule(self.lr_decay, self.min_lr_ratio)
        self.sampling_config()  # validates temperature and the filters with their own messages

    @property
    def micro_batch_size(self) -> int:
        """Rows per micro-batch: `batch_size / (num_mini_batches * gradient_accumulation_steps)`."""
        return self.batch_size // (self.num_mini_batches * self.gradient_accumulation_steps)

    def sampling_config(self) -> SamplingConfig:
        """The rollout's sampler."""
        return SamplingConfig(
            max_new_tokens=self.response_length,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
            stop_token_ids=self.stop_token_ids,
            pad_token_id=self.pad_token_id,
            decode_chunks=self.decode_chunks,
        )

    def response_buckets(self) -> tuple[int, ...]:
        """The static response widths of `length_buckets` (ascending, the last
        `response_length`): near-equal steps."""
        n, length = self.length_buckets, self.response_length
        return tuple(sorted({math.ceil(k * length / n) for k in range(1, n + 1)}))

    def bucket_width(self, sequence_lengths: Any) -> int:
        """The smallest of `response_buckets()` holding every response of a batch
        (`sequence_lengths`: host ints, each row's last real token index), plus
        `score_extra_columns`."""
        needed = int(max(sequence_lengths)) + 1 + self.score_extra_columns
        needed = min(needed, self.response_length)
        return next(w for w in self.response_buckets() if w >= needed)

    def lr_schedule(self, peak_lr: float | None = None) -> optax.Schedule:
        """Learning rate per optimiser step (`optim.lr_schedule` in units of iterations);
        `peak_lr` defaults to `learning_rate`."""
        return lr_schedule(
            self.learning_rate if peak_lr is None else peak_lr,
            total=self.total_iterations,
            warmup=self.warmup_iterations,
            steps_per_unit=self.steps_per_iteration,
            decay=self.lr_decay,
            min_lr_ratio=self.min_lr_ratio,
        )

    def learning_rate_at(self, iteration: jax.Array, peak_lr: float | None = None) -> jax.Array:
        """The learning rate used during `iteration` (0-based)."""
        return self.lr_schedule(peak_lr)(jnp.asarray(iteration) * self.steps_per_iteration)

    def optimizer(self, peak_lr: float | None = None) -> optax.GradientTransformation:
        """AdamW (after global-norm clipping unless `max_grad_norm` is None) on `lr_schedule`."""
        return adamw(
            self.lr_schedule(peak_lr),
            weight_decay=self.weight_decay,
            eps=self.adam_eps,
            max_grad_norm=self.max_grad_norm,
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class GroupedConfig(RLConfig):
    """An `RLConfig` whose batch is `num_prompts` prompts x `group_size` completions (the
    subclass defines `group_size`), as the critic-free algorithms size it.

    Attributes:
      num_prompts: prompts per iteration.
    """

    num_prompts: int

    @property
    def batch_size(self) -> int:
        """Rows (completions) per iteration: `num_prompts * group_size`."""
        return self.num_prompts * self.group_size
