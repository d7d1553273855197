"""RLOO, GRPO and REINFORCE++: losses and experience against NumPy transcriptions of TRL /
OpenRLHF, TRL's loss-type names, learning on a tiny task with a Python reward function, one
compilation per algorithm, and bad input."""

import dataclasses
import functools
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import GRADIENT, MODEL, REORDERED, assert_f32_close

import rlhf_jax as rj
from rlhf_jax import core, models
from rlhf_jax import reward_functions as rf
from rlhf_jax import sharding as sh
from rlhf_jax.core import GroupedConfig
from rlhf_jax.ops import INVALID_LOGPROB
from rlhf_jax.sampling import Generation, generate

# ------------------------------------------------------------------------------ NumPy references


def np_k(logp, ref, estimator):
    logr = ref - logp
    return {"k1": -logr, "k2": 0.5 * logr**2, "k3": np.expm1(logr) - logr}[estimator]


def np_rloo(rewards, k):
    out = np.zeros(len(rewards))
    for start in range(0, len(rewards), k):
        group = rewards[start : start + k]
        for i in range(k):
            out[start + i] = group[i] - (group.sum() - group[i]) / (k - 1)
    return out


def np_grpo(rewards, k, scale):
    out = np.zeros(len(rewards))
    for start in range(0, len(rewards), k):
        group = rewards[start : start + k]
        out[start : start + k] = group - group.mean()
        if scale == "group":
            out[start : start + k] /= group.std(ddof=1) + 1e-4
    if scale == "batch":
        out /= rewards.std(ddof=1) + 1e-4
    return out


def np_standardize(x):
    return (x - x.mean()) / (x.std(ddof=1) + 1e-8)


def trl_grpo_loss(logp, old, ref, adv_B, mask, *, eps, eps_high, beta, loss_type):
    """TRL GRPOTrainer._compute_loss, transcribed."""
    coef_1 = np.exp(logp - old)
    coef_2 = np.clip(coef_1, 1 - eps, 1 + eps_high)
    per_token = -np.minimum(coef_1 * adv_B[:, None], coef_2 * adv_B[:, None])
    per_token = per_token + beta * (np.exp(ref - logp) - (ref - logp) - 1)
    if loss_type == "grpo":
        return np.mean((per_token * mask).sum(-1) / np.maximum(mask.sum(-1), 1))
    if loss_type in ("bnpo", "dapo"):
        return (per_token * mask).sum() / max(mask.sum(), 1)
    return (per_token * mask).sum() / (mask.shape[0] * mask.shape[1])  # dr_grpo


def trl_rloo_loss(logp, old, adv_B, *, cliprange):
    """TRL RLOOTrainer's loss: PPO-clip on the ratio of summed log-probs (padding holds
    INVALID_LOGPROB in both, so it cancels)."""
    ratio = np.exp(logp.sum(1) - old.sum(1))
    losses = np.maximum(-adv_B * ratio, -adv_B * np.clip(ratio, 1 - cliprange, 1 + cliprange))
    return losses.mean()


def random_logprobs(batch, length, lengths, seed):
    rng = np.random.default_rng(seed)
    mask = np.arange(length)[None, :] < np.asarray(lengths)[:, None]
    arrays = [
        np.where(mask, -rng.uniform(0.1, 3.0, size=(batch, length)), INVALID_LOGPROB)
        for _ in range(3)
    ]
    return (*[a.astype(np.float32) for a in arrays], mask)


# ----------------------------------------------------------------------------------- losses

BASE = dict(num_prompts=2, response_length=6)


@functools.partial(jax.jit, static_argnames="config")
def policy_loss(logp, old, ref, adv, mask, *, config, token_scale=1.0):
    """The algorithm's policy objective (`config.policy_objective`) on one micro-batch of
    log-probs; length-normalised losses divide by `config.response_length`."""
    mb = SimpleNamespace(
        old_logprobs=old, ref_logprobs=ref, advantages=adv, mask=jnp.asarray(mask, bool)
    )
    return config.policy_objective(logp, mb, jnp.asarray(token_scale, jnp.float32), None)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_grpo_loss_types_against_trl(loss_type):
    logp, old, ref, mask = random_logprobs(4, 6, [6, 2, 4, 1], seed=0)
    old = np.where(mask, logp + np.random.default_rng(1).normal(0, 0.3, logp.shape), old)
    adv_B = np.array([1.5, -0.7, 0.3, -2.0], np.float32)
    config = rj.GRPOConfig(
        num_generations=2, epsilon=0.2, epsilon_high=0.28, beta=0.04, loss_type=loss_type, **BASE
    )
    adv_BT = np.where(mask, adv_B[:, None], 0.0).astype(np.float32)
    loss, aux = policy_loss(logp, old, ref, adv_BT, mask, config=config)
    want = trl_grpo_loss(
        logp, old, ref, adv_B, mask, eps=0.2, eps_high=0.28, beta=0.04, loss_type=loss_type
    )
    assert_f32_close(loss, want, ulps=REORDERED, floor=1.0)
    assert rj.trl_loss_aggregation(loss_type) == rj.TRL_LOSS_TYPES[config.loss_type]
    assert float(aux["clipfrac"]) > 0  # the clip (both ends) is exercised


def test_loss_types_agree_for_one_full_sample():
    logp, old, ref, mask = random_logprobs(1, 5, [5], seed=2)
    adv = np.full((1, 5), 0.8, np.float32)
    full = {**BASE, "response_length": 5}  # dr_grpo's normaliser: the 5 columns, all real
    losses = [
        policy_loss(
            logp,
            old,
            ref,
            adv,
            mask,
            config=rj.GRPOConfig(num_generations=2, beta=0.1, loss_type=t, **full),
        )[0]
        for t in rj.TRL_LOSS_TYPES
    ]
    assert_f32_close(losses, np.full(len(losses), losses[0]), ulps=REORDERED, floor=1.0)


def test_dapo_normalises_by_the_minibatch_token_count():
    """Two gradient-accumulation micro-batches with 7 and 2 tokens: "dapo" (with the scales
    `update` computes) is the token mean over the whole minibatch, "bnpo" the mean of the two
    micro-batch token means (TRL's two behaviours)."""
    logp, old, ref, mask = random_logprobs(4, 5, [5, 2, 1, 1], seed=3)
    adv = np.where(mask, np.array([1.0, -1.0, 2.0, 0.5])[:, None], 0.0).astype(np.float32)
    config = rj.GRPOConfig(num_generations=2, beta=0.1, loss_type="dapo", **BASE)
    scales = core.minibatch_token_scales(mask.reshape(2, 2, 5))
    np.testing.assert_allclose(scales, [7 * 2 / 9, 2 * 2 / 9], rtol=1e-6)
    halves = [
        [x[:2] for x in (logp, old, ref, adv, mask)],
        [x[2:] for x in (logp, old, ref, adv, mask)],
    ]
    dapo = [
        policy_loss(*h, config=config, token_scale=c)[0]
        for h, c in zip(halves, scales, strict=True)
    ]
    bnpo = [policy_loss(*h, config=config)[0] for h in halves]
    whole, _ = policy_loss(logp, old, ref, adv, mask, config=config)
    assert_f32_close(np.mean(dapo), whole, ulps=REORDERED, floor=1.0)
    bnpo = np.mean(bnpo)
    assert abs(bnpo - whole) > 1e-3


def test_rloo_sequence_ratio_loss_against_trl():
    logp, _, ref, mask = random_logprobs(4, 6, [6, 3, 1, 5], seed=4)
    # Sequence log-ratios spread over the valid tokens; rows 0, 1, 3 end up clipped.
    log_ratio_B = np.array([0.5, -0.5, 0.05, -0.3], np.float32)
    old = np.where(mask, logp - log_ratio_B[:, None] / mask.sum(1, keepdims=True), logp)
    adv_B = np.array([0.9, -1.1, 0.4, -0.2], np.float32)
    adv = np.where(mask, adv_B[:, None], 0.0).astype(np.float32)
    config = rj.RLOOConfig(rloo_k=2, cliprange=0.2, **BASE)
    loss, aux = policy_loss(logp, old, ref, adv, mask, config=config)
    want = trl_rloo_loss(logp, old, adv_B, cliprange=0.2)
    assert_f32_close(loss, want, ulps=REORDERED, floor=1.0)
    # Values under the mask never matter.
    noisy = [np.where(mask, x, 7.0).astype(np.float32) for x in (logp, old, ref)]
    loss_noisy, _ = policy_loss(*noisy, adv, mask, config=config)
    assert_f32_close(loss_noisy, loss, ulps=REORDERED, floor=1.0)
    np.testing.assert_allclose(aux["clipfrac"], 0.75)


# ------------------------------------------------------------------------------- experience


def synthetic_rollout(batch, length, seed, lengths):
    logp, ref, _, mask = random_logprobs(batch, length, lengths, seed)
    lengths = np.asarray(lengths)
    stopped = lengths < length
    gen = Generation(
        tokens=np.where(mask, 5, 0).astype(np.int32),
        logprobs=logp,
        mask=mask,
        sequence_lengths=(lengths - 1).astype(np.int32),
        stopped=stopped,
    )
    prompts = np.ones((batch, 3), np.int32)
    return rj.Rollout(prompts, prompts > 0, gen, logp, ref)


LENGTHS = [6, 2, 4, 6, 1, 3]
RAW_SCORES = np.array([0.5, 2.0, -1.0, 3.5, 0.0, 1.0], np.float32)


def np_rlhf_sequence_rewards(roll, scores, kl_coef, estimator, on_sequence):
    mask = roll.generation.mask
    old, ref = roll.old_logprobs.astype(np.float64), roll.ref_logprobs.astype(np.float64)
    if on_sequence:
        kl_B = np_k((old * mask).sum(1), (ref * mask).sum(1), estimator)
    else:
        kl_B = (np_k(old, ref, estimator) * mask).sum(1)
    return scores - kl_coef * kl_B, kl_B


@pytest.mark.parametrize(
    "options",
    [
        dict(kl_estimator="k1", kl_level="token", normalize_advantage=True),
        dict(kl_estimator="k3", kl_level="sequence", normalize_reward=True, reward_clip_range=1.0),
    ],
)
def test_rloo_experience_against_trl(options):
    roll = synthetic_rollout(6, 6, seed=6, lengths=LENGTHS)
    config = rj.RLOOConfig(
        num_prompts=2, rloo_k=3, response_length=6, missing_eos_penalty=1.0, **options
    )
    exp, metrics = jax.jit(functools.partial(rj.build_experience, config=config))(
        roll, RAW_SCORES, 0.1
    )
    scores = RAW_SCORES - 1.0 * ~roll.generation.stopped
    if config.normalize_reward:
        scores = np.clip(np_standardize(scores), -1.0, 1.0)
    rlhf, kl_B = np_rlhf_sequence_rewards(
        roll, scores, 0.1, config.kl_estimator, config.kl_level == "sequence"
    )
    adv = np_rloo(rlhf, 3)
    if config.normalize_advantage:
        adv = np_standardize(adv)
    mask = roll.generation.mask
    assert_f32_close(exp.scores, scores, ulps=REORDERED)
    assert_f32_close(exp.advantages, adv[:, None] * mask, ulps=REORDERED, floor=1.0)
    assert_f32_close(metrics["objective/kl"], kl_B.mean(), ulps=REORDERED, floor=1.0)
    assert_f32_close(metrics["objective/rlhf_reward"], rlhf.mean(), ulps=REORDERED, floor=1.0)


def test_grpo_experience_against_trl():
    scale = "batch"  # the three scalings are tested in test_advantages
    roll = synthetic_rollout(6, 6, seed=7, lengths=LENGTHS)
    config = rj.GRPOConfig(
        num_prompts=3, num_generations=2, response_length=6, beta=0.5, scale_rewards=scale
    )
    exp, metrics = jax.jit(functools.partial(rj.build_experience, config=config))(
        roll, RAW_SCORES, 0.0
    )
    want = np_grpo(RAW_SCORES.astype(np.float64), 2, scale)
    assert_f32_close(
        exp.advantages, want[:, None] * roll.generation.mask, ulps=REORDERED, floor=1.0
    )
    # GRPO has no KL in the reward: the KL is a loss term.
    assert float(metrics["objective/non_score_reward"]) == 0.0


def test_reinforce_pp_experience_against_openrlhf():
    estimator = "reinforce++-baseline"  # the baseline-free registry entry: test_advantages
    roll = synthetic_rollout(6, 6, seed=8, lengths=LENGTHS)
    config = rj.ReinforcePPConfig(
        num_prompts=3,
        n_samples_per_prompt=2,
        response_length=6,
        advantage_estimator=estimator,
        kl_coef=0.2,
        gamma=0.9,
        reward_clip_range=3.0,
        missing_eos_penalty=0.5,
    )
    exp, _ = jax.jit(functools.partial(rj.build_experience, config=config))(roll, RAW_SCORES, 0.2)
    gen = roll.generation
    mask = gen.mask
    scores = np.clip(RAW_SCORES - 0.5 * ~gen.stopped, -3.0, 3.0)
    if estimator == "reinforce++-baseline":
        scores = scores - scores.reshape(3, 2).mean(1).repeat(2)
    kl = np_k(roll.old_logprobs.astype(np.float64), roll.ref_logprobs, "k1") * mask
    rewards = -0.2 * kl
    rewards[np.arange(6), gen.sequence_lengths] += scores
    returns = np.zeros_like(rewards)
    for b in range(6):  # OpenRLHF's get_cumulative_returns
        running = 0.0
        for t in reversed(range(6)):
            running = rewards[b, t] * mask[b, t] + 0.9 * running
            returns[b, t] = running
    values = returns[mask]
    whitened = (returns - values.mean()) / np.sqrt(values.var(ddof=1) + 1e-8)
    assert_f32_close(exp.returns, returns * mask, ulps=REORDERED)
    assert_f32_close(exp.advantages, whitened * mask, ulps=REORDERED, floor=1.0)


# ------------------------------------------------------------------------ tiny-model learning

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
ALPHABET = "abcdefghijklmnopqrstuvwxyz012345"  # token i <-> ALPHABET[i]
STOP = 2
SHARED = dict(
    num_prompts=4,
    response_length=8,
    stop_token_ids=(STOP,),
    temperature=1.0,
    learning_rate=3e-3,
    total_iterations=100,
    num_mini_batches=2,
    gradient_accumulation_steps=2,
)
RLOO = rj.RLOOConfig(rloo_k=4, num_ppo_epochs=2, kl_coef=0.01, **SHARED)
GRPO = rj.GRPOConfig(
    num_generations=4, num_iterations=2, beta=0.01, epsilon_high=0.28, loss_type="dapo", **SHARED
)


def decode(ids):
    return "".join(ALPHABET[i] for i in ids)


def early_letter_fraction(prompts, completions, **unused):
    """The verifiable reward of the tiny task: the fraction of characters from a..h (8 of the 32
    tokens, the stop token among them)."""
    return [sum(ch < "i" for ch in c) / max(len(c), 1) for c in completions]


def tiny_prompts():
    rng = np.random.default_rng(3)
    prompts = rng.integers(3, TINY.vocab_size, size=(4, 6)).astype(np.int32)
    mask = np.ones((4, 6), bool)
    mask[0, :2] = False  # one left-padded prompt
    return np.where(mask, prompts, 0), mask


def run_learning(config, iterations):
    policy = models.init_params(TINY, jax.random.key(0))
    rl_models = rj.RLModels(policy=TINY)
    state = rj.init_state(policy, config, rl_models)
    frozen = rj.FrozenParams(ref=policy)
    prompts, mask = tiny_prompts()
    terms = rf.reward_terms(["test_critic_free:early_letter_fraction"])
    score_fn = rf.make_score_fn(terms, decode, config.group_size)
    step = rj.make_host_iteration(config, rl_models, score_fn)
    texts = ["prompt"] * config.num_prompts
    scores, rollout_cache = [], None
    for i in range(iterations):
        state, metrics = step(state, frozen, prompts, mask, jax.random.key(i), texts)
        rj.check_finite(metrics, i)
        scores.append(metrics["rewards/test_critic_free:early_letter_fraction/mean"])
        assert_f32_close(scores[-1], metrics["objective/raw_scores"], ulps=REORDERED)
        assert float(metrics["policy/first_approxkl"]) < 1e-9  # sampler log-probs = trainer's
        assert 0.0 <= float(metrics["perf/padded_fraction"]) < 1.0
        if rollout_cache is None:
            rollout_cache = core.shared_rollout._cache_size()
    # One compilation for the rollout, and one for the update per length bucket met.
    assert core.shared_rollout._cache_size() == rollout_cache
    assert 1 <= step.programs.finish._cache_size() <= len(config.response_buckets())
    assert int(state.iteration) == iterations
    assert int(state.episode) == iterations * config.batch_size
    roll = step.programs.rollout(state, frozen, prompts, mask, jax.random.key(99))
    return scores, roll, state


def test_rloo_raises_a_python_reward():
    scores, roll, _ = run_learning(RLOO, 10)
    assert np.mean(scores[-3:]) > np.mean(scores[:3]) + 0.15, np.round(scores, 2)
    # Contiguous groups: prompt n at rows n*k .. n*k + k - 1, with different completions.
    prompts, _ = tiny_prompts()
    np.testing.assert_array_equal(roll.prompts, np.repeat(prompts, 4, axis=0))
    tokens = np.asarray(roll.generation.tokens).reshape(4, 4, -1)
    assert all(len({row.tobytes() for row in group}) > 1 for group in tokens)


def test_grpo_raises_a_python_reward_sharing_the_rollout_compilation():
    assert core.rollout_spec(GRPO) == core.rollout_spec(RLOO)  # so the jitted rollout is shared
    scores, _, _ = run_learning(GRPO, 10)
    assert np.mean(scores[-3:]) > np.mean(scores[:3]) + 0.15, np.round(scores, 2)


# ------------------------------------------------------------- one prefill per distinct prompt


def _grpo_rollout(mesh=None, **overrides):
    """`rj.rollout` of GRPO (no reference) on the tiny prompts: `(roll, jitted fn, args)`."""
    config = dataclasses.replace(GRPO, beta=0.0, **overrides)
    rl_models = rj.RLModels(policy=TINY)
    policy = models.init_params(TINY, jax.random.key(0))
    state, frozen = rj.init_state(policy, config, rl_models), rj.FrozenParams()
    prompts, mask = tiny_prompts()
    fn = functools.partial(rj.rollout, config=config, rl_models=rl_models)
    if mesh is None:
        jitted = jax.jit(fn)
    else:
        s = rj.rl_shardings(config, rl_models, mesh)
        state = jax.device_put(state, s.state)
        rep = s.replicated
        jitted = sh.jit_with_rules(fn, mesh, in_shardings=(s.state, None, rep, rep, rep))
    args = (state, frozen, prompts, mask, jax.random.key(3))
    return jitted(*args), jitted, args


def test_rollout_prefills_each_prompt_once_with_the_same_samples():
    """The rollout prefills the 4 distinct prompts once each and repeats their caches to the
    `k = 4` completions: the same tokens, masks and lengths as `generate` on the `jnp.repeat`ed
    prompts and as the old repeated prefill (`shared_prefill=False`), for the same key, at a
    smaller cost (fewer FLOPs in the compiled rollout)."""
    roll, jitted, args = _grpo_rollout()
    old, old_jitted, _ = _grpo_rollout(shared_prefill=False)
    prompts, mask = tiny_prompts()
    k = GRPO.group_size
    want = jax.jit(generate, static_argnums=(1, 5))(
        args[0].policy_params,
        TINY,
        np.repeat(prompts, k, axis=0),
        np.repeat(mask, k, axis=0),
        args[4],
        GRPO.sampling_config(),
    )
    np.testing.assert_array_equal(roll.prompts, np.repeat(prompts, k, axis=0))
    np.testing.assert_array_equal(roll.prompt_mask, np.repeat(mask, k, axis=0))
    for got in (roll.generation, old.generation):
        for name in ("tokens", "mask", "sequence_lengths", "stopped"):
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
        assert_f32_close(got.logprobs, want.logprobs, ulps=MODEL)
    # Groups differ (the 4 prompts' completions are not permuted or shared across groups).
    groups = np.asarray(roll.generation.tokens).reshape(4, k, -1)
    assert len({g.tobytes() for g in groups}) == 4
    flops = lambda f: f.lower(*args).cost_analysis()["flops"]
    assert flops(jitted) < flops(old_jitted)


@pytest.mark.parametrize("name", ["8x1x1", "2x2x2"])
def test_shared_prefill_rollout_on_a_mesh(name):
    """On a mesh the 4 replicated prompts are prefilled once (4 rows do not divide 8 devices) and
    the 16 repeated rows are split over the batch axes: the same samples as on one device."""
    mesh_config = {
        "8x1x1": sh.MeshConfig(data=8, fsdp=1, tensor=1),
        "2x2x2": sh.MeshConfig(data=2, fsdp=2, tensor=2),
    }[name]
    want, _, _ = _grpo_rollout()
    got, _, _ = _grpo_rollout(sh.make_mesh(mesh_config))
    for field in ("tokens", "mask", "sequence_lengths"):
        np.testing.assert_array_equal(
            getattr(got.generation, field), getattr(want.generation, field), err_msg=field
        )
    assert_f32_close(got.generation.logprobs, want.generation.logprobs, ulps=MODEL)
    rows = {s.data.shape[0] for s in got.generation.tokens.addressable_shards}
    assert rows == {GRPO.batch_size // (mesh_config.data * mesh_config.fsdp)}


# ---------------------------------------------------------------- traced only: cheap checks


def abstract_params(config):
    return jax.eval_shape(lambda key: models.init_params(config, key), jax.random.key(0))


def test_beta_zero_never_runs_the_reference_and_kl_needs_it():
    policy = abstract_params(TINY)
    rl_models = rj.RLModels(policy=TINY)
    prompts, mask = tiny_prompts()
    config = dataclasses.replace(GRPO, beta=0.0)
    state = jax.eval_shape(lambda p: rj.init_state(p, config, rl_models), policy)
    roll = jax.eval_shape(
        lambda s, p, m, k: rj.rollout(
            s, rj.FrozenParams(), p, m, k, config=config, rl_models=rl_models
        ),
        state,
        prompts,
        mask,
        jax.random.key(0),
    )
    assert roll.ref_logprobs.shape == (16, 8) and roll.model_scores is None
    with pytest.raises(ValueError, match="frozen.ref is None"):
        rj.rollout(
            state, rj.FrozenParams(), prompts, mask, jax.random.key(0), config=GRPO,
            rl_models=rl_models,
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"expected prompts of shape \[num_prompts=4, P\]"):
        rj.rollout(
            state, rj.FrozenParams(), prompts[:3], mask[:3], jax.random.key(0),
            config=config, rl_models=rl_models,
        )  # fmt: skip


def test_reward_model_rollout_traces_and_iteration_needs_one():
    reward_config = dataclasses.replace(TINY, head="score")
    policy = abstract_params(TINY)
    reward = abstract_params(reward_config)
    rl_models = rj.RLModels(policy=TINY, reward=reward_config)
    config = rj.ReinforcePPConfig(
        n_samples_per_prompt=2, advantage_estimator="reinforce++-baseline", **SHARED
    )
    prompts, mask = tiny_prompts()
    state = jax.eval_shape(lambda p: rj.init_state(p, config, rl_models), policy)
    frozen = rj.FrozenParams(ref=policy, reward=reward)
    roll = jax.eval_shape(
        functools.partial(rj.rollout, config=config, rl_models=rl_models),
        state,
        frozen,
        prompts,
        mask,
        jax.random.key(0),
    )
    # The rollout no longer scores: the reward model runs in `score_rollout`.
    model_scores = jax.eval_shape(
        functools.partial(core.score_rollout, rl_models=rl_models), state, frozen, roll
    )
    assert model_scores.shape == (8,) and roll.prompts.shape == (8, 6)
    with pytest.raises(ValueError, match="frozen.reward is None"):
        core.score_rollout(state, rj.FrozenParams(ref=policy), roll, rl_models=rl_models)
    with pytest.raises(ValueError, match="rl_models.reward is None"):
        rj.iteration(
            state, rj.FrozenParams(ref=policy), prompts, mask, jax.random.key(0),
            config=config, rl_models=rj.RLModels(policy=TINY),
        )  # fmt: skip


def test_bad_configs():
    with pytest.raises(ValueError, match="rloo_k must be >= 2"):
        rj.RLOOConfig(num_prompts=2, rloo_k=1)
    with pytest.raises(ValueError, match="num_generations must be >= 2"):
        rj.GRPOConfig(num_prompts=2, num_generations=1)
    with pytest.raises(ValueError, match="unknown loss_type 'sum'"):
        rj.GRPOConfig(num_prompts=2, loss_type="sum")
    with pytest.raises(ValueError, match="scale_rewards must be"):
        rj.GRPOConfig(num_prompts=2, scale_rewards="std")
    with pytest.raises(ValueError, match=r"3 x 2 = 6 completions must be a positive multiple of"):
        rj.RLOOConfig(num_prompts=3, num_mini_batches=4)
    with pytest.raises(ValueError, match="n_samples_per_prompt must be >= 2"):
        rj.ReinforcePPConfig(num_prompts=2, advantage_estimator="reinforce++-baseline")
    with pytest.raises(ValueError, match="epsilon_high must be > 0"):
        rj.GRPOConfig(num_prompts=2, epsilon_high=-0.1)
    with pytest.raises(TypeError, match="is not an algorithm: use PPOConfig, RLOOConfig"):
        GroupedConfig(num_prompts=2)
    assert rj.GRPOConfig(num_prompts=1, scale_rewards=False).scale_rewards == "none"
    assert hash(RLOO) != hash(GRPO)  # usable as static jit arguments
    with pytest.raises(ValueError, match="scores must have shape"):
        rj.build_experience(synthetic_rollout(6, 6, 0, LENGTHS), np.zeros(5), 0.0, config=RLOO)
    with pytest.raises(ValueError, match="scalar score head"):
        rj.RLModels(policy=TINY, reward=TINY)


def test_length_bucketed_update_equals_the_full_width_update():
    """The host iteration's update on the completions cut to their length bucket equals the
    full-width update (dr_grpo: the token-sum normaliser stays `response_length`)."""
    config = dataclasses.replace(
        GRPO, loss_type="dr_grpo", stop_token_ids=tuple(range(3, TINY.vocab_size))
    )
    policy = models.init_params(TINY, jax.random.key(0))
    rl_models = rj.RLModels(policy=TINY)
    state = rj.init_state(policy, config, rl_models)
    frozen = rj.FrozenParams(ref=policy)
    prompts, mask = tiny_prompts()
    step = rj.make_host_iteration(config, rl_models, lambda roll: None)
    roll = step.programs.rollout(state, frozen, prompts, mask, jax.random.key(0))
    width = config.bucket_width(np.asarray(roll.generation.sequence_lengths))
    assert width < config.response_length  # nearly every token stops a row
    scores = np.linspace(-1.0, 1.0, config.batch_size).astype(np.float32)
    copy = lambda: jax.tree.map(jnp.copy, state)
    full = step.programs.finish(
        copy(), roll, scores, jax.random.key(1), width=config.response_length
    )
    cut = step.programs.finish(copy(), roll, scores, jax.random.key(1), width=width)
    # The padded fraction of the positions the update pays for: 1 - real / (rows x width).
    real = float(np.sum(roll.generation.mask))
    for metrics, w in ((full[1], config.response_length), (cut[1], width)):
        padded = metrics.pop("perf/padded_fraction")
        assert_f32_close(padded, 1.0 - real / (config.batch_size * w), ulps=REORDERED, floor=1.0)
    assert_f32_close(cut[1], full[1], ulps=GRADIENT, floor=1.0, per_leaf=True)
    assert_f32_close(cut[0], full[0], ulps=GRADIENT)
    moved = full[0].policy_params["lm_head"]["kernel"] - policy["lm_head"]["kernel"]
    assert float(jnp.abs(moved).max()) > 1e-4


def test_ptx_loss_and_a_caller_optimizer_reach_every_algorithm():
    """The one core gives the critic-free algorithms what PPO has: the PPO-ptx language-modelling
    term (`ptx_coef`, its value equal to `core.ptx_loss` on the pretraining batch, added to the
    policy loss) and a caller-supplied optax optimiser (`Optimizers`: with `set_to_zero` an
    iteration leaves the policy exactly as it was, while the config's AdamW moves it)."""
    import optax

    config = dataclasses.replace(GRPO, ptx_coef=0.5, num_iterations=1)
    policy = models.init_params(TINY, jax.random.key(0))
    rl_models = rj.RLModels(policy=TINY)
    prompts, mask = tiny_prompts()
    frozen = rj.FrozenParams(ref=policy)
    state = rj.init_state(policy, config, rl_models)
    roll = jax.jit(functools.partial(rj.rollout, config=config, rl_models=rl_models))(
        state, frozen, prompts, mask, jax.random.key(0)
    )
    scores = jnp.linspace(0.0, 1.0, config.batch_size)
    exp, _ = rj.build_experience(roll, scores, state.kl.kl_coef, config=config)
    rows = jnp.asarray(np.repeat(prompts, 4, axis=0)[: config.batch_size])
    ptx = rj.PtxBatch(tokens=rows, mask=jnp.ones(rows.shape, bool))
    loss = jax.jit(functools.partial(core.loss, config=config, rl_models=rl_models))
    without, _ = loss(state.policy_params, None, exp, None, 1.0, None)
    with_ptx, aux = loss(state.policy_params, None, exp, ptx, 1.0, None)
    want = float(jax.jit(core.ptx_loss, static_argnums=1)(state.policy_params, TINY, ptx))
    assert_f32_close(aux["loss/ptx_avg"], want, ulps=MODEL)
    assert_f32_close(with_ptx, without + 0.5 * want, ulps=MODEL, floor=abs(want))

    frozen_opt = core.Optimizers(optax.set_to_zero())
    for optimizers, moves in ((frozen_opt, False), (None, True)):
        start = rj.init_state(policy, config, rl_models, optimizers=optimizers)
        finish = jax.jit(
            functools.partial(
                core.finish_iteration, config=config, rl_models=rl_models, optimizers=optimizers
            )
        )
        end, metrics = finish(start, roll, scores, jax.random.key(1), ptx=ptx)
        assert "loss/ptx_avg" in metrics
        changed = jax.tree.leaves(
            jax.tree.map(lambda a, b: bool(jnp.any(a != b)), end.policy_params, policy)
        )
        assert any(changed) == moves
