"""Policy, value, aggregation and preference losses against NumPy loops from their formulas."""

import math

import chex
import hypothesis.extra.numpy as hnp
import jax
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import REORDERED, assert_f32_close

import rlhf_jax as rj


def np_policy_loss(logp, old, adv, mask, eps_low, eps_high, dual_clip=None):
    losses, clipped_count, sq_log_ratio, n = 0.0, 0, 0.0, 0
    for idx in np.ndindex(*logp.shape):
        if not mask[idx]:
            continue
        ratio = math.exp(float(logp[idx]) - float(old[idx]))
        a = float(adv[idx])
        unclipped = -a * ratio
        clipped = -a * min(max(ratio, 1 - eps_low), 1 + eps_high)
        loss = max(unclipped, clipped)
        if dual_clip is not None and a < 0:
            loss = min(loss, -a * dual_clip)
        losses += loss
        clipped_count += clipped > unclipped
        sq_log_ratio += (float(logp[idx]) - float(old[idx])) ** 2
        n += 1
    return losses / n, clipped_count / n, 0.5 * sq_log_ratio / n


def np_penalty_loss(logp, old, adv, mask, beta):
    """PPO-Penalty, per token -A * ratio + beta * KL(old || new), KL by the k3 estimator."""
    losses, kls, n = 0.0, 0.0, 0
    for idx in np.ndindex(*logp.shape):
        if not mask[idx]:
            continue
        log_ratio = float(logp[idx]) - float(old[idx])
        ratio = math.exp(log_ratio)
        kl = (ratio - 1) - log_ratio
        losses += -float(adv[idx]) * ratio + beta * kl
        kls += kl
        n += 1
    return losses / n, kls / n


def np_value_loss(v, old, ret, mask, clip):
    total, clipfrac, n = 0.0, 0, 0
    for idx in np.ndindex(*v.shape):
        if not mask[idx]:
            continue
        clipped_v = old[idx] + min(max(v[idx] - old[idx], -clip), clip)
        e1, e2 = (v[idx] - ret[idx]) ** 2, (clipped_v - ret[idx]) ** 2
        total += max(e1, e2)
        clipfrac += e2 > e1
        n += 1
    return 0.5 * total / n, clipfrac / n


class LossTest(parameterized.TestCase):
    def setUp(self):
        super().setUp()
        rng = np.random.default_rng(0)
        self.old = -rng.random((4, 6)).astype(np.float32) * 2
        self.logp = self.old + rng.normal(scale=0.3, size=(4, 6)).astype(np.float32)
        self.adv = rng.normal(size=(4, 6)).astype(np.float32)
        self.mask = rng.random((4, 6)) > 0.3
        self.mask[:, 0] = True

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters((0.2, None, None), (0.2, 0.28, None), (0.1, None, 3.0))
    def test_policy_loss(self, eps, eps_high, dual_clip):
        fn = self.variant(
            lambda a, b, c, d: rj.ppo_policy_loss(
                a, b, c, d, clip_eps=eps, clip_eps_high=eps_high, dual_clip=dual_clip
            )
        )
        loss, aux = fn(self.logp, self.old, self.adv, self.mask)
        want_loss, want_clip, want_kl = np_policy_loss(
            self.logp, self.old, self.adv, self.mask, eps, eps_high or eps, dual_clip
        )
        assert_f32_close(loss, want_loss, ulps=REORDERED, floor=1.0)
        assert_f32_close(aux["clipfrac"], want_clip, ulps=REORDERED, floor=1.0)
        assert_f32_close(aux["approx_kl"], want_kl, ulps=REORDERED, floor=1.0)

    def test_policy_loss_ratio_one_at_start(self):
        loss, aux = rj.ppo_policy_loss(self.old, self.old, self.adv, self.mask)
        assert float(aux["approx_kl"]) == 0.0 and float(aux["ratio_mean"]) == 1.0
        assert_f32_close(loss, -rj.masked_mean(self.adv, self.mask), ulps=REORDERED, floor=1.0)

    def test_policy_gradient_is_minus_advantage_at_ratio_one(self):
        grad = jax.grad(lambda lp: rj.ppo_policy_loss(lp, self.old, self.adv, self.mask)[0])(
            self.old
        )
        assert_f32_close(grad, -self.adv * self.mask / self.mask.sum(), ulps=REORDERED, floor=1.0)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(0.0, 0.5, 3.0)
    def test_penalty_loss(self, beta):
        fn = self.variant(lambda a, b, c, d, e: rj.ppo_penalty_loss(a, b, c, d, beta=e))
        loss, aux = fn(self.logp, self.old, self.adv, self.mask, beta)
        want_loss, want_kl = np_penalty_loss(self.logp, self.old, self.adv, self.mask, beta)
        assert_f32_close(loss, want_loss, ulps=REORDERED, floor=1.0)
        assert_f32_close(aux["penalty_kl"], want_kl, ulps=REORDERED, floor=1.0)
        assert float(aux["clipfrac"]) == 0.0 and float(want_kl) > 0
        # beta is a coefficient, not a parameter; at ratio 1 the KL term has no gradient.
        grad = jax.grad(
            lambda lp: rj.ppo_penalty_loss(lp, self.old, self.adv, self.mask, beta=2.0)[0]
        )
        assert_f32_close(
            grad(self.old), -self.adv * self.mask / self.mask.sum(), ulps=REORDERED, floor=1.0
        )

    def test_adapt_penalty_beta(self):
        for kl, want in [(0.001, 0.5), (0.0068, 1.0), (0.01, 1.0), (0.0149, 1.0), (0.02, 2.0)]:
            assert float(rj.adapt_penalty_beta(1.0, kl, target=0.01)) == want, kl

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(0.2, 1.0)
    def test_value_loss(self, clip):
        rng = np.random.default_rng(1)
        v, old, ret = (rng.normal(size=(4, 6)).astype(np.float32) for _ in range(3))
        loss, aux = self.variant(lambda *a: rj.ppo_value_loss(*a, clip_range=clip))(
            v, old, ret, self.mask
        )
        want_loss, want_clip = np_value_loss(v, old, ret, self.mask, clip)
        assert_f32_close(loss, want_loss, ulps=REORDERED, floor=1.0)
        assert_f32_close(aux["clipfrac"], want_clip, ulps=REORDERED, floor=1.0)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(
        "token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"
    )
    def test_aggregation_modes(self, mode):
        x = self.adv
        got = self.variant(lambda a, m: rj.aggregate_loss(a, m, mode))(x, self.mask)
        rows = [[float(x[b, t]) for t in range(6) if self.mask[b, t]] for b in range(4)]
        want = {
            "token-mean": sum(map(sum, rows)) / sum(map(len, rows)),
            "seq-mean-token-mean": np.mean([sum(r) / len(r) for r in rows]),
            "seq-mean-token-sum": np.mean([sum(r) for r in rows]),
            "seq-mean-token-sum-norm": np.mean([sum(r) / 6 for r in rows]),
        }[mode]
        assert_f32_close(got, want, ulps=REORDERED, floor=1.0)

    def test_aggregation_modes_agree_on_one_full_sample(self):
        x = self.adv[:1]
        got = {
            m: float(rj.aggregate_loss(x, np.ones_like(x), m)) for m in rj.losses.LOSS_AGGREGATIONS
        }
        want = float(np.mean(x))
        assert all(
            np.isclose(v, want * (6 if m == "seq-mean-token-sum" else 1), rtol=1e-5)
            for m, v in got.items()
        ), got

    def test_unknown_aggregation(self):
        with pytest.raises(ValueError, match="unknown mode"):
            rj.aggregate_loss(self.adv, self.mask, "sum-everything")

    def test_bad_dual_clip(self):
        with pytest.raises(ValueError, match="dual_clip must be > 1"):
            rj.ppo_policy_loss(self.logp, self.old, self.adv, self.mask, dual_clip=0.5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_bradley_terry(self):
        c = np.array([1.0, -0.5, 2.0], np.float32)
        r = np.array([0.0, 0.5, 2.5], np.float32)
        loss, aux = self.variant(rj.bradley_terry_loss)(c, r)
        want = np.mean([-math.log(1 / (1 + math.exp(-(a - b)))) for a, b in zip(c, r)])
        assert_f32_close(loss, want, ulps=REORDERED, floor=1.0)
        assert_f32_close(aux["accuracy"], 1 / 3, ulps=REORDERED, floor=1.0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_lm_loss(self):
        got = self.variant(rj.lm_loss)(self.old, self.mask)
        assert_f32_close(got, -self.old[self.mask].mean(), ulps=REORDERED, floor=1.0)


@settings(max_examples=40, deadline=None)
@given(
    hnp.arrays(np.float32, (2, 5), elements=st.floats(-5, 0, width=32)),
    hnp.arrays(np.float32, (2, 5), elements=st.floats(-50, 50, width=32)),
    hnp.arrays(bool, (2, 5)),
)
def test_losses_ignore_values_under_the_mask(garbage, other, mask):
    rng = np.random.default_rng(0)
    old = -rng.random((2, 5)).astype(np.float32)
    logp = old + 0.1
    adv = rng.normal(size=(2, 5)).astype(np.float32)
    mask[0, 0] = True

    def scramble(x, junk):
        return np.where(mask, x, junk)

    base = rj.ppo_policy_loss(logp, old, adv, mask)[0]
    moved = rj.ppo_policy_loss(
        scramble(logp, garbage), scramble(old, garbage), scramble(adv, other), mask
    )[0]
    np.testing.assert_array_equal(base, moved)
    vbase = rj.ppo_value_loss(adv, old, logp, mask)[0]
    vmoved = rj.ppo_value_loss(
        scramble(adv, other), scramble(old, other), scramble(logp, garbage), mask
    )[0]
    np.testing.assert_array_equal(vbase, vmoved)
    for mode in rj.losses.LOSS_AGGREGATIONS:
        np.testing.assert_array_equal(
            rj.aggregate_loss(adv, mask, mode), rj.aggregate_loss(scramble(adv, other), mask, mode)
        )
