"""GAE as a reverse lax.scan against the textbook backward loop (TRL semantics)."""

import chex
import hypothesis.extra.numpy as hnp
import jax
import numpy as np
from absl.testing import parameterized
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import REORDERED, assert_f32_close

import rlhf_jax as rj
from rlhf_jax import advantages


def np_gae(rewards, values, gamma, lam):
    batch, length = rewards.shape
    advantages = np.zeros((batch, length))
    for b in range(batch):
        last = 0.0
        for t in reversed(range(length)):
            next_value = values[b, t + 1] if t < length - 1 else 0.0
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            last = delta + gamma * lam * last
            advantages[b, t] = last
    return advantages, advantages + values


class GaeTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters((1.0, 0.95), (0.99, 0.9), (0.5, 0.0))
    def test_against_backward_loop(self, gamma, lam):
        rng = np.random.default_rng(0)
        rewards = rng.normal(size=(4, 9)).astype(np.float32)
        values = rng.normal(size=(4, 9)).astype(np.float32)
        adv, ret = self.variant(lambda r, v: rj.gae(r, v, gamma=gamma, lam=lam))(rewards, values)
        want_adv, want_ret = np_gae(rewards, values, gamma, lam)
        assert_f32_close(adv, want_adv, ulps=REORDERED, floor=1.0)
        assert_f32_close(ret, want_ret, ulps=REORDERED, floor=1.0)

    def test_compiles_once(self):
        chex.clear_trace_counter()
        fn = jax.jit(chex.assert_max_traces(lambda r, v: rj.gae(r, v, gamma=1.0, lam=0.95), n=1))
        for seed in range(3):
            x = np.random.default_rng(seed).normal(size=(2, 5)).astype(np.float32)
            jax.block_until_ready(fn(x, x))


@settings(max_examples=30, deadline=None)
@given(
    hnp.arrays(np.float32, (3, 6), elements=st.floats(-10, 10, width=32)),
    hnp.arrays(np.float32, (3, 6), elements=st.floats(-10, 10, width=32)),
)
def test_lambda_one_gamma_one_is_reward_to_go_minus_value(rewards, values):
    adv, ret = rj.gae(rewards, values, gamma=1.0, lam=1.0)
    reward_to_go = np.cumsum(rewards[:, ::-1].astype(np.float64), axis=1)[:, ::-1]
    # Rounding is in ulps of the partial sums, up to 6 terms of |r| <= 10 (and a value).
    scale = np.abs(rewards).sum(1).max() + np.abs(values).max()
    assert_f32_close(adv, reward_to_go - values, ulps=REORDERED, scale=scale)
    assert_f32_close(ret, reward_to_go, ulps=REORDERED, scale=scale)


# ---------------------------------------------------------------- critic-free estimators

# The RLOO blog's example (TRL docs): 3 prompts x 4 completions, laid out as TRL does it,
# completion-major: row j * 3 + n is prompt n's j-th completion.
BLOG_REWARDS_TRL = np.array([1, 2, 3, 2, 3, 4, 5, 6, 7, 8, 9, 10], np.float32)
BLOG_K, BLOG_N = 4, 3


def np_rloo_loop(rewards, k):
    """Leave-one-out baseline by an explicit loop over contiguous groups."""
    out = np.zeros_like(rewards, dtype=np.float64)
    for start in range(0, len(rewards), k):
        group = rewards[start : start + k]
        for i in range(k):
            others = [group[j] for j in range(k) if j != i]
            out[start + i] = group[i] - np.mean(others)
    return out


def np_grpo_loop(rewards, k, scale, eps):
    out = np.zeros_like(rewards, dtype=np.float64)
    batch_std = np.std(rewards.astype(np.float64), ddof=1)
    for start in range(0, len(rewards), k):
        group = rewards[start : start + k].astype(np.float64)
        for i in range(k):
            centred = group[i] - group.mean()
            if scale == "group":
                centred /= np.std(group, ddof=1) + eps
            elif scale == "batch":
                centred /= batch_std + eps
            out[start + i] = centred
    return out


def np_discounted(rewards, mask, gamma):
    batch, length = rewards.shape
    out = np.zeros((batch, length))
    for b in range(batch):
        running = 0.0
        for t in reversed(range(length)):
            running = (rewards[b, t] if mask[b, t] else 0.0) + gamma * running
            out[b, t] = running if mask[b, t] else 0.0
    return out


def prefix_mask(lengths, length):
    return np.arange(length)[None, :] < np.asarray(lengths)[:, None]


class CriticFreeEstimatorTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_rloo_blog_example_loop_and_vectorised_agree(self):
        # TRL's layout [k, N] -> ours, contiguous groups [N, k].
        contiguous = BLOG_REWARDS_TRL.reshape(BLOG_K, BLOG_N).T.reshape(-1)
        ours = self.variant(lambda r: advantages.rloo_advantages(r, BLOG_K))(contiguous)
        # The blog's vectorised form, in its own layout.
        trl = BLOG_REWARDS_TRL.reshape(BLOG_K, BLOG_N)
        trl_adv = trl - (trl.sum(0) - trl) / (BLOG_K - 1)
        assert_f32_close(ours, trl_adv.T.reshape(-1), ulps=REORDERED, floor=1.0)
        assert_f32_close(ours, np_rloo_loop(contiguous, BLOG_K), ulps=REORDERED, floor=1.0)
        # prompt 0 got rewards 1, 2, 5, 8: the first's baseline is (2 + 5 + 8) / 3 = 5.
        assert_f32_close(ours[:4], [-4.0, -8 / 3, 4 / 3, 16 / 3], ulps=REORDERED, floor=1.0)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(scale=("group", "batch", "none"), k=(2, 4))
    def test_grpo_scales_against_loop(self, scale, k):
        rewards = np.random.default_rng(k).normal(size=3 * k).astype(np.float32)
        rewards[:k] = 0.5  # a group with zero std: advantages 0, not NaN
        fn = self.variant(lambda r: advantages.grpo_advantages(r, k, scale=scale, eps=1e-4))
        got = fn(rewards)
        assert_f32_close(got, np_grpo_loop(rewards, k, scale, 1e-4), ulps=REORDERED, floor=1.0)
        np.testing.assert_array_equal(got[:k], 0.0)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(1.0, 0.9, 0.0)
    def test_discounted_returns_against_loop(self, gamma):
        rng = np.random.default_rng(1)
        rewards = rng.normal(size=(4, 7)).astype(np.float32)
        mask = prefix_mask([7, 3, 1, 5], 7)
        fn = self.variant(lambda r, m: advantages.discounted_returns(r, m, gamma=gamma))
        got = fn(rewards, mask)
        assert_f32_close(got, np_discounted(rewards, mask, gamma), ulps=REORDERED, floor=1.0)

    def test_grouped_estimators_reject_bad_layouts(self):
        with self.assertRaisesRegex(ValueError, "7 rewards do not split into groups of 2"):
            advantages.rloo_advantages(np.zeros(7), 2)
        with self.assertRaisesRegex(ValueError, "group_size must be an integer >= 2"):
            advantages.grpo_advantages(np.zeros(4), 1)
        with self.assertRaisesRegex(ValueError, "rewards must be 1-D"):
            advantages.rloo_advantages(np.zeros((2, 2)), 2)
        with self.assertRaisesRegex(ValueError, "unknown scale 'std'"):
            advantages.grpo_advantages(np.zeros(4), 2, scale="std")


def np_whiten(x, mask):
    values = x[mask].astype(np.float64)
    return (x - values.mean()) / np.sqrt(values.var(ddof=1) + 1e-8)


class EstimatorRegistryTest(parameterized.TestCase):
    """Every registered estimator against a NumPy transcription of its published recipe."""

    def setUp(self):
        super().setUp()
        rng = np.random.default_rng(7)
        self.k, self.length = 2, 5
        self.mask = prefix_mask([5, 2, 4, 1, 3, 5], self.length)
        self.scores = rng.normal(size=6).astype(np.float32)
        kl = rng.normal(size=(6, self.length)).astype(np.float32) * self.mask
        self.token_rewards = (-0.1 * kl).astype(np.float32)
        self.values = rng.normal(size=(6, self.length)).astype(np.float32)
        self.inputs = advantages.AdvantageInputs(
            scores=self.scores, token_rewards=self.token_rewards, mask=self.mask, values=self.values
        )
        last = self.mask.sum(1) - 1
        self.per_token = self.token_rewards.copy()
        self.per_token[np.arange(6), last] += self.scores  # score on the last real token

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("gae", "rloo", "grpo", "reinforce++", "reinforce++-baseline")
    def test_against_numpy(self, name):
        got_adv, got_ret = self.variant(
            lambda inputs: advantages.estimate_advantages(
                name, inputs, group_size=self.k, gamma=0.9, lam=0.8, scale="group", eps=1e-4
            )
        )(self.inputs)
        mask, k = self.mask, self.k
        sequence_reward = self.scores + self.token_rewards.sum(1)
        if name == "gae":
            want_adv, want_ret = np_gae(self.per_token, self.values * mask, 0.9, 0.8)
            want_adv, want_ret = want_adv * mask, want_ret * mask
        elif name == "rloo":
            want_adv = np_rloo_loop(sequence_reward, k)[:, None] * mask
            want_ret = sequence_reward[:, None] * mask
        elif name == "grpo":
            want_adv = np_grpo_loop(sequence_reward, k, "group", 1e-4)[:, None] * mask
            want_ret = sequence_reward[:, None] * mask
        else:
            per_token = self.per_token.copy()
            if name == "reinforce++-baseline":
                group_mean = self.scores.reshape(-1, k).mean(1).repeat(k)
                per_token[np.arange(6), mask.sum(1) - 1] -= group_mean
            want_ret = np_discounted(per_token, mask, 0.9)
            want_adv = np_whiten(want_ret, mask) * mask
        assert_f32_close(got_adv, want_adv, ulps=REORDERED, floor=1.0)
        assert_f32_close(got_ret, want_ret, ulps=REORDERED, floor=1.0)

    def test_padding_never_matters(self):
        noisy = self.inputs._replace(
            token_rewards=np.where(self.mask, self.token_rewards, 1e3).astype(np.float32),
            values=np.where(self.mask, self.values, -1e3).astype(np.float32),
        )
        estimate = jax.jit(advantages.estimate_advantages, static_argnames=("name", "group_size"))
        for name in advantages.ADVANTAGE_ESTIMATORS:
            want = estimate(name, self.inputs, group_size=self.k)
            got = estimate(name, noisy, group_size=self.k)
            chex.assert_trees_all_close(got, want, atol=1e-5)

    def test_bad_input(self):
        with self.assertRaisesRegex(ValueError, "unknown advantage estimator 'ppo'"):
            advantages.estimate_advantages("ppo", self.inputs)
        with self.assertRaisesRegex(ValueError, "needs value estimates"):
            advantages.estimate_advantages("gae", self.inputs._replace(values=None))
        with self.assertRaisesRegex(ValueError, r"scores must be \[B\]=\[6\]"):
            bad = self.inputs._replace(scores=np.zeros(5))
            advantages.estimate_advantages("rloo", bad, group_size=2)


jit_discounted_returns = jax.jit(lambda r, m: advantages.discounted_returns(r, m, gamma=0.9))


@settings(max_examples=20, deadline=None)
@given(
    hnp.arrays(np.float32, (3, 6), elements=st.floats(-10, 10, width=32)),
    hnp.arrays(np.float32, (3, 6), elements=st.floats(-1e4, 1e4, width=32)),
    st.lists(st.integers(1, 6), min_size=3, max_size=3),
)
def test_discounted_returns_ignore_padding(rewards, noise, lengths):
    mask = prefix_mask(lengths, 6)
    clean = jit_discounted_returns(np.where(mask, rewards, 0), mask)
    noisy = jit_discounted_returns(np.where(mask, rewards, noise), mask)
    np.testing.assert_array_equal(noisy, clean)
    np.testing.assert_array_equal(np.asarray(clean)[~mask], 0.0)
