"""The rollout of every RL algorithm: sample, then the forwards the update needs.

`rollout` samples `group_size` completions for each of `num_prompts` prompts (prompt `n`'s at
rows `n*k .. n*k + k - 1`: each prompt is prefilled once and its KV cache repeated, so groups
stay contiguous and a batch sharded over whole groups needs no communication for group
baselines), then runs, as the algorithm needs them, the policy's training-style forward (old
log-probs), the reference (KL terms) and the value function (a critic). The reward model scores
separately (`score_rollout`), so the phased trainers score on the response columns cut to the
batch's length bucket (`slice_rollout`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax.core.config import RLConfig
from rlhf_jax.core.forward import (
    policy_logprobs,
    response_hidden,
    reward_scores,
    value_estimates,
    values_from_hidden,
)
from rlhf_jax.core.state import FrozenParams, RLModels, RLState, reference_params, reward_params
from rlhf_jax.models import lora
from rlhf_jax.rewards import check_missing_stop_penalty
from rlhf_jax.sampling import Generation, SamplingConfig, generate

Params = Any


class Rollout(NamedTuple):
    """Model outputs of a rollout, `B = num_prompts * group_size` rows in contiguous groups.

    Attributes:
      prompts, prompt_mask: `[B, P]` left-padded prompts, each repeated `group_size` times.
      generation: the sampled responses (`[B, T]` tokens, mask, sampler log-probs, ...).
      old_logprobs: float32 `[B, T]` log-probs under the sampling policy (`INVALID_LOGPROB` on
        padding).
      ref_logprobs: the reference policy's; equal to `old_logprobs` when the algorithm uses no
        KL (the reference never runs).
      values: float32 `[B, T]` with a critic (0 outside `RLConfig.value_mask`), else None.
      model_scores: float32 `[B]` reward-model scores where a host score function gets them
        (`make_host_iteration`), else None.
    """

    prompts: jax.Array
    prompt_mask: jax.Array
    generation: Generation
    old_logprobs: jax.Array
    ref_logprobs: jax.Array
    values: jax.Array | None = None
    model_scores: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class RolloutSpec:
    """Everything `rollout` depends on (hashable). Configs that differ only in update options
    share it, so their jitted rollouts share one compilation (`shared_rollout`)."""

    num_prompts: int
    group_size: int
    sampling: SamplingConfig
    recompute_old_logprobs: bool
    logprob_chunk_size: int | None
    needs_ref: bool
    shared_prefill: bool = True
    lora_merged_decode: bool = False
    critic: RLConfig | None = None  # the config, with a critic (its `value_mask`)


def rollout_spec(config: RLConfig) -> RolloutSpec:
    """The `RolloutSpec` of `config`."""
    return RolloutSpec(
        num_prompts=config.num_prompts,
        group_size=config.group_size,
        sampling=config.sampling_config(),
        recompute_old_logprobs=config.recompute_old_logprobs,
        logprob_chunk_size=config.logprob_chunk_size,
        needs_ref=config.needs_ref,
        shared_prefill=config.shared_prefill,
        lora_merged_decode=config.lora_merged_decode,
        critic=config if config.has_critic else None,
    )


def state_values(
    policy_params: Params,
    value_params: Params,
    rl_models: RLModels,
    prompts_BP: jax.Array,
    prompt_mask_BP: jax.Array,
    responses_BT: jax.Array,
    mask_BT: jax.Array,
    value_mask_BT: jax.Array,
) -> jax.Array:
    """Values `[B, T]` (float32, 0 outside `value_mask_BT`) from the value model, or from the
    value head on the policy trunk (`rl_models.shared_value_head`)."""
    common = (prompts_BP, prompt_mask_BP, responses_BT, mask_BT)
    if rl_models.shared_value_head:
        hidden = response_hidden(policy_params, rl_models.policy, *common)
        return values_from_hidden(value_params, rl_models.value_head, hidden, value_mask_BT)
    return value_estimates(value_params, rl_models.value, *common, value_mask_BT)


def rollout(
    state: RLState,
    frozen: FrozenParams,
    prompts_NP: jax.Array,
    prompt_mask_NP: jax.Array,
    key: jax.Array,
    *,
    config: RLConfig,
    rl_models: RLModels,
) -> Rollout:
    """Samples `group_size` completions per prompt and runs the forwards the algorithm needs.

    Args:
      state, frozen: the train state and the frozen params (`frozen.ref` is read only when the
        algorithm uses a KL and the policy has no LoRA; `frozen.reward` is not read here).
      prompts_NP, prompt_mask_NP: `[num_prompts, P]` left-padded prompts and their mask (any
        sharding; replicated in the jitted iterations).
      key: the sampling key.
    Returns:
      A `Rollout` of `B = num_prompts * group_size` rows, prompt `n` at rows `n*k .. n*k + k-1`.
    """
    check_missing_stop_penalty(config.missing_eos_penalty, config.stop_token_ids)
    return rollout_from_spec(
        state,
        frozen,
        prompts_NP,
        prompt_mask_NP,
        key,
        spec=rollout_spec(config),
        rl_models=rl_models,
    )


def rollout_from_spec(
    state: RLState,
    frozen: FrozenParams,
    prompts_NP: jax.Array,
    prompt_mask_NP: jax.Array,
    key: jax.Array,
    *,
    spec: RolloutSpec,
    rl_models: RLModels,
) -> Rollout:
    """`rollout` given the config's `rollout_spec`."""
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
    ref = reference_params(state, frozen, rl_models) if spec.needs_ref else None
    k = spec.group_size
    prompts_BP = jnp.repeat(prompts_NP, k, axis=0) if k > 1 else prompts_NP
    prompt_mask_BP = jnp.repeat(prompt_mask_NP, k, axis=0) if k > 1 else prompt_mask_NP
    if spec.shared_prefill:  # one prefill per prompt, its cache repeated to the k rows
        prompts_in, mask_in, num_samples = prompts_NP, prompt_mask_NP, k
    else:
        prompts_in, mask_in, num_samples = prompts_BP, prompt_mask_BP, 1
    sample_params, sample_config = state.policy_params, rl_models.policy
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
            state.policy_params, rl_models.policy, *common, **logprob_kwargs
        )
    ref_logprobs = old_logprobs
    if ref is not None:
        ref_logprobs, _ = policy_logprobs(ref, rl_models.policy, *common, **logprob_kwargs)
    values = None
    if spec.critic is not None:
        value_mask = spec.critic.value_mask(gen.sequence_lengths, gen.tokens.shape[1])
        values = state_values(
            state.policy_params, state.value_params, rl_models, *common, value_mask
        )
    return Rollout(prompts_BP, prompt_mask_BP, gen, old_logprobs, ref_logprobs, values)


#: `rollout_from_spec` jitted once per (spec, models): shared by every `make_host_iteration`.
shared_rollout = jax.jit(rollout_from_spec, static_argnames=("spec", "rl_models"))


def slice_rollout(roll: Rollout, width: int) -> Rollout:
    """`roll` with its response columns cut to the first `width`. When every response fits
    (`RLConfig.bucket_width`), only padding is cut (masks 0, `INVALID_LOGPROB`, values 0), and
    scoring, `build_experience` and `update` on the result equal the full-width ones up to float
    rounding: every statistic is a masked one, and length-normalised losses divide by
    `response_length`, not by the width."""
    if width == roll.generation.tokens.shape[1]:
        return roll
    cut = lambda x: None if x is None else x[:, :width]
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


def score_rollout(
    state: RLState, frozen: FrozenParams, roll: Rollout, *, rl_models: RLModels
) -> jax.Array:
    """The reward model's scores `[B]` (float32) of the rollout's responses (cut them first with
    `slice_rollout` to score only the length bucket)."""
    if rl_models.reward is None:
        raise ValueError(
            "rl_models.reward is None: there is no reward model to score with; pass scores from "
            "your reward functions (make_host_iteration)"
        )
    gen = roll.generation
    params = reward_params(state, frozen, rl_models)
    return reward_scores(
        params, rl_models.reward, roll.prompts, roll.prompt_mask, gen.tokens, gen.mask
    )
