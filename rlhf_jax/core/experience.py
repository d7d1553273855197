"""One batch of experience: a rollout and its scores turned into what the update trains on."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from rlhf_jax.core.config import RLConfig
from rlhf_jax.core.rollout import Rollout
from rlhf_jax.ops import masked_mean, masked_sum
from rlhf_jax.rewards import apply_missing_stop_penalty


class Experience(flax.struct.PyTreeNode):
    """One batch of rollouts with everything the update needs. Arrays are `[B, ...]`.

    `mask` marks real response tokens (policy loss). With a critic `value_mask` marks the
    positions whose values are trained (up to the score position: equal to `mask` unless the
    score sits one later) and `values` holds the rollout's values; both are None without one.
    Log-probs hold `INVALID_LOGPROB` and values and advantages 0 outside their masks.
    """

    prompts: jax.Array  # int32 [B, P], left-padded, each prompt repeated group_size times
    prompt_mask: jax.Array  # bool [B, P]
    responses: jax.Array  # int32 [B, T], truncated, right-padded
    mask: jax.Array  # bool [B, T]
    old_logprobs: jax.Array  # float32 [B, T]
    ref_logprobs: jax.Array  # float32 [B, T]
    scores: jax.Array  # float32 [B], penalties and the algorithm's processing applied
    advantages: jax.Array  # float32 [B, T]
    returns: jax.Array  # float32 [B, T]
    sequence_lengths: jax.Array  # int32 [B]
    value_mask: jax.Array | None = None  # bool [B, T], with a critic
    values: jax.Array | None = None  # float32 [B, T], with a critic
    rewards: jax.Array | None = None  # float32 [B, T], per-token rewards where built (PPO)


def build_experience(
    roll: Rollout, scores_B: jax.Array, kl_coef: jax.Array, *, config: RLConfig
) -> tuple[Experience, dict[str, jax.Array]]:
    """Scores -> missing-stop penalty -> the algorithm's advantages (`config.advantages`: the KL
    in the reward, baselines, GAE with a critic) -> `Experience` and the experience metrics (TRL's
    names: `objective/kl`, `objective/scores`, ...).

    Args:
      roll: a `Rollout` (possibly cut with `slice_rollout`).
      scores_B: float `[B]` sequence-level rewards (reward model and/or reward functions).
      kl_coef: the coefficient of the KL in the reward (the state's `kl.kl_coef`).
    """
    gen = roll.generation
    batch = gen.tokens.shape[0]
    raw_scores = jnp.asarray(scores_B, jnp.float32)
    if raw_scores.shape != (batch,):
        raise ValueError(
            f"scores must have shape [B]=[{batch}] (num_prompts x group_size), got "
            f"{list(raw_scores.shape)}"
        )
    kl_coef = jnp.asarray(kl_coef, jnp.float32)
    scores = apply_missing_stop_penalty(raw_scores, gen.stopped, config.missing_eos_penalty)
    adv = config.advantages(roll, scores, kl_coef)
    value_mask = config.value_mask(gen.sequence_lengths, gen.tokens.shape[1])
    exp = Experience(
        prompts=roll.prompts,
        prompt_mask=roll.prompt_mask,
        responses=gen.tokens,
        mask=gen.mask,
        old_logprobs=roll.old_logprobs,
        ref_logprobs=roll.ref_logprobs,
        scores=adv.scores,
        advantages=adv.advantages,
        returns=adv.returns,
        sequence_lengths=gen.sequence_lengths,
        value_mask=value_mask,
        values=roll.values,
        rewards=adv.rewards,
    )
    lengths = (gen.sequence_lengths + 1).astype(jnp.float32)
    metrics = {
        "objective/kl": jnp.mean(adv.kl),
        "objective/entropy": jnp.mean(masked_sum(-roll.old_logprobs, gen.mask, axis=1)),
        "objective/non_score_reward": jnp.mean(adv.non_score),
        "objective/rlhf_reward": jnp.mean(adv.non_score) + jnp.mean(adv.scores),
        "objective/scores": jnp.mean(adv.scores),
        "objective/raw_scores": jnp.mean(raw_scores),
        "objective/kl_coef": kl_coef,
        "val/num_eos_tokens": jnp.sum(gen.stopped).astype(jnp.float32),
        "response/length_mean": jnp.mean(lengths),
        "response/length_min": jnp.min(lengths),
        "response/length_max": jnp.max(lengths),
        "val/advantages_mean": masked_mean(adv.advantages, gen.mask),
        "val/advantages_abs_mean": masked_mean(jnp.abs(adv.advantages), gen.mask),
        "nonfinite/scores": jnp.sum(~jnp.isfinite(raw_scores)).astype(jnp.float32),
        "nonfinite/advantages": jnp.sum(~jnp.isfinite(adv.advantages) & gen.mask).astype(
            jnp.float32
        ),
        **adv.metrics,
    }
    if config.group_size > 1:  # how much the completions of a prompt differ
        group_std = jnp.std(raw_scores.reshape(-1, config.group_size), axis=1, ddof=1)
        metrics["reward/group_std"] = jnp.mean(group_std)
        metrics["reward/frac_zero_std"] = jnp.mean((group_std == 0).astype(jnp.float32))
    if gen.decode_steps is not None:  # steps run before every row stopped (early exit)
        metrics["perf/decode_steps"] = gen.decode_steps.astype(jnp.float32)
    return exp, metrics
