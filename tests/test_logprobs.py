"""Log-probs and entropies against NumPy; the chunked hidden-state path against the plain one."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import GRADIENT, REORDERED, assert_f32_close

import rlhf_jax as rj


def np_log_softmax_at(logits, tokens):
    out = np.zeros(tokens.shape)
    for idx in np.ndindex(*tokens.shape):
        row = logits[idx].astype(np.float64)
        log_z = np.log(np.sum(np.exp(row - row.max()))) + row.max()
        out[idx] = row[tokens[idx]] - log_z
    return out


class LogprobTest(chex.TestCase):
    def setUp(self):
        super().setUp()
        rng = np.random.default_rng(0)
        self.logits = (rng.normal(size=(2, 5, 11)) * 4).astype(np.float32)
        self.tokens = rng.integers(0, 11, size=(2, 5))

    @chex.variants(with_jit=True, without_jit=True)
    def test_selective_log_softmax(self):
        got = self.variant(rj.selective_log_softmax)(self.logits, self.tokens)
        # Errors of a log-softmax are ulps of the logsumexp, of the size of the largest values.
        assert_f32_close(got, np_log_softmax_at(self.logits, self.tokens), ulps=REORDERED)
        assert got.dtype == jnp.float32

    @chex.variants(with_jit=True, without_jit=True)
    def test_bfloat16_logits_normalised_in_float32(self):
        logits = jnp.asarray(self.logits, jnp.bfloat16)
        got = self.variant(rj.selective_log_softmax)(logits, self.tokens)
        want = np_log_softmax_at(np.asarray(logits.astype(jnp.float32)), self.tokens)
        assert_f32_close(got, want, ulps=REORDERED)

    @chex.variants(with_jit=True, without_jit=True)
    def test_entropy(self):
        got = self.variant(rj.entropy_from_logits)(self.logits)
        want = np.zeros(self.tokens.shape)
        for idx in np.ndindex(*self.tokens.shape):
            p = np.exp(self.logits[idx].astype(np.float64))
            p /= p.sum()
            want[idx] = -np.sum(p * np.log(p))
        assert_f32_close(got, want, ulps=REORDERED, scale=np.abs(self.logits).max())

    def test_integer_logits_rejected(self):
        with pytest.raises(TypeError, match="floating-point"):
            rj.selective_log_softmax(self.tokens, self.tokens)

    def test_shape_mismatch_rejected(self):
        with pytest.raises(ValueError, match="leading shape"):
            rj.selective_log_softmax(self.logits, self.tokens[:, :4])

    @chex.variants(with_jit=True, without_jit=True)
    def test_chunked_from_hidden_matches_plain_and_gradients(self):
        rng = np.random.default_rng(2)
        hidden = rng.normal(size=(2, 8, 6)).astype(np.float32)
        head = rng.normal(size=(6, 13)).astype(np.float32)
        tokens = rng.integers(0, 13, size=(2, 8))

        def plain(h, w):
            logits = (h @ w) / 0.7
            return rj.selective_log_softmax(logits, tokens), rj.entropy_from_logits(logits)

        want_lp, want_ent = plain(hidden, head)
        grad_plain = jax.grad(lambda w: plain(hidden, w)[0].sum())(head)
        # 2 divides the length 8; 3 leaves a partial last chunk (padded, then dropped)
        for size in (2, 3):

            def chunked(h, w, size=size):
                return rj.logprobs_from_hidden(
                    h, tokens, lambda x: x @ w, temperature=0.7, chunk_size=size, with_entropy=True
                )

            got_lp, got_ent = self.variant(chunked)(hidden, head)
            assert got_lp.shape == got_ent.shape == (2, 8)
            assert_f32_close(got_lp, want_lp, ulps=REORDERED)
            assert_f32_close(got_ent, want_ent, ulps=REORDERED, scale=np.abs(want_lp).max())
            grad_chunk = jax.grad(lambda w, f=chunked: f(hidden, w)[0].sum())(head)
            assert_f32_close(grad_chunk, grad_plain, ulps=GRADIENT)
