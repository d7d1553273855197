"""`generate` against transformers' greedy decoding, its own full forward pass, and the sampling
distribution it claims (filters and a chi-square test)."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_utils import EOS_ID, PAD_ID, state_dict_numpy, tiny_hf_model
from tolerances import MODEL, assert_f32_close

import rlhf_jax as rj
from rlhf_jax import models, sampling
from rlhf_jax.models import config_from_hf, hf_to_params
from rlhf_jax.sampling import (
    SamplingConfig,
    _chunk_ranges,
    filter_logits,
    generate,
    prompt_positions,
)

FAMILIES = ("gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3")
jit_generate = jax.jit(generate, static_argnums=(1, 5))


def ours(hf_model):
    config = config_from_hf(hf_model.config)
    return hf_to_params(state_dict_numpy(hf_model), config), config


def left_padded_prompts(batch=3, length=7, vocab=128, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, size=(batch, length))
    real = [length, length - 3, 2][:batch] + [length] * max(0, batch - 3)
    mask = np.arange(length)[None, :] >= (length - np.array(real))[:, None]
    return np.where(mask, tokens, PAD_ID), mask.astype(np.int32)


def hf_greedy(hf_model, tokens, mask, new_tokens, eos=None):
    with torch.no_grad():
        out = hf_model.generate(
            input_ids=torch.as_tensor(tokens),
            attention_mask=torch.as_tensor(mask),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=0,
            pad_token_id=PAD_ID,
            eos_token_id=eos,
        )
    response = out[:, tokens.shape[1] :].numpy()
    return np.pad(response, ((0, 0), (0, new_tokens - response.shape[1])), constant_values=PAD_ID)


@functools.cache
def llama():
    hf_model = tiny_hf_model("llama", seed=3)
    return (hf_model, *ours(hf_model))


def full_logits(params, config, prompt, prompt_mask, response, response_mask):
    tokens = jnp.concatenate([prompt, response], axis=1)
    mask = jnp.concatenate([prompt_mask, response_mask], axis=1)
    hidden, _ = models.forward(params, config, tokens, prompt_positions(mask), mask)
    logits = models.lm_logits(params, config, hidden)
    return np.asarray(logits[:, prompt.shape[1] - 1 : -1], np.float64)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers(family):
    hf_model = tiny_hf_model(family, seed=1)
    params, config = ours(hf_model)
    tokens, mask = left_padded_prompts()
    cfg = SamplingConfig(max_new_tokens=10, greedy=True, pad_token_id=PAD_ID)
    out = jit_generate(params, config, tokens, mask, jax.random.key(0), cfg)
    np.testing.assert_array_equal(out.tokens, hf_greedy(hf_model, tokens, mask, 10))
    assert bool(jnp.all(out.mask)) and not bool(jnp.any(out.stopped))


def test_greedy_stop_handling_matches_transformers():
    hf_model, params, config = llama()
    tokens, mask = left_padded_prompts(batch=3)
    free = np.asarray(
        jit_generate(
            params,
            config,
            tokens,
            mask,
            jax.random.key(0),
            SamplingConfig(max_new_tokens=10, greedy=True),
        ).tokens
    )
    stop = int(free[0, 3])  # row 0 stops at index <= 3; other rows stop where they meet it
    cfg = SamplingConfig(
        max_new_tokens=10, greedy=True, stop_token_ids=(stop, EOS_ID), pad_token_id=PAD_ID
    )
    out = jit_generate(params, config, tokens, mask, jax.random.key(0), cfg)
    want = hf_greedy(hf_model, tokens, mask, 10, eos=[stop, EOS_ID])
    np.testing.assert_array_equal(out.tokens, want)
    for row, length, stopped, row_mask in zip(want, out.sequence_lengths, out.stopped, out.mask):
        hits = [i for i, t in enumerate(row) if t in (stop, EOS_ID)]
        assert int(length) == (hits[0] if hits else 9)
        assert bool(stopped) == bool(hits)
        np.testing.assert_array_equal(row_mask, np.arange(10) <= int(length))
        assert np.all(row[int(length) + 1 :] == PAD_ID)
    assert int(out.sequence_lengths[0]) <= 3


@pytest.mark.parametrize("stop_early, chunks", [(True, 1), (False, 1), (True, 4)])
def test_logprobs_equal_a_full_forward_pass(stop_early, chunks):
    _, params, config = llama()
    tokens, mask = left_padded_prompts(batch=4)
    cfg = SamplingConfig(
        max_new_tokens=12,
        temperature=0.7,
        stop_token_ids=(5, 6, 7),
        pad_token_id=PAD_ID,
        stop_early=stop_early,
        decode_chunks=chunks,
    )
    out = jit_generate(params, config, tokens, mask, jax.random.key(3), cfg)
    logits = full_logits(params, config, tokens, mask, out.tokens, out.mask) / 0.7
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    want = np.take_along_axis(logits, np.asarray(out.tokens)[..., None], -1)[..., 0] - log_z
    got = np.asarray(out.logprobs)
    m = np.asarray(out.mask)
    # Decode steps against one full pass: the same model math in different programs.
    assert_f32_close(got[m], want[m], ulps=MODEL)
    assert np.all(got[~m] == rj.INVALID_LOGPROB)
    assert np.all(np.asarray(out.tokens)[~m] == PAD_ID)


def np_allowed(logits, top_k=0, top_p=1.0, min_p=0.0):
    """Allowed-token sets from the definitions (HF order: top-k, then top-p, then min-p)."""
    allowed = np.ones(logits.shape, bool)
    for idx in np.ndindex(*logits.shape[:-1]):
        row = logits[idx].copy()
        keep = np.ones(row.shape, bool)
        if top_k:
            keep &= row >= np.sort(row)[-top_k]
        if top_p < 1.0:
            probs = np.exp(np.where(keep, row, -np.inf) - row[keep].max())
            probs /= probs.sum()
            order = np.argsort(-probs, kind="stable")
            mass = 0.0
            nucleus = np.zeros(row.shape, bool)
            for j in order:
                if mass >= top_p:
                    break
                nucleus[j] = True
                mass += probs[j]
            keep &= nucleus | (row >= row[nucleus].min())
        if min_p > 0.0:
            probs = np.exp(np.where(keep, row, -np.inf) - row[keep].max())
            keep &= probs >= min_p * probs.max() * (1 - 1e-6)
        allowed[idx] = keep
    return allowed


@pytest.mark.parametrize(
    "filters",
    [dict(top_k=5), dict(top_p=0.6), dict(min_p=0.2), dict(top_k=20, top_p=0.9, min_p=0.05)],
)
def test_filters_never_emit_outside_the_allowed_set(filters):
    _, params, config = llama()
    tokens, mask = left_padded_prompts(batch=3)
    tokens, mask = np.tile(tokens, (40, 1)), np.tile(mask, (40, 1))
    cfg = SamplingConfig(max_new_tokens=4, temperature=1.3, pad_token_id=PAD_ID, **filters)
    out = jit_generate(params, config, tokens, mask, jax.random.key(7), cfg)
    logits = full_logits(params, config, tokens, mask, out.tokens, out.mask) / 1.3
    allowed = np_allowed(logits, **filters)
    picked = np.take_along_axis(allowed, np.asarray(out.tokens)[..., None], -1)[..., 0]
    assert picked.all(), f"{(~picked).sum()} sampled tokens outside the {filters} set"
    jax_allowed = np.isfinite(
        np.asarray(
            filter_logits(jnp.asarray(logits, jnp.float32).reshape(-1, logits.shape[-1]), cfg)
        )
    )
    assert (jax_allowed == allowed.reshape(jax_allowed.shape)).mean() > 0.999


def test_unfiltered_frequencies_match_the_softmax():
    _, params, config = llama()
    n = 4000
    tokens, mask = left_padded_prompts(batch=1)
    tokens, mask = np.tile(tokens, (n, 1)), np.tile(mask, (n, 1))
    out = jit_generate(
        params, config, tokens, mask, jax.random.key(11), SamplingConfig(max_new_tokens=1)
    )
    logits = full_logits(params, config, tokens[:1], mask[:1], out.tokens[:1], out.mask[:1])[0, 0]
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    counts = np.bincount(np.asarray(out.tokens[:, 0]), minlength=probs.size)
    expected = probs * n
    big = expected >= 5  # pool rare tokens into one bin
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    dof = len(obs) - 1
    z = 3.09  # p = 0.001, Wilson-Hilferty approximation of the chi-square quantile
    critical = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    assert chi2 < critical, (chi2, critical, dof)


def test_two_level_inverse_cdf_draws_from_the_softmax():
    """The sampler proper, on a vocabulary that is not a multiple of its 128-token blocks, with a
    whole block and scattered tokens at -inf (never drawn) and a NumPy chi-square check."""
    from rlhf_jax.sampling import _categorical

    vocab, n = 300, 60_000
    logits = np.random.default_rng(3).normal(0, 1.5, vocab).astype(np.float32)
    logits[128:256] = -np.inf  # the middle block has no mass
    logits[[0, 5, 299]] = -np.inf
    draws = jax.jit(_categorical)(jax.random.key(4), jnp.broadcast_to(logits, (n, vocab)))
    counts = np.bincount(np.asarray(draws), minlength=vocab)
    assert counts.size == vocab and counts[~np.isfinite(logits)].sum() == 0
    probs = np.exp(logits - logits[np.isfinite(logits)].max())
    probs /= probs.sum()
    keep = probs * n >= 5  # pool the rare tokens into one cell
    obs = np.append(counts[keep], counts[~keep].sum())
    exp = np.append(probs[keep] * n, probs[~keep].sum() * n)
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    dof = len(obs) - 1
    z = 3.09  # p = 0.001
    critical = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    assert chi2 < critical, (chi2, critical, dof)
    # One real token: always drawn, whatever the uniforms.
    one_hot = np.full((64, vocab), -np.inf, np.float32)
    one_hot[:, 200] = 0.0
    assert (np.asarray(_categorical(jax.random.key(5), jnp.asarray(one_hot))) == 200).all()


def test_same_key_same_output_and_independent_rows():
    _, params, config = llama()
    tokens, mask = left_padded_prompts(batch=1)
    tokens, mask = np.tile(tokens, (8, 1)), np.tile(mask, (8, 1))
    cfg = SamplingConfig(max_new_tokens=6, pad_token_id=PAD_ID)
    a = jit_generate(params, config, tokens, mask, jax.random.key(5), cfg)
    b = jit_generate(params, config, tokens, mask, jax.random.key(5), cfg)
    c = jit_generate(params, config, tokens, mask, jax.random.key(6), cfg)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert len({tuple(r) for r in np.asarray(a.tokens)}) > 1, (
        "identical prompts gave identical rows"
    )
    assert not np.array_equal(a.tokens, c.tokens)


def test_chunked_decoding_gives_the_same_samples():
    """Decoding in chunks over a growing cache changes only which empty slots are read."""
    hf_model, params, config = llama()
    tokens, mask = left_padded_prompts(batch=4)
    base = dict(max_new_tokens=13, temperature=0.7, pad_token_id=PAD_ID)
    free = jit_generate(params, config, tokens, mask, jax.random.key(2), SamplingConfig(**base))
    base["stop_token_ids"] = (int(free.tokens[0, 4]), int(free.tokens[1, 7]))
    one = jit_generate(params, config, tokens, mask, jax.random.key(2), SamplingConfig(**base))
    assert int(jnp.sum(one.stopped)) >= 2, "rows 0 and 1 meet a stop token"
    cfg = SamplingConfig(**base, decode_chunks=5)
    out = jit_generate(params, config, tokens, mask, jax.random.key(2), cfg)
    np.testing.assert_array_equal(out.tokens, one.tokens)
    np.testing.assert_array_equal(out.mask, one.mask)
    np.testing.assert_array_equal(out.sequence_lengths, one.sequence_lengths)
    assert_f32_close(out.logprobs, one.logprobs, ulps=MODEL)  # chunks fuse differently
    greedy = SamplingConfig(max_new_tokens=10, greedy=True, pad_token_id=PAD_ID, decode_chunks=3)
    out = jit_generate(params, config, tokens, mask, jax.random.key(0), greedy)
    np.testing.assert_array_equal(out.tokens, hf_greedy(hf_model, tokens, mask, 10))


def test_jit_generate_samples_as_generate_does_with_the_decode_options(monkeypatch):
    """`rj.jit_generate` (XLA's own dot kernels on CPU) samples what `generate` does."""
    _, params, config = llama()
    tokens, mask = left_padded_prompts(batch=4)
    cfg = SamplingConfig(max_new_tokens=9, temperature=0.7, stop_token_ids=(EOS_ID,))
    want = jit_generate(params, config, tokens, mask, jax.random.key(5), cfg)
    got = rj.jit_generate(config, cfg)(params, tokens, mask, jax.random.key(5))
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.mask, want.mask)
    assert_f32_close(got.logprobs, want.logprobs, ulps=MODEL)  # other matmul kernels
    assert sampling.decode_compiler_options("gpu") == {}
    assert sampling.decode_compiler_options("cpu") == sampling._CPU_DECODE_OPTIONS
    # An XLA that does not know the option compiles with its defaults instead of failing.
    monkeypatch.setattr(sampling, "_CPU_DECODE_OPTIONS", {"xla_cpu_no_such_option": "1"})
    sampling._accepted_cpu_decode_options.cache_clear()
    try:
        assert sampling.decode_compiler_options("cpu") == {}
    finally:
        sampling._accepted_cpu_decode_options.cache_clear()


@pytest.mark.parametrize("new_tokens", [1, 2, 24, 25, 64, 53, 1000])
@pytest.mark.parametrize("chunks", [None, 1, 3, 8])
def test_chunk_ranges_cover_every_decode_step_once(new_tokens, chunks):
    ranges = _chunk_ranges(SamplingConfig(max_new_tokens=new_tokens, decode_chunks=chunks))
    steps = [t for start, stop in ranges for t in range(start, stop)]
    assert steps == list(range(1, new_tokens))
    assert all(stop > start for start, stop in ranges)
    sizes = [stop - start for start, stop in ranges]
    assert not sizes or max(sizes) - min(sizes) <= 1
    if chunks is not None:
        assert len(ranges) == min(chunks, new_tokens - 1)
    elif new_tokens == 1:
        assert ranges == []
    elif new_tokens <= 24:  # automatic: one chunk up to 24 new tokens
        assert len(ranges) == 1
    else:  # then about 16 steps a chunk, at most 8 chunks
        assert len(ranges) == min(8, round((new_tokens - 1) / 16)) >= 2


def test_compiles_once_for_repeated_calls():
    _, params, config = llama()
    chex.clear_trace_counter()
    fn = jax.jit(chex.assert_max_traces(generate, n=1), static_argnums=(1, 5))
    cfg = SamplingConfig(max_new_tokens=3, stop_token_ids=(EOS_ID,), pad_token_id=PAD_ID)
    for seed in range(3):
        tokens, mask = left_padded_prompts(batch=3, seed=seed)
        jax.block_until_ready(fn(params, config, tokens, mask, jax.random.key(seed), cfg))


def test_bad_config_and_inputs():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        SamplingConfig(max_new_tokens=4, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(max_new_tokens=4, top_p=1.5)
    with pytest.raises(ValueError, match="decode_chunks must be >= 1"):
        SamplingConfig(max_new_tokens=4, decode_chunks=0)
    _, params, config = llama()
    with pytest.raises(ValueError, match="must both be"):
        generate(
            params,
            config,
            np.zeros((2, 3), int),
            np.ones((2, 4), int),
            jax.random.key(0),
            SamplingConfig(max_new_tokens=2),
        )


@pytest.mark.parametrize("greedy", [False, True])
def test_decoding_exits_once_every_row_has_stopped(greedy):
    """With stop tokens, decoding ends when the last row stops: the same tokens, log-probs, masks
    and lengths as running every step (bit for bit: the steps not run would emit only padding),
    in one scan or in chunks; `decode_steps` counts the steps run. Without a stop token, or with
    `exit_early=False`, every step runs."""
    _, params, config = llama()
    tokens, mask = left_padded_prompts(batch=4)
    base = dict(max_new_tokens=14, temperature=0.7, greedy=greedy, pad_token_id=PAD_ID)
    free = jit_generate(params, config, tokens, mask, jax.random.key(4), SamplingConfig(**base))
    assert int(free.decode_steps) == 14
    # Every row's third token stops it (or an earlier one, where another row's stop id appears).
    base["stop_token_ids"] = tuple(int(t) for t in np.asarray(free.tokens)[:, 2])
    for chunks in (1, 3):
        full, early = (
            jit_generate(
                params,
                config,
                tokens,
                mask,
                jax.random.key(4),
                SamplingConfig(**base, decode_chunks=chunks, exit_early=exit_early),
            )
            for exit_early in (False, True)
        )
        assert bool(jnp.all(full.stopped)) and int(full.decode_steps) == 14
        for name in ("tokens", "logprobs", "mask", "sequence_lengths", "stopped"):
            np.testing.assert_array_equal(getattr(early, name), getattr(full, name), err_msg=name)
        assert int(early.decode_steps) == int(jnp.max(full.sequence_lengths)) + 1 <= 3


jit_generate_k = jax.jit(generate, static_argnums=(1, 5), static_argnames="num_samples")


@pytest.mark.parametrize("greedy", [False, True])
@pytest.mark.parametrize("exit_early", [False, True])
def test_shared_prefill_equals_generate_on_repeated_prompts(greedy, exit_early):
    """`num_samples=k` prefills each prompt once and repeats its cache and logits to rows
    `n*k .. n*k + k - 1`: the same tokens, masks and lengths, bit for bit, as `generate` on the
    `jnp.repeat`ed prompts with the same key (the decode steps draw the same random numbers over
    the same rows); log-probs up to rounding. The prompts differ in tokens and padding, so a
    wrong row order (e.g. `jnp.tile`) changes the output."""
    _, params, config = llama()
    k = 3
    tokens, mask = left_padded_prompts(batch=3)
    rep_tokens, rep_mask = np.repeat(tokens, k, axis=0), np.repeat(mask, k, axis=0)
    base = dict(max_new_tokens=12, temperature=0.7, greedy=greedy, pad_token_id=PAD_ID)
    base.update(decode_chunks=2, exit_early=exit_early)
    key = jax.random.key(7)
    free = jit_generate(params, config, rep_tokens, rep_mask, key, SamplingConfig(**base))
    # Stop ids that end every row within its first few tokens (early exit is exercised).
    cfg = SamplingConfig(**base, stop_token_ids=tuple({int(t) for t in free.tokens[:, 2]}))
    want = jit_generate(params, config, rep_tokens, rep_mask, key, cfg)
    got = jit_generate_k(params, config, tokens, mask, key, cfg, num_samples=k)
    for name in ("tokens", "mask", "sequence_lengths", "stopped", "decode_steps"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    assert_f32_close(got.logprobs, want.logprobs, ulps=MODEL)
    assert int(got.decode_steps) <= 3 if exit_early else int(got.decode_steps) == 12
    # Not vacuous: prompts give different completions; a tiled (wrong) order would not match.
    wrong = jit_generate(params, config, np.tile(tokens, (k, 1)), np.tile(mask, (k, 1)), key, cfg)
    assert not np.array_equal(wrong.tokens, want.tokens)
    if not greedy:  # sampled rows of one prompt differ
        groups = np.asarray(got.tokens).reshape(3, k, -1)
        assert all(len({row.tobytes() for row in g}) > 1 for g in groups)
    one = jit_generate_k(params, config, rep_tokens, rep_mask, key, cfg, num_samples=1)
    np.testing.assert_array_equal(one.tokens, want.tokens)
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        generate(params, config, tokens, mask, key, cfg, num_samples=0)
