"""Masked statistics and stop-token truncation against NumPy loops written from the formulas."""

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import REORDERED, assert_f32_close

import rlhf_jax as rj


def np_masked_mean(x, mask):
    total, count = 0.0, 0
    for value, keep in zip(x.ravel(), mask.ravel()):
        if keep:
            total += float(value)
            count += 1
    return total / count


def np_masked_var(x, mask, unbiased=True):
    kept = [float(v) for v, m in zip(x.ravel(), mask.ravel()) if m]
    mean = sum(kept) / len(kept)
    var = sum((v - mean) ** 2 for v in kept) / len(kept)
    return var * len(kept) / (len(kept) - 1) if unbiased else var


class MaskedStatsTest(parameterized.TestCase):
    def setUp(self):
        super().setUp()
        rng = np.random.default_rng(0)
        self.x = rng.normal(size=(3, 7)).astype(np.float32) * 3 + 1
        self.mask = rng.random((3, 7)) > 0.4
        self.mask[0, 0] = True

    @chex.variants(with_jit=True, without_jit=True)
    def test_masked_mean(self):
        got = self.variant(rj.masked_mean)(self.x, self.mask)
        assert_f32_close(got, np_masked_mean(self.x, self.mask), ulps=REORDERED, floor=1.0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_masked_mean_axis(self):
        got = self.variant(lambda x, m: rj.masked_mean(x, m, axis=1))(self.x, self.mask)
        want = [np_masked_mean(self.x[i], self.mask[i]) for i in range(3)]
        assert_f32_close(got, want, ulps=REORDERED, floor=1.0)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(True, False)
    def test_masked_var(self, unbiased):
        got = self.variant(lambda x, m: rj.masked_var(x, m, unbiased=unbiased))(self.x, self.mask)
        assert_f32_close(got, np_masked_var(self.x, self.mask, unbiased), ulps=REORDERED, floor=1.0)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(True, False)
    def test_masked_whiten(self, shift_mean):
        got = self.variant(lambda x, m: rj.masked_whiten(x, m, shift_mean=shift_mean))(
            self.x, self.mask
        )
        mean = np_masked_mean(self.x, self.mask)
        var = np_masked_var(self.x, self.mask)
        want = (self.x - mean) / np.sqrt(var + 1e-8)
        if not shift_mean:
            want = want + mean
        assert_f32_close(got, want, ulps=REORDERED, floor=1.0)

    def test_single_element_whitens_to_zero_not_nan(self):
        mask = np.zeros((2, 3), bool)
        mask[1, 2] = True
        got = rj.masked_whiten(self.x[:2, :3], mask)
        assert np.isfinite(np.asarray(got)).all()
        assert float(got[1, 2]) == 0.0

    def test_all_masked_whitening_is_a_clear_error_or_nan_under_jit(self):
        with pytest.raises(ValueError, match="selects no element"):
            rj.masked_whiten(self.x, np.zeros_like(self.mask))
        # Under jit: NaN everywhere (no host callback, so the program stays cacheable).
        got = jax.jit(rj.masked_whiten)(self.x, jnp.zeros(self.mask.shape))
        assert np.isnan(np.asarray(got)).all()
        ok = jax.jit(rj.masked_whiten)(self.x, jnp.asarray(self.mask))
        assert np.isfinite(np.asarray(ok)).all()

    def test_shape_mismatch_is_a_clear_error(self):
        with pytest.raises(ValueError, match=r"x\[3, 7\], mask\[3, 6\]"):
            rj.masked_mean(self.x, self.mask[:, :6])

    def test_all_masked_mean_is_zero(self):
        assert float(rj.masked_mean(self.x, np.zeros_like(self.mask))) == 0.0

    def test_compiles_once_per_shape(self):
        chex.clear_trace_counter()
        fn = jax.jit(chex.assert_max_traces(rj.masked_whiten, n=1))
        for seed in range(3):
            x = np.random.default_rng(seed).normal(size=(3, 7)).astype(np.float32)
            fn(x, self.mask).block_until_ready()


masked_arrays = st.integers(2, 12).flatmap(
    lambda n: st.tuples(
        hnp.arrays(np.float32, (n,), elements=st.floats(-100, 100, width=32)),
        hnp.arrays(np.float32, (n,), elements=st.floats(-100, 100, width=32)),
        hnp.arrays(bool, (n,)),
    )
)


@settings(max_examples=40, deadline=None)
@given(masked_arrays)
def test_values_under_the_mask_never_matter(arrays):
    x, other, mask = arrays
    mask[0] = mask[1] = True
    y = np.where(mask, x, other)
    for fn in (rj.masked_mean, rj.masked_var, lambda a, m: rj.masked_whiten(a, m)[m]):
        np.testing.assert_array_equal(np.asarray(fn(x, mask)), np.asarray(fn(y, mask)))


@settings(max_examples=40, deadline=None)
@given(masked_arrays)
def test_whitened_values_have_mean_zero_and_unit_variance(arrays):
    x, _, mask = arrays
    mask[0] = mask[1] = True
    x = x + np.arange(len(x), dtype=np.float32)  # keep the masked-in values from being all equal
    white = rj.masked_whiten(x, mask)
    var = np_masked_var(x, mask)
    # x - mean(x) carries ulps of max|x|, which whitening divides by std(x).
    scale = max(np.abs(x[mask]).max() / np.sqrt(var), 1.0)
    assert_f32_close(rj.masked_mean(white, mask), 0.0, ulps=REORDERED, scale=scale)
    assert_f32_close(rj.masked_var(white, mask), var / (var + 1e-8), ulps=REORDERED, scale=scale)


class TruncationTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_first_true_indices(self):
        bools = np.array([[0, 0, 1, 1], [0, 0, 0, 0], [1, 0, 0, 1]], bool)
        want = []
        for row in bools:
            hits = [i for i, b in enumerate(row) if b]
            want.append(hits[0] if hits else len(row))
        np.testing.assert_array_equal(self.variant(rj.first_true_indices)(bools), want)

    @chex.variants(with_jit=True, without_jit=True)
    def test_trl_worked_example(self):
        responses = np.array([[5, 6, 2, 7, 8], [5, 6, 7, 8, 9], [2, 6, 7, 8, 9]])
        tokens, lengths = self.variant(lambda t: rj.truncate_after_stop(t, 2, 0))(responses)
        np.testing.assert_array_equal(tokens, [[5, 6, 2, 0, 0], [5, 6, 7, 8, 9], [2, 0, 0, 0, 0]])
        np.testing.assert_array_equal(lengths, [2, 4, 0])

    @chex.variants(with_jit=True, without_jit=True)
    def test_several_stop_ids_against_loop(self):
        rng = np.random.default_rng(1)
        responses = rng.integers(3, 12, size=(16, 9))
        stops, pad = (3, 4), 0
        tokens, lengths = self.variant(lambda t: rj.truncate_after_stop(t, stops, pad))(responses)
        for row, got_row, got_len in zip(responses, np.asarray(tokens), np.asarray(lengths)):
            want = list(row)
            last = len(row) - 1
            for i, tok in enumerate(row):
                if tok in stops:
                    want = list(row[: i + 1]) + [pad] * (len(row) - i - 1)
                    last = i
                    break
            np.testing.assert_array_equal(got_row, want)
            assert got_len == last
        mask = rj.response_mask(lengths, responses.shape[1])
        np.testing.assert_array_equal(np.asarray(mask).sum(1), np.asarray(lengths) + 1)
