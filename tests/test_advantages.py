"""GAE as a reverse lax.scan against the textbook backward loop (TRL semantics)."""

import chex
import hypothesis.extra.numpy as hnp
import jax
import numpy as np
from absl.testing import parameterized
from hypothesis import given, settings
from hypothesis import strategies as st

import rlhf_jax as rj


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
        np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-5)

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
    np.testing.assert_allclose(adv, reward_to_go - values, atol=1e-3)
    np.testing.assert_allclose(ret, reward_to_go, atol=1e-3)
