"""LoRA through the RL cores: the reference is the policy's base with the adapters off, only the
adapters (and trained heads) get gradients and optimiser state, the base stays bit-identical, and
LoRA PPO / GRPO learn the tiny tasks."""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import numpy as np
import pytest
from test_critic_free import GRPO, decode, tiny_prompts
from test_ppo import STOP, TINY, TINY_RM, left_padded
from tolerances import EPS32, MODEL, assert_f32_close

import rlhf_jax as rj
from rlhf_jax import core, models
from rlhf_jax import reward_functions as rf
from rlhf_jax.models import lora

LORA = models.LoRAConfig(rank=8, alpha=16.0)
# Adapters change hidden states only; the final RMSNorm bounds them, so with the tiny model's
# normal(0.02) LM head no hidden state can move a logit by more than ~0.6 and LoRA cannot learn
# the task (full fine-tuning grows the head). A wider init gives the head room, as real models have.
TINY_L = dataclasses.replace(TINY, lora=LORA, initializer_range=0.2)
# A LoRA value model on the reward model's base: its new score head trains whole.
VALUE_L = dataclasses.replace(TINY_RM, lora=dataclasses.replace(LORA, train_modules=("score",)))


def _lora_ppo_setup(**overrides):
    config = rj.PPOConfig(
        **{
            "batch_size": 16,
            "response_length": 8,
            "stop_token_ids": (STOP,),
            "num_mini_batches": 2,
            "gradient_accumulation_steps": 2,
            "learning_rate": 3e-3,
            "value_learning_rate": 3e-3,
            "temperature": 1.0,
            "total_iterations": 100,
            "kl_coef": 0.01,
            **overrides,
        }
    )
    policy = models.init_params(TINY_L, jax.random.key(0))
    reward = models.init_params(TINY_RM, jax.random.key(1))
    reward["score"]["kernel"] = reward["score"]["kernel"] * 30.0
    value = lora.join(
        lora.split(models.init_params(VALUE_L, jax.random.key(2)), VALUE_L.lora)[0],
        reward,  # the reward model's base and head, plus fresh adapters
    )
    rl_models = rj.RLModels(policy=TINY_L, value=VALUE_L, reward=TINY_RM)
    state = rj.init_state(policy, config, rl_models, value_params=value)
    frozen = rj.FrozenParams(ref=None, reward=reward)  # the reference: the policy's base
    prompts, mask = left_padded(config.batch_size, 6, TINY.vocab_size, seed=3)
    return config, rl_models, state, frozen, prompts, mask


@functools.cache
def _iteration(config, rl_models):
    @chex.assert_max_traces(n=1)
    def one(state, frozen, prompts, mask, key):
        return rj.iteration(state, frozen, prompts, mask, key, config=config, rl_models=rl_models)

    return jax.jit(one, donate_argnums=(0,))


def test_lora_ppo_learns_trains_only_adapters_and_keeps_the_base():
    config, rl_models, state, frozen, prompts, mask = _lora_ppo_setup()
    base_policy = jax.device_get(lora.split(state.policy_params, TINY_L.lora)[1])
    base_value = jax.device_get(lora.split(state.value_params, VALUE_L.lora)[1])
    adapters0 = jax.device_get(lora.split(state.policy_params, TINY_L.lora)[0])
    # Optimiser state only for the trainable halves (Adam's mu and nu mirror them).
    n_train = len(jax.tree.leaves(lora.split(state.policy_params, TINY_L.lora)[0]))
    n_all = len(jax.tree.leaves(state.policy_params))
    assert n_train == 14 and n_all > n_train
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert len(moments) == 2 * n_train
    # The reference log-probs are the base model's.
    roll = jax.jit(functools.partial(rj.rollout, config=config, rl_models=rl_models))(
        state, frozen, prompts, mask, jax.random.key(0)
    )
    gen = roll.generation
    want, _ = core.policy_logprobs(
        base_policy,
        dataclasses.replace(TINY_L, lora=None),
        roll.prompts,
        roll.prompt_mask,
        gen.tokens,
        gen.mask,
        temperature=config.temperature,
    )
    assert_f32_close(roll.ref_logprobs, want, ulps=MODEL)

    iteration = _iteration(config, rl_models)
    scores = []
    for i in range(25):
        state, metrics = iteration(state, frozen, prompts, mask, jax.random.key(i))
        rj.check_finite(metrics, i)
        scores.append(float(metrics["objective/raw_scores"]))
        assert float(metrics["policy/first_ratio_std"]) < MODEL * EPS32
    assert np.mean(scores[-5:]) > np.mean(scores[:5]) + 1.0, np.round(scores, 2)
    chex.assert_trees_all_equal(lora.split(state.policy_params, TINY_L.lora)[1], base_policy)
    chex.assert_trees_all_equal(lora.split(state.value_params, VALUE_L.lora)[1], base_value)
    moved = jax.tree.map(
        lambda a, b: float(np.abs(np.asarray(a) - b).max()),
        lora.split(state.policy_params, TINY_L.lora)[0],
        adapters0,
    )
    assert min(jax.tree.leaves(moved)) > 0  # every adapter trained
    assert float(np.abs(np.asarray(state.value_params["score"]["kernel"])).max()) > 0


def test_lora_grpo_raises_a_python_reward_with_the_base_as_reference():
    config = GRPO
    policy = models.init_params(TINY_L, jax.random.key(0))
    rl_models = rj.RLModels(policy=TINY_L)
    state = rj.init_state(policy, config, rl_models)
    base0 = jax.device_get(lora.split(state.policy_params, TINY_L.lora)[1])
    frozen = rj.FrozenParams()  # beta > 0: the reference is the base, adapters off
    prompts, mask = tiny_prompts()
    terms = rf.reward_terms(["test_critic_free:early_letter_fraction"])
    step = rj.make_host_iteration(config, rl_models, rf.make_score_fn(terms, decode, 4))
    scores = []
    for i in range(10):
        state, metrics = step(state, frozen, prompts, mask, jax.random.key(i), ["p"] * 4)
        rj.check_finite(metrics, i)
        scores.append(metrics["objective/raw_scores"])
    assert np.mean(scores[-3:]) > np.mean(scores[:3]) + 0.15, np.round(scores, 2)
    chex.assert_trees_all_equal(lora.split(state.policy_params, TINY_L.lora)[1], base0)
    assert float(metrics["policy/kl_avg"]) > 0  # the KL to the base is live


def test_init_state_needs_the_models_for_lora_params():
    policy = models.init_params(TINY_L, jax.random.key(0))
    with pytest.raises(ValueError, match="pass rl_models"):
        rj.init_state(policy, GRPO)
    with pytest.raises(ValueError, match="pass rl_models"):
        rj.init_state(
            policy,
            rj.PPOConfig(batch_size=16),
            value_params=models.init_params(TINY_RM, jax.random.key(1)),
        )


def test_value_sharing_the_reward_base_equals_a_separate_copy():
    """`value_shares_reward_base`: the reward model is the value model's frozen base plus the
    reward head (`FrozenParams.reward` holds only the head): the same iterations as a run that
    keeps a second copy of the reward base."""
    config, rl_models, state, frozen, prompts, mask = _lora_ppo_setup()
    shared_models = dataclasses.replace(rl_models, value_shares_reward_base=True)
    shared_frozen = frozen._replace(reward={"score": frozen.reward["score"]})
    copy = jax.tree.map(np.asarray, state)
    step = jax.jit(functools.partial(rj.iteration, config=config, rl_models=rl_models))
    shared_step = jax.jit(functools.partial(rj.iteration, config=config, rl_models=shared_models))
    shared_state = copy
    for i in range(2):
        state, metrics = step(state, frozen, prompts, mask, jax.random.key(i))
        shared_state, shared_metrics = shared_step(
            shared_state, shared_frozen, prompts, mask, jax.random.key(i)
        )
        assert_f32_close(shared_metrics, metrics, ulps=MODEL, per_leaf=True)
    assert_f32_close(shared_state.value_params, state.value_params, ulps=MODEL)
    with pytest.raises(ValueError, match="value_shares_reward_base needs"):
        rj.RLModels(policy=TINY_L, value=TINY_RM, reward=TINY_RM, value_shares_reward_base=True)


def test_merged_decode_samples_what_unmerged_decode_samples():
    """`lora_merged_decode`: the rollout samples from merged weights; in float32 the same tokens
    and log-probs (up to rounding) as the unmerged default."""
    config, rl_models, state, frozen, prompts, mask = _lora_ppo_setup()
    trainable, base = lora.split(state.policy_params, TINY_L.lora)
    trained = jax.tree.map(lambda x: x + 0.02, trainable)  # non-zero B: a trained adapter
    state = state.replace(policy_params=lora.join(trained, base))
    rolls = {}
    for merged in (False, True):
        c = dataclasses.replace(config, lora_merged_decode=merged)
        fn = jax.jit(functools.partial(rj.rollout, config=c, rl_models=rl_models))
        rolls[merged] = fn(state, frozen, prompts, mask, jax.random.key(0))
    np.testing.assert_array_equal(rolls[True].generation.tokens, rolls[False].generation.tokens)
    assert_f32_close(rolls[True].old_logprobs, rolls[False].old_logprobs, ulps=MODEL)
