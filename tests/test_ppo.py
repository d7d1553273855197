"""PPO: one iteration against a PyTorch transcription of TRL 0.17's PPOTrainer loop, the
first-minibatch invariants, learning on a tiny task, one compilation, and bad input."""

import copy
import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from hf_utils import PAD_ID, state_dict_numpy, tiny_hf_model
from tolerances import EPS32, GRADIENT, MODEL, REORDERED, assert_f32_close

import rlhf_jax as rj
from rlhf_jax import core, models
from rlhf_jax.models import config_from_hf, hf_to_params, params_to_hf
from rlhf_jax.sampling import SamplingConfig, generate

STOP = 2
TEMPERATURE = 0.7


def left_padded(batch, length, vocab, seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, size=(batch, length))
    real = rng.integers(2, length + 1, size=batch)
    mask = np.arange(length)[None, :] >= (length - real)[:, None]
    return np.where(mask, tokens, PAD_ID).astype(np.int32), mask


# ------------------------------------------------------------------ TRL 0.17, transcribed in torch


def trl_first_true_indices(bools):
    row_len = bools.size(-1)
    zero_or_index = row_len * (~bools).type(torch.long) + torch.arange(row_len)
    return torch.min(zero_or_index, dim=-1).values


def trl_truncate_response(stop_token_id, pad_token_id, responses):
    trunc_idxs = trl_first_true_indices(responses == stop_token_id).unsqueeze(-1)
    idxs = torch.arange(responses.size(1)).view(*([1] * (responses.dim() - 1)), -1)
    return torch.masked_fill(responses, idxs > trunc_idxs, pad_token_id)


def trl_selective_log_softmax(logits, index):
    selected = torch.gather(logits, dim=-1, index=index.unsqueeze(-1)).squeeze(-1)
    return selected - torch.logsumexp(logits, dim=-1)


def trl_masked_mean(values, mask):
    return (values * mask).sum() / mask.sum()


def trl_masked_var(values, mask):
    mean = trl_masked_mean(values, mask)
    variance = trl_masked_mean((values - mean) ** 2, mask)
    return variance * mask.sum() / (mask.sum() - 1)


def trl_masked_whiten(values, mask, shift_mean=True):
    mean, var = trl_masked_mean(values, mask), trl_masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def trl_backbone_hidden(model, query_responses, pad):
    attention_mask = query_responses != pad
    position_ids = attention_mask.cumsum(1) - attention_mask.long()
    input_ids = torch.masked_fill(query_responses, ~attention_mask, 0)
    backbone = getattr(model, model.base_model_prefix)
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    return out.last_hidden_state


def trl_policy_logits(model, query_responses, pad):
    attention_mask = query_responses != pad
    position_ids = attention_mask.cumsum(1) - attention_mask.long()
    input_ids = torch.masked_fill(query_responses, ~attention_mask, 0)
    return model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
    ).logits


def trl_get_reward(model, query_responses, pad, context_length):
    reward_logits = model.score(trl_backbone_hidden(model, query_responses, pad))
    lengths = (
        trl_first_true_indices(query_responses[:, context_length:] == pad) - 1 + context_length
    )
    return reward_logits, reward_logits[torch.arange(reward_logits.size(0)), lengths].squeeze(-1)


def trl_iteration(policy, ref_policy, value_model, reward_model, queries, responses, args):
    stop = args.stop_token_ids[0]
    """The experience and first-minibatch loss of TRL 0.17's PPOTrainer.train (one minibatch)."""
    pad, context_length, temp = PAD_ID, queries.shape[1], args.temperature
    with torch.no_grad():
        query_response = torch.cat((queries, responses), 1)
        logits = trl_policy_logits(policy, query_response, pad)[:, context_length - 1 : -1]
        logits /= temp + 1e-7
        logprobs = trl_selective_log_softmax(logits, responses)
        ref_logits = trl_policy_logits(ref_policy, query_response, pad)[:, context_length - 1 : -1]
        ref_logits /= temp + 1e-7
        ref_logprobs = trl_selective_log_softmax(ref_logits, responses)
        postprocessed = trl_truncate_response(stop, pad, responses)
        postprocessed_query_response = torch.cat((queries, postprocessed), 1)
        sequence_lengths = trl_first_true_indices(postprocessed == pad) - 1
        full_value, _ = trl_get_reward(value_model, query_response, pad, context_length)
        values = full_value[:, context_length - 1 : -1].squeeze(-1)
        _, scores = trl_get_reward(reward_model, postprocessed_query_response, pad, context_length)
        contain_eos_token = torch.any(postprocessed == stop, dim=-1)
        scores[~contain_eos_token] -= args.missing_eos_penalty
        response_idxs = torch.arange(responses.shape[1]).repeat(responses.shape[0], 1)
        padding_mask = response_idxs > sequence_lengths.unsqueeze(1)
        logprobs = torch.masked_fill(logprobs, padding_mask, 1.0)
        ref_logprobs = torch.masked_fill(ref_logprobs, padding_mask, 1.0)
        # TRL's score goes one position after the last token; our default, on the last token,
        # is this transcription with that shift removed (then padding_mask_p1 == padding_mask).
        sequence_lengths_p1 = sequence_lengths + (args.score_position == "after_last_token")
        padding_mask_p1 = response_idxs > sequence_lengths_p1.unsqueeze(1)
        values = torch.masked_fill(values, padding_mask_p1, 0)
        logr = ref_logprobs - logprobs
        kl = -logr if args.kl_estimator == "k1" else (logr.exp() - 1) - logr
        non_score_reward = -args.kl_coef * kl
        rewards = non_score_reward.clone()
        actual_start = torch.arange(rewards.size(0))
        actual_end = torch.where(
            sequence_lengths_p1 < rewards.size(1), sequence_lengths_p1, sequence_lengths
        )
        rewards[actual_start, actual_end] += scores
        if args.whiten_rewards:
            rewards = trl_masked_whiten(rewards, mask=~padding_mask_p1, shift_mean=False)
            rewards = torch.masked_fill(rewards, padding_mask_p1, 0)
        lastgaelam, advantages_reversed, gen_length = 0, [], responses.shape[1]
        for t in reversed(range(gen_length)):
            nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
            delta = rewards[:, t] + args.gamma * nextvalues - values[:, t]
            lastgaelam = delta + args.gamma * args.lam * lastgaelam
            advantages_reversed.append(lastgaelam)
        advantages = torch.stack(advantages_reversed[::-1], axis=1)
        returns = advantages + values
        advantages = trl_masked_whiten(advantages, ~padding_mask)
        advantages = torch.masked_fill(advantages, padding_mask, 0)

    # First minibatch of the first epoch (the whole batch: num_mini_batches = 1).
    new_logits = trl_policy_logits(policy, query_response, pad)[:, context_length - 1 : -1]
    new_logits = new_logits / (temp + 1e-7)
    new_logprobs = trl_selective_log_softmax(new_logits, responses)
    new_logprobs = torch.masked_fill(new_logprobs, padding_mask, 1.0)
    vpred = value_model.score(trl_backbone_hidden(value_model, query_response, pad))
    vpred = vpred[:, context_length - 1 : -1].squeeze(-1)
    vpred = torch.masked_fill(vpred, padding_mask_p1, 0)
    vpredclipped = torch.clamp(vpred, values - args.cliprange_value, values + args.cliprange_value)
    vf_losses1 = torch.square(vpred - returns)
    vf_losses2 = torch.square(vpredclipped - returns)
    vf_loss = 0.5 * trl_masked_mean(torch.max(vf_losses1, vf_losses2), ~padding_mask_p1)
    ratio = torch.exp(new_logprobs - logprobs)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - args.cliprange, 1.0 + args.cliprange)
    pg_loss = trl_masked_mean(torch.max(pg_losses, pg_losses2), ~padding_mask)
    loss = pg_loss + args.vf_coef * vf_loss
    loss.backward()
    return {
        "old_logprobs": logprobs,
        "ref_logprobs": ref_logprobs,
        "values": values,
        "scores": scores,
        "rewards": rewards,
        "advantages": advantages,
        "returns": returns,
        "pg_loss": pg_loss.detach(),
        "vf_loss": vf_loss.detach(),
    }


@functools.cache
def hf_models():
    policy = tiny_hf_model("llama", seed=0)
    reward = tiny_hf_model("llama", head="score", seed=1)
    return policy, reward


def ours(hf_model):
    config = config_from_hf(hf_model.config)
    return hf_to_params(state_dict_numpy(hf_model), config), config


@pytest.mark.parametrize(
    "kl_estimator, whiten_rewards, score_position",
    [
        ("k1", False, "after_last_token"),
        ("k3", True, "after_last_token"),
        ("k1", True, "last_token"),
    ],
)
def test_one_iteration_matches_trl_transcription(kl_estimator, whiten_rewards, score_position):
    hf_policy, hf_reward = hf_models()
    policy_params, policy_config = ours(hf_policy)
    reward_params, reward_config = ours(hf_reward)
    prompts, prompt_mask = left_padded(6, 5, policy_config.vocab_size, seed=0)
    base = rj.PPOConfig(batch_size=6, response_length=10, pad_token_id=PAD_ID)
    free = rj.generate(
        policy_params,
        policy_config,
        prompts,
        prompt_mask,
        jax.random.key(0),
        base.sampling_config(),
    )
    counts = np.bincount(np.asarray(free.tokens).ravel(), minlength=PAD_ID + 1)
    counts[PAD_ID] = 0
    stop = int(counts.argmax())  # the model's most frequent token, so that rows do stop
    config = dataclasses.replace(
        base,
        stop_token_ids=(stop,),
        missing_eos_penalty=1.0,
        score_position=score_position,
        kl_estimator=kl_estimator,
        whiten_rewards=whiten_rewards,
        num_ppo_epochs=1,
        max_grad_norm=None,
    )
    rl_models = rj.RLModels(policy=policy_config, value=reward_config, reward=reward_config)
    state = rj.init_state(policy_params, config, value_params=reward_params)
    frozen = rj.FrozenParams(ref=policy_params, reward=reward_params)
    make = jax.jit(functools.partial(rj.make_experience, config=config, rl_models=rl_models))
    for seed in range(20):
        exp, _ = make(state, frozen, prompts, prompt_mask, jax.random.key(seed))
        real_pad = np.any((np.asarray(exp.responses) == PAD_ID) & np.asarray(exp.mask))
        stopped = np.asarray(exp.sequence_lengths) < config.response_length - 1
        # TRL reads a real pad token as padding; and truncation must be exercised.
        if not real_pad and stopped.any():
            break
    assert not real_pad and stopped.any(), "no usable rollout: truncation untested"

    torch_policy = copy.deepcopy(hf_policy)
    torch_value = copy.deepcopy(hf_reward)
    want = trl_iteration(
        torch_policy,
        hf_policy,
        torch_value,
        hf_reward,
        torch.as_tensor(prompts, dtype=torch.long),
        torch.as_tensor(np.array(exp.responses), dtype=torch.long),
        config,
    )
    for name in (
        "old_logprobs",
        "ref_logprobs",
        "values",
        "scores",
        "rewards",
        "advantages",
        "returns",
    ):
        # Whitened advantages divide by a std of O(1): measure them against 1, not their max.
        assert_f32_close(
            getattr(exp, name), want[name].numpy(), ulps=MODEL, floor=1.0, err_msg=name
        )

    loss_and_grads = jax.jit(
        jax.value_and_grad(core.loss, argnums=(0, 1), has_aux=True),
        static_argnames=("config", "rl_models"),
    )
    (_, aux), (policy_grads, value_grads) = loss_and_grads(
        state.policy_params,
        state.value_params,
        exp,
        None,
        1.0,
        state.algo_state,
        config=config,
        rl_models=rl_models,
    )
    # The policy loss is a mean of whitened (unit-size) advantages that cancels to near 0.
    assert_f32_close(aux["loss/policy_avg"], want["pg_loss"].numpy(), ulps=MODEL, scale=1.0)
    assert_f32_close(aux["loss/value_avg"], want["vf_loss"].numpy(), ulps=MODEL)
    for grads, hf_model, cfg in (
        (policy_grads, torch_policy, policy_config),
        (value_grads, torch_value, reward_config),
    ):
        ours_by_name = params_to_hf(grads, cfg)
        for name, param in hf_model.named_parameters():
            want_grad = np.zeros(param.shape) if param.grad is None else param.grad.numpy()
            assert_f32_close(ours_by_name[name], want_grad, ulps=GRADIENT, err_msg=name)


# ----------------------------------------------------------------------------- tiny task tests

TINY = models.ModelConfig(
    family="llama",
    vocab_size=32,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    intermediate_size=64,
    max_position_embeddings=64,
)
TINY_RM = dataclasses.replace(TINY, head="score")


def tiny_setup(**overrides):
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
            "kl_target": 0.5,
            "kl_horizon": 100.0,
            **overrides,
        }
    )
    policy = models.init_params(TINY, jax.random.key(0))
    reward = models.init_params(TINY_RM, jax.random.key(1))
    # Random init gives scores of ~0.05; scale the head so they spread over O(1).
    reward["score"]["kernel"] = reward["score"]["kernel"] * 30.0
    rl_models = rj.RLModels(policy=TINY, value=TINY_RM, reward=TINY_RM)
    state = rj.init_state(policy, config, value_params=reward)
    frozen = rj.FrozenParams(ref=policy, reward=reward)
    prompts, mask = left_padded(config.batch_size, 6, TINY.vocab_size, seed=3)
    return config, rl_models, state, frozen, prompts, mask


@functools.cache
def jitted_iteration(config, rl_models):
    """One compiled iteration shared by the tests below; a second trace fails the test."""

    @chex.assert_max_traces(n=1)
    def one_iteration(state, frozen, prompts, mask, key):
        return rj.iteration(state, frozen, prompts, mask, key, config=config, rl_models=rl_models)

    return jax.jit(one_iteration, donate_argnums=(0,))


def test_first_minibatch_ratio_is_one_and_approx_kl_zero():
    config, rl_models, state, frozen, prompts, mask = tiny_setup(recompute_old_logprobs=True)
    exp, _ = jax.jit(functools.partial(rj.make_experience, config=config, rl_models=rl_models))(
        state, frozen, prompts, mask, jax.random.key(0)
    )
    _, aux = jax.jit(functools.partial(core.loss, config=config, rl_models=rl_models))(
        state.policy_params, state.value_params, exp, None, 1.0, state.algo_state
    )
    # The same forward computes both, up to XLA's fusion rounding.
    assert float(aux["val/ratio"]) == 1.0 and float(aux["policy/approxkl_avg"]) < 1e-12


def test_learning_raises_reward_model_score_with_adaptive_kl():
    config, rl_models, state, frozen, prompts, mask = tiny_setup()
    iteration = jitted_iteration(config, rl_models)
    scores, kl_coef = [], config.kl_coef
    for i in range(30):
        state, metrics = iteration(state, frozen, prompts, mask, jax.random.key(i))
        rj.check_finite(metrics, i)
        scores.append(float(metrics["objective/raw_scores"]))
        # Old log-probs come from the sampler (KV cache): float32 rounding of O(1) ratios only.
        assert float(metrics["policy/first_ratio_std"]) < MODEL * EPS32
        assert float(metrics["policy/first_approxkl"]) < 1e-10
        # Ziegler et al.'s controller, fed the batch's mean sequence KL and batch size.
        error = np.clip(float(metrics["objective/kl"]) / 0.5 - 1, -0.2, 0.2)
        kl_coef *= 1 + error * config.batch_size / 100.0
        np.testing.assert_allclose(float(state.kl.kl_coef), kl_coef, rtol=1e-4)
    assert int(state.iteration) == 30 and int(state.episode) == 30 * config.batch_size
    assert np.mean(scores[-5:]) > np.mean(scores[:5]) + 1.0, np.round(scores, 2)
    leaves, treedef = jax.tree.flatten(state)
    rebuilt = jax.tree.unflatten(treedef, leaves)
    chex.assert_trees_all_equal(rebuilt, state)
    assert isinstance(rebuilt, rj.RLState)


def shared_head_setup(**overrides):
    """`tiny_setup` with the value head on the policy trunk (`PPOModels(value=None)`)."""
    config, _, state, frozen, prompts, mask = tiny_setup(**overrides)
    rl_models = rj.RLModels(policy=TINY, value=None, reward=TINY_RM)
    state = rj.init_state(frozen.ref, config, value_params=models.value_head_init(TINY))
    return config, rl_models, state, frozen, prompts, mask


def test_shared_value_head_gradients_are_both_losses_through_one_trunk():
    """The shared trunk's gradient is the policy loss's plus vf_coef x the value loss's, computed
    here by the separate-model path on a value model made of a copy of the trunk and the head."""
    config, shared, state, frozen, prompts, mask = shared_head_setup(vf_coef=0.5)
    head = {"score": {"kernel": 0.3 * jax.random.normal(jax.random.key(7), (TINY.hidden_size, 1))}}
    state = state.replace(value_params=head)
    exp, _ = jax.jit(functools.partial(rj.make_experience, config=config, rl_models=shared))(
        state, frozen, prompts, mask, jax.random.key(0)
    )
    assert float(jnp.abs(exp.values).max()) > 0.1  # the head reads the trunk
    grad = jax.jit(
        jax.value_and_grad(core.loss, (0, 1), has_aux=True),
        static_argnames=("config", "rl_models"),
    )
    (loss, _), (g_policy, g_head) = grad(
        state.policy_params, head, exp, None, 1.0, None, config=config, rl_models=shared
    )

    separate = rj.RLModels(policy=TINY, value=shared.value_head, reward=TINY_RM)
    trunk = {k: v for k, v in state.policy_params.items() if k != "lm_head"}
    value_model = {**trunk, **head}
    values = core.value_estimates(value_model, separate.value, *_common(exp), exp.value_mask)
    assert_f32_close(values, exp.values, ulps=MODEL)
    (want_loss, _), (want_policy, want_value) = grad(
        state.policy_params, value_model, exp, None, 1.0, None, config=config, rl_models=separate
    )
    assert_f32_close(loss, want_loss, ulps=MODEL, floor=1.0)
    assert_f32_close(g_head["score"], want_value["score"], ulps=GRADIENT)
    summed = {
        k: jax.tree.map(jnp.add, v, want_value[k]) if k in trunk else v
        for k, v in want_policy.items()
    }
    assert_f32_close(g_policy, summed, ulps=GRADIENT)
    # Not vacuous: the value loss moves the trunk.
    assert float(jnp.abs(want_value["layers"]["mlp"]["up"]["kernel"]).max()) > 1e-6


def _common(exp):
    return exp.prompts, exp.prompt_mask, exp.responses, exp.mask


@pytest.mark.slow  # suite time; the gradient test above stays in the default set
def test_shared_value_head_learns_and_compiles_once():
    config, rl_models, state, frozen, prompts, mask = shared_head_setup()
    iteration = jitted_iteration(config, rl_models)
    scores, values = [], []
    for i in range(30):
        state, metrics = iteration(state, frozen, prompts, mask, jax.random.key(i))
        rj.check_finite(metrics, i)
        scores.append(float(metrics["objective/raw_scores"]))
        values.append(float(metrics["val/values_mean"]))
        assert float(metrics["policy/first_ratio_std"]) < 1e-5
    assert np.mean(scores[-5:]) > np.mean(scores[:5]) + 1.0, np.round(scores, 2)
    assert values[0] == 0.0 and abs(values[-1]) > 0.1  # the zero-initialised head was trained
    assert jax.tree.structure(state.value_params) == jax.tree.structure(
        models.value_head_init(TINY)
    )


def test_non_finite_scores_stop_the_run_and_skip_the_update():
    config, rl_models, state, frozen, prompts, mask = tiny_setup()
    before = jax.tree.map(np.array, state.policy_params)
    score_kernel = frozen.reward["score"]["kernel"]
    poisoned = {**frozen.reward, "score": {"kernel": score_kernel.at[0, 0].set(jnp.nan)}}
    state, metrics = jitted_iteration(config, rl_models)(
        state, rj.FrozenParams(frozen.ref, poisoned), prompts, mask, jax.random.key(0)
    )
    with pytest.raises(rj.NonFiniteError, match=r"iteration 7: .*nonfinite/scores=16"):
        rj.check_finite(metrics, 7)
    steps = config.num_ppo_epochs * config.num_mini_batches
    assert float(metrics["nonfinite/updates"]) == steps
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, state.policy_params), before)
    # Adam's moments and step count stay; the learning-rate schedule still follows the iteration.
    kinds = (optax.ScaleByAdamState, optax.ScaleByScheduleState)
    for opt_state in (state.opt_state, state.value_opt_state):
        counts = {
            type(node).__name__: int(node.count)
            for node in jax.tree.leaves(opt_state, is_leaf=lambda n: isinstance(n, kinds))
            if isinstance(node, kinds)
        }
        assert counts == {"ScaleByAdamState": 0, "ScaleByScheduleState": steps}, counts
    assert int(state.iteration) == 1


def test_missing_eos_penalty_without_stop_tokens_is_an_error():
    config, rl_models, state, frozen, prompts, mask = tiny_setup(
        stop_token_ids=(), missing_eos_penalty=1.0
    )
    experience = functools.partial(rj.make_experience, config=config, rl_models=rl_models)
    with pytest.raises(ValueError, match="missing_eos_penalty=1.0 is set but stop_token_ids"):
        jax.eval_shape(experience, state, frozen, prompts, mask, jax.random.key(0))


def test_host_reward_path_matches_model_reward_path():
    config, rl_models, state, frozen, prompts, mask = tiny_setup()
    key = jax.random.key(4)
    exp_model, _ = jax.jit(
        functools.partial(rj.make_experience, config=config, rl_models=rl_models)
    )(state, frozen, prompts, mask, key)
    roll = jax.jit(functools.partial(rj.rollout, config=config, rl_models=rl_models))(
        state, frozen, prompts, mask, key
    )
    gen = roll.generation
    host_scores = np.asarray(  # stands in for a Python reward function on decoded text
        core.reward_scores(frozen.reward, TINY_RM, prompts, mask, gen.tokens, gen.mask)
    )
    exp_host, _ = rj.build_experience(roll, host_scores, state.kl.kl_coef, config=config)
    assert_f32_close(exp_host, exp_model, ulps=MODEL, floor=1.0)


def test_ptx_loss_is_added():
    config, rl_models, state, frozen, prompts, mask = tiny_setup(ptx_coef=0.5)
    ptx = rj.PtxBatch(tokens=jnp.asarray(prompts), mask=jnp.asarray(mask))
    exp, _ = jax.jit(functools.partial(rj.make_experience, config=config, rl_models=rl_models))(
        state, frozen, prompts, mask, jax.random.key(0)
    )
    loss = jax.jit(functools.partial(core.loss, config=config, rl_models=rl_models))
    loss_without, _ = loss(state.policy_params, state.value_params, exp, None, 1.0, None)
    loss_with, aux = loss(state.policy_params, state.value_params, exp, ptx, 1.0, None)
    want_ptx = float(jax.jit(core.ptx_loss, static_argnums=1)(state.policy_params, TINY, ptx))
    assert_f32_close(aux["loss/ptx_avg"], want_ptx, ulps=MODEL)
    # The difference of two losses of O(want_ptx + policy and value terms) each.
    assert_f32_close(loss_with - loss_without, 0.5 * want_ptx, ulps=MODEL, scale=abs(loss_with))
    assert want_ptx > 0


def test_bad_config():
    with pytest.raises(ValueError, match="batch_size=10 must be a positive multiple"):
        rj.PPOConfig(batch_size=10, num_mini_batches=4)
    with pytest.raises(ValueError, match="scalar score head"):
        rj.RLModels(policy=TINY, value=TINY, reward=TINY_RM)
    with pytest.raises(ValueError, match="logprob_chunk_size must be >= 1"):
        rj.PPOConfig(batch_size=4, response_length=8, logprob_chunk_size=0)


def test_entropy_is_computed_only_when_trained_or_logged():
    """With `entropy_coef=0` and `log_entropy=False` the update computes no [B, T, V] softmax for
    the entropy: fewer exponentials in the loss, no `policy/entropy_avg`, the same other metrics
    (the default logs it, as TRL does)."""
    config, pm, state, frozen, prompts, mask = tiny_setup(logprob_chunk_size=3)
    exp, _ = jax.jit(functools.partial(rj.make_experience, config=config, rl_models=pm))(
        state, frozen, prompts, mask, jax.random.key(0)
    )
    quiet = dataclasses.replace(config, log_entropy=False)
    outputs, exps = {}, {}
    for c in (config, quiet):
        loss = functools.partial(
            core.loss, mb=exp, ptx=None, token_scale=1.0, algo_state=None, config=c, rl_models=pm
        )
        args = (state.policy_params, state.value_params)
        exps[c.log_entropy] = str(jax.make_jaxpr(loss)(*args)).count(" exp ")
        outputs[c.log_entropy] = jax.jit(loss)(*args)
    assert exps[False] < exps[True]
    (loss_on, aux_on), (loss_off, aux_off) = outputs[True], outputs[False]
    assert "policy/entropy_avg" in aux_on and set(aux_on) - set(aux_off) == {"policy/entropy_avg"}
    assert_f32_close(loss_off, loss_on, ulps=REORDERED)
    assert_f32_close({k: aux_on[k] for k in aux_off}, aux_off, ulps=REORDERED, per_leaf=True)


def test_rollout_sampling_filters():
    """PPO's rollout samples with top-k / top-p / min-p like the critic-free rollouts (the filters
    themselves are tested in test_sampling.py): top_k=1 picks the greedy tokens, while the
    log-probs stay those of the unfiltered, temperature-scaled distribution (what the ratio is
    computed against)."""
    config, rl_models, state, frozen, prompts, mask = tiny_setup()
    for filters in (dict(top_p=0.5), dict(min_p=0.1), dict(top_k=1)):
        cfg = dataclasses.replace(config, **filters)
        assert cfg.sampling_config() == dataclasses.replace(config.sampling_config(), **filters)
    with pytest.raises(ValueError, match="top_p"):
        dataclasses.replace(config, top_p=0.0)
    prompts, mask = jnp.asarray(prompts), jnp.asarray(mask)
    greedy = generate(
        state.policy_params,
        TINY,
        prompts,
        mask,
        jax.random.key(0),
        SamplingConfig(max_new_tokens=8, greedy=True, stop_token_ids=(STOP,)),
    )
    roll = jax.jit(functools.partial(rj.rollout, config=cfg, rl_models=rl_models))(
        state, frozen, prompts, mask, jax.random.key(7)
    )
    gen = roll.generation
    np.testing.assert_array_equal(gen.tokens, greedy.tokens)
    unfiltered, _ = core.policy_logprobs(
        state.policy_params, TINY, prompts, mask, gen.tokens, gen.mask, temperature=1.0
    )
    assert_f32_close(roll.old_logprobs, unfiltered, ulps=MODEL)


def test_ppo_penalty_adapts_beta_toward_the_target_kl():
    """PPO-Penalty (`policy_loss="penalty"`): no clip, and after each iteration beta is halved
    or doubled from the update's KL estimate; the state carries beta only in this mode."""
    assert tiny_setup()[2].algo_state is None
    config, rl_models, state, frozen, prompts, mask = tiny_setup(
        policy_loss="penalty", penalty_beta=0.5, penalty_kl_target=1e-3
    )
    assert float(state.algo_state) == 0.5
    step = jitted_iteration(config, rl_models)
    for i in range(2):
        beta = float(state.algo_state)
        state, metrics = step(state, frozen, prompts, mask, jax.random.key(i))
        rj.check_finite(metrics, i)
        assert float(metrics["policy/penalty_beta"]) == beta
        assert float(metrics["policy/clipfrac_avg"]) == 0.0
        kl = float(metrics["policy/penalty_kl"])
        assert kl > 0
        want = beta / 2 if kl < 1e-3 / 1.5 else beta * 2 if kl > 1e-3 * 1.5 else beta
        assert float(state.algo_state) == want
    with pytest.raises(ValueError, match="policy_loss must be 'clip' or 'penalty'"):
        dataclasses.replace(config, policy_loss="kl")
    with pytest.raises(ValueError, match="penalty_beta"):
        dataclasses.replace(config, penalty_beta=0.0)


def test_length_bucketed_update_equals_the_full_width_update():
    """Scoring, advantages and the update on the rollout cut to its length bucket equal the
    full-width ones (only padding is cut); the bucket is the smallest that holds every response,
    and a batch whose longest response fills `response_length` keeps the full width."""
    config, rl_models, state, frozen, prompts, mask = tiny_setup(
        length_buckets=4, loss_aggregation="seq-mean-token-sum-norm"
    )
    assert config.response_buckets() == (2, 4, 6, 8)
    assert config.bucket_width([0, 7]) == 8 and config.bucket_width([1, 2]) == 4
    after = dataclasses.replace(config, score_position="after_last_token")
    assert after.bucket_width([1, 3]) == 6 and after.bucket_width([7]) == 8
    free = generate(
        state.policy_params,
        TINY,
        jnp.asarray(prompts),
        jnp.asarray(mask),
        jax.random.key(0),
        config.sampling_config(),
    )
    # The same key samples the same tokens: every row stops by its second token.
    config = dataclasses.replace(
        config, stop_token_ids=tuple(int(t) for t in np.asarray(free.tokens)[:, 1])
    )
    roll = jax.jit(functools.partial(rj.rollout, config=config, rl_models=rl_models))(
        state, frozen, prompts, mask, jax.random.key(0)
    )
    width = config.bucket_width(np.asarray(roll.generation.sequence_lengths))
    assert width < config.response_length

    @functools.partial(jax.jit, static_argnums=1)
    def score_and_finish(roll, width):
        roll = core.slice_rollout(roll, width)
        gen = roll.generation
        scores = core.reward_scores(
            frozen.reward, TINY_RM, roll.prompts, roll.prompt_mask, gen.tokens, gen.mask
        )
        return core.finish_iteration(
            state, roll, scores, jax.random.key(2), config=config, rl_models=rl_models
        )

    full_state, full_metrics = score_and_finish(roll, config.response_length)
    cut_state, cut_metrics = score_and_finish(roll, width)
    # `perf/padded_fraction` is the padding of the width the update ran on (by definition not
    # the same for the two widths): checked against that; every other metric is compared.
    gen_mask = np.asarray(roll.generation.mask)
    for metrics, w in ((full_metrics, config.response_length), (cut_metrics, width)):
        padded = metrics.pop("perf/padded_fraction")
        assert_f32_close(padded, 1.0 - gen_mask[:, :w].mean(), ulps=REORDERED)
    assert_f32_close(cut_metrics, full_metrics, ulps=GRADIENT, floor=1.0, per_leaf=True)
    assert_f32_close(cut_state, full_state, ulps=GRADIENT)
    moved = full_state.policy_params["lm_head"]["kernel"] - state.policy_params["lm_head"]["kernel"]
    assert float(jnp.abs(moved).max()) > 1e-4  # the comparison is not vacuous


def test_bfloat16_compute_updates_track_float32_and_bfloat16_params_are_refused():
    """The memory/speed mode: float32 master params and AdamW moments, bfloat16 compute. At PPO's
    default learning rate, three updates on one experience move (almost) every weight, by what
    float32 compute moves it within 5% (relative L2; bfloat16 keeps 8 significant bits, ~0.4%
    per rounding, compounded through the backward; Adam's first steps are near sign(g), so a few
    weights with g ~ 0 may flip). Stored in bfloat16 the same steps would change ~4% of the
    weights (half an ulp at |w| ~ 0.02 is 6e-5, 20x the step): `init_state` refuses that."""
    config, pm, state, frozen, prompts, mask = tiny_setup(
        learning_rate=3e-6, value_learning_rate=3e-6
    )
    exp, _ = jax.jit(functools.partial(rj.make_experience, config=config, rl_models=pm))(
        state, frozen, prompts, mask, jax.random.key(0)
    )
    b16 = lambda c: dataclasses.replace(c, dtype="bfloat16")  # noqa: E731
    pm16 = rj.RLModels(policy=b16(TINY), value=b16(TINY_RM), reward=b16(TINY_RM))
    s32 = s16 = state
    for i in range(3):
        s32, _ = jax.jit(functools.partial(rj.update, config=config, rl_models=pm))(
            s32, exp, jax.random.key(i)
        )
        s16, _ = jax.jit(functools.partial(rj.update, config=config, rl_models=pm16))(
            s16, exp, jax.random.key(i)
        )
    flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])  # noqa: E731
    for name in ("policy_params", "value_params"):
        assert {x.dtype for x in jax.tree.leaves(getattr(s16, name))} == {jnp.dtype("float32")}
        start = flat(getattr(state, name))
        step32, step16 = flat(getattr(s32, name)) - start, flat(getattr(s16, name)) - start
        assert np.mean(step16 != 0) > 0.99, name
        assert np.linalg.norm(step16 - step32) < 0.05 * np.linalg.norm(step32), name
    to16 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.bfloat16), tree)  # noqa: E731
    with pytest.raises(ValueError, match="policy params are bfloat16: optimiser steps"):
        rj.init_state(to16(frozen.ref), config, value_params=state.value_params)
    with pytest.raises(ValueError, match="value params are bfloat16"):
        rj.init_state(frozen.ref, config, value_params=to16(state.value_params))
    # Frozen models may be bfloat16: the rollout and experience run on a bfloat16 reference.
    frozen16 = rj.FrozenParams(ref=to16(frozen.ref), reward=to16(frozen.reward))
    exp16, _ = jax.jit(functools.partial(rj.make_experience, config=config, rl_models=pm))(
        state, frozen16, prompts, mask, jax.random.key(0)
    )
    assert np.isfinite(np.asarray(exp16.ref_logprobs)).all()
