"""KL estimators, reward shaping, the missing-stop penalty and KL controllers against NumPy."""

import math

import chex
import jax
import numpy as np
import pytest
from absl.testing import parameterized
from tolerances import REORDERED, assert_f32_close

import rlhf_jax as rj
from rlhf_jax import rewards


def np_kl(logp, ref, estimator):
    out = np.zeros(logp.shape)
    for idx in np.ndindex(*logp.shape):
        logr = float(ref[idx]) - float(logp[idx])
        out[idx] = {"k1": -logr, "k2": 0.5 * logr**2, "k3": math.exp(logr) - 1 - logr}[estimator]
    return out


class RewardsTest(parameterized.TestCase):
    def setUp(self):
        super().setUp()
        rng = np.random.default_rng(0)
        self.logp = -rng.random((3, 6)).astype(np.float32) * 3
        self.ref = -rng.random((3, 6)).astype(np.float32) * 3
        self.lengths = np.array([2, 5, 0])
        self.scores = np.array([1.5, -0.5, 2.0], np.float32)
        pad = np.arange(6)[None, :] > self.lengths[:, None]
        self.logp[pad] = rj.INVALID_LOGPROB
        self.ref[pad] = rj.INVALID_LOGPROB
        self.pad = pad

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("k1", "k2", "k3")
    def test_kl_estimators(self, estimator):
        got = self.variant(lambda a, b: rj.kl_penalty(a, b, estimator))(self.logp, self.ref)
        assert_f32_close(got, np_kl(self.logp, self.ref, estimator), ulps=REORDERED, floor=1.0)
        assert np.all(np.asarray(got)[self.pad] == 0.0)

    def test_unknown_estimator(self):
        with pytest.raises(ValueError, match="unknown estimator 'k4'"):
            rj.kl_penalty(self.logp, self.ref, "k4")

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(estimator=("k1", "k3"), position=("last_token", "after_last_token"))
    def test_shape_rewards_loop(self, estimator, position):
        fn = self.variant(
            lambda s, a, b, n: rj.shape_rewards(
                s, a, b, n, kl_coef=0.05, estimator=estimator, score_position=position
            )
        )
        rewards, kl = fn(self.scores, self.logp, self.ref, self.lengths)
        want = -0.05 * np_kl(self.logp, self.ref, estimator)
        for i, length in enumerate(self.lengths):
            at = length
            if position == "after_last_token" and length + 1 < self.logp.shape[1]:
                at = length + 1  # TRL: sequence_lengths_p1 when it fits
            want[i, at] += self.scores[i]
        assert_f32_close(rewards, want, ulps=REORDERED, floor=1.0)
        assert_f32_close(kl, np_kl(self.logp, self.ref, estimator), ulps=REORDERED, floor=1.0)

    def test_missing_stop_penalty(self):
        got = rj.apply_missing_stop_penalty(self.scores, np.array([True, False, True]), 1.0)
        np.testing.assert_allclose(got, [1.5, -1.5, 2.0])
        np.testing.assert_allclose(
            rj.apply_missing_stop_penalty(self.scores, [0, 0, 0], None), self.scores
        )
        rewards.check_missing_stop_penalty(None, ())
        rewards.check_missing_stop_penalty(1.0, (2,))
        with pytest.raises(ValueError, match="missing_eos_penalty=1.0 is set but stop_token_ids"):
            rewards.check_missing_stop_penalty(1.0, ())

    def test_adaptive_controller_against_formula(self):
        ctl = rj.adaptive_kl_controller(0.1, target=6.0, horizon=10000)
        state = ctl.init()
        coef = 0.1
        for observed, n in [(9.0, 64), (6.5, 64), (1.0, 128), (6.0, 64)]:
            state = jax.jit(ctl.update)(state, observed, n)
            error = min(max(observed / 6.0 - 1, -0.2), 0.2)
            coef *= 1 + error * n / 10000
            assert_f32_close(state.kl_coef, coef, ulps=REORDERED, floor=1.0)

    def test_fixed_controller_keeps_coefficient(self):
        ctl = rj.fixed_kl_controller(0.05)
        state = ctl.update(ctl.init(), 100.0, 64)
        np.testing.assert_allclose(state.kl_coef, 0.05)
