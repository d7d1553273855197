"""Parity of `rlhf_jax.models` with transformers' PyTorch models on tiny random weights."""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_utils import PAD_ID, VOCAB_SIZE, state_dict_numpy, tiny_hf_model, torch_logits
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import GRADIENT, MODEL, REORDERED, assert_f32_close

from rlhf_jax.models import (
    KVCache,
    ModelConfig,
    config_from_hf,
    forward,
    hf_to_params,
    init_cache,
    init_params,
    lm_logits,
    logical_axes,
    rope,
    score,
    sequence_scores,
    unstack_layers,
)

# name -> (HF family, config overrides); together they cover every flag of ModelConfig.
VARIANTS = {
    "gpt2": ("gpt2", dict(scale_attn_by_inverse_layer_idx=True)),
    "gpt_neox": ("gpt_neox", {}),
    "gpt_neox_sequential": (
        "gpt_neox",
        dict(use_parallel_residual=False, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    ),
    "llama": ("llama", {}),
    "llama_bias_llama3_tied": (
        "llama",
        dict(
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=True,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        ),
    ),
    "mistral": ("mistral", dict(rope_theta=500.0)),
    "qwen2": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen3": ("qwen3", dict(rope_theta=1e6)),
}
FAMILIES = ["gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3"]


@functools.cache
def reference(name: str, head: str = "lm"):
    """(torch model, our params, our config) for a variant."""
    family, overrides = VARIANTS[name]
    model = tiny_hf_model(family, head=head, **overrides)
    config = config_from_hf(model.config)
    params = jax.tree.map(jnp.asarray, hf_to_params(state_dict_numpy(model), config))
    return model, params, config


@functools.partial(jax.jit, static_argnums=1)
def logits_fn(params, config, tokens_BT, positions_BT, mask_BT):
    hidden_BTD, _ = forward(params, config, tokens_BT, positions_BT, mask_BT)
    return lm_logits(params, config, hidden_BTD)


@functools.partial(jax.jit, static_argnums=1)
def cached_logits_fn(params, config, tokens_BT, positions_BT, mask_BT, cache):
    hidden_BTD, cache = forward(params, config, tokens_BT, positions_BT, mask_BT, cache)
    return lm_logits(params, config, hidden_BTD), cache


sequence_scores_fn = jax.jit(sequence_scores, static_argnums=1)


def random_tokens(shape, seed=0):
    return np.random.default_rng(seed).integers(3, VOCAB_SIZE, shape)


def left_padded(lengths, t, seed=0):
    """Tokens, mask and exclusive-cumsum positions of left-padded rows of the given lengths."""
    mask = np.arange(t)[None, :] >= t - np.asarray(lengths)[:, None]
    tokens = np.where(mask, random_tokens((len(lengths), t), seed), PAD_ID)
    positions = np.cumsum(mask, axis=1) - mask
    return tokens, mask, positions


# One batch shape [3, 12] for all full passes, so each variant compiles `logits_fn` once.
B, T = 3, 12


@pytest.mark.parametrize("name", VARIANTS)
def test_logits_match_torch(name):
    model, params, config = reference(name)
    tokens = random_tokens((B, T))
    positions = np.broadcast_to(np.arange(T), (B, T))
    ours = logits_fn(params, config, tokens, positions, np.ones((B, T), bool))
    assert ours.dtype == jnp.float32
    assert_f32_close(ours, torch_logits(model, tokens), ulps=MODEL)


def test_dynamic_rope_beyond_max_positions_matches_torch():
    model = tiny_hf_model(
        "llama", max_position_embeddings=8, rope_scaling={"rope_type": "dynamic", "factor": 2.0}
    )
    config = config_from_hf(model.config)
    params = hf_to_params(state_dict_numpy(model), config)
    tokens = random_tokens((B, T))
    positions = np.broadcast_to(np.arange(T), (B, T))
    ours = logits_fn(params, config, tokens, positions, np.ones((B, T), bool))
    assert_f32_close(ours, torch_logits(model, tokens), ulps=MODEL)


@pytest.mark.parametrize("name", VARIANTS)
def test_left_padded_batch_matches_rows_alone(name):
    """Real tokens of a left-padded batch get the logits of each row run alone (torch, no
    padding) and of torch given the same attention mask and position ids."""
    model, params, config = reference(name)
    lengths = [12, 7, 3]
    tokens, mask, positions = left_padded(lengths, T)
    ours = np.asarray(logits_fn(params, config, tokens, positions, mask))
    assert np.isfinite(ours).all()
    assert_f32_close(ours[mask], torch_logits(model, tokens, mask, positions)[mask], ulps=MODEL)
    for row, n in enumerate(lengths):
        alone = torch_logits(model, tokens[row : row + 1, T - n :])
        assert_f32_close(ours[row, T - n :], alone[0], ulps=MODEL)


@settings(max_examples=10, deadline=None)
@given(
    lengths=st.lists(st.integers(0, T), min_size=B, max_size=B),
    pad_seed=st.integers(0, 2**16),
)
def test_tokens_and_positions_under_the_mask_never_matter(lengths, pad_seed):
    _, params, config = reference("qwen3")
    tokens, mask, positions = left_padded(lengths, T)
    rng = np.random.default_rng(pad_seed)
    other_tokens = np.where(mask, tokens, rng.integers(0, VOCAB_SIZE, (B, T)))
    other_positions = np.where(mask, positions, rng.integers(0, 64, (B, T)))
    ours = np.asarray(logits_fn(params, config, tokens, positions, mask))
    other = np.asarray(logits_fn(params, config, other_tokens, other_positions, mask))
    assert np.isfinite(other).all()
    assert_f32_close(ours[mask], other[mask], ulps=REORDERED)


@pytest.mark.parametrize("name", VARIANTS)
def test_prefill_and_decode_match_full_pass(name):
    _, params, config = reference(name)
    prompt_len, steps, max_len = 8, 4, 16
    assert prompt_len + steps == T
    prompt, prompt_mask, _ = left_padded([8, 5, 2], prompt_len, seed=1)
    new_tokens = random_tokens((B, steps), seed=2)
    new_mask = np.ones((B, steps), bool)
    new_mask[2, 1] = False  # a pad in the middle of decoding (e.g. a finished row)
    tokens = np.concatenate([prompt, new_tokens], axis=1)
    mask = np.concatenate([prompt_mask, new_mask], axis=1)
    positions = np.cumsum(mask, axis=1) - mask
    full = np.asarray(logits_fn(params, config, tokens, positions, mask))

    cache = init_cache(config, B, max_len)
    sl = slice(0, prompt_len)
    logits, cache = cached_logits_fn(
        params, config, tokens[:, sl], positions[:, sl], mask[:, sl], cache
    )
    assert_f32_close(np.asarray(logits)[mask[:, sl]], full[:, sl][mask[:, sl]], ulps=MODEL)
    for i in range(prompt_len, prompt_len + steps):
        sl = slice(i, i + 1)
        logits, cache = cached_logits_fn(
            params, config, tokens[:, sl], positions[:, sl], mask[:, sl], cache
        )
        real = mask[:, i]
        assert_f32_close(np.asarray(logits)[real, 0], full[real, i], ulps=MODEL)
    assert int(cache.index) == prompt_len + steps
    np.testing.assert_array_equal(cache.mask[:, : prompt_len + steps], mask)
    assert not cache.mask[:, prompt_len + steps :].any()


@pytest.mark.parametrize("name", FAMILIES)
def test_reward_score_matches_torch_sequence_classification(name):
    model, params, config = reference(name, head="score")
    assert config.head == "score" and config.num_labels == 1
    lengths = [12, 9, 4]
    mask = np.arange(T)[None, :] < np.asarray(lengths)[:, None]
    tokens = np.where(mask, random_tokens((B, T), seed=3), PAD_ID)
    positions = np.cumsum(mask, axis=1) - mask
    ours = sequence_scores_fn(params, config, tokens, positions, mask)
    assert ours.shape == (B, 1)
    want = torch_logits(model, tokens, mask)
    assert_f32_close(ours, want, ulps=MODEL)
    # The last layer on positions 3.. only (every row's last real token is at 3 or later).
    partial = jax.jit(functools.partial(sequence_scores, first_scored=3), static_argnums=1)
    assert_f32_close(partial(params, config, tokens, positions, mask), want, ulps=MODEL)
    with pytest.raises(ValueError, match="first_scored"):
        sequence_scores(params, config, tokens, positions, mask, first_scored=T)


def test_forward_compiles_once():
    _, params, config = reference("llama")

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, tokens_BT, positions_BT, mask_BT, cache):
        return forward(params, config, tokens_BT, positions_BT, mask_BT, cache)

    cache = init_cache(config, 2, 8)
    for i in range(3):
        tokens = random_tokens((2, 1), seed=i)
        _, cache = step(params, tokens, np.full((2, 1), i), np.ones((2, 1), bool), cache)
    assert int(cache.index) == 3


def test_unstacked_layers_give_the_same_cached_pass():
    _, params, config = reference("qwen2")
    tokens = random_tokens((2, 3))
    positions, mask = np.broadcast_to(np.arange(3), (2, 3)), np.ones((2, 3), bool)
    step = jax.jit(forward, static_argnums=1)
    stacked = step(params, config, tokens, positions, mask, init_cache(config, 2, 4))
    unstacked_params = unstack_layers(params)
    assert len(unstacked_params["layers"]) == config.num_layers
    unstacked = step(unstacked_params, config, tokens, positions, mask, init_cache(config, 2, 4))
    assert_f32_close(stacked, unstacked, ulps=REORDERED)
    with pytest.raises(ValueError, match="stacked params"):
        forward(unstacked_params, config, tokens, positions, mask)
    with pytest.raises(ValueError, match="cache holds"):
        forward(
            params,
            config,
            tokens,
            positions,
            mask,
            init_cache(dataclasses.replace(config, num_layers=3), 2, 4),
        )


def test_logical_axes_match_params():
    for name in ("gpt2", "qwen3"):
        _, params, config = reference(name)
        axes = logical_axes(config)
        assert jax.tree.structure(params) == jax.tree.structure(
            axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
        )
        for leaf, spec in zip(
            jax.tree.leaves(params),
            jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
            strict=True,
        ):
            assert len(spec) == leaf.ndim
    axes = logical_axes(config)
    assert axes["layers"]["attn"]["q"]["kernel"] == jax.sharding.PartitionSpec(
        "layers", "embed", "heads", "head_dim"
    )
    assert axes["embed"]["embedding"] == jax.sharding.PartitionSpec("vocab", "embed")


def test_rope_tables_are_cos_and_sin_bit_for_bit():
    """The tables pass through a full-precision identity dot (so XLA:CPU materialises them once
    instead of re-evaluating cos/sin in every consumer); that must not change a bit."""
    config = reference("llama_bias_llama3_tied")[2]  # llama3 frequency scaling
    positions = jnp.asarray(np.random.default_rng(0).integers(0, 5000, (3, 17)), jnp.int32)
    cos, sin = jax.jit(rope.cos_sin, static_argnums=0)(config, positions)

    @jax.jit
    def plain(positions):
        angles = positions.astype(jnp.float32)[..., None] * rope.inv_freq(config, positions)
        angles = jnp.concatenate([angles, angles], axis=-1)
        return jnp.cos(angles), jnp.sin(angles)

    want_cos, want_sin = plain(positions)
    np.testing.assert_array_equal(cos, want_cos)
    np.testing.assert_array_equal(sin, want_sin)
    x = jnp.asarray([[1e-30, -3.0e38, 1.0 + 2**-23, -0.0, 7.25]], jnp.float32)
    np.testing.assert_array_equal(rope.materialized(x), x)


def test_init_params_bfloat16():
    config = ModelConfig(
        family="llama",
        vocab_size=64,
        hidden_size=32,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        intermediate_size=64,
        max_position_embeddings=32,
        param_dtype="bfloat16",
        dtype="bfloat16",
    )
    params = init_params(config, jax.random.key(0))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    assert params["layers"]["attn"]["q"]["kernel"].shape == (3, 32, 4, 8)
    tokens = random_tokens((2, 5)) % 64
    positions = np.broadcast_to(np.arange(5), (2, 5))
    hidden, cache = jax.jit(forward, static_argnums=1)(
        params, config, tokens, positions, np.ones((2, 5), bool)
    )
    assert hidden.dtype == jnp.bfloat16 and cache is None
    assert np.isfinite(np.asarray(hidden, np.float32)).all()


def test_remat_gives_same_gradients():
    _, params, config = reference("llama")
    tokens = random_tokens((1, 4))
    positions, mask = np.arange(4)[None], np.ones((1, 4), bool)

    def loss(params, config):
        hidden, _ = forward(params, config, tokens, positions, mask)
        return jnp.mean(lm_logits(params, config, hidden) ** 2)

    grad_fn = jax.jit(jax.grad(loss), static_argnums=1)
    want = grad_fn(params, dataclasses.replace(config, remat="none"))
    for remat in ("dots", "full", True):
        got = grad_fn(params, dataclasses.replace(config, remat=remat))
        assert_f32_close(got, want, ulps=GRADIENT, err_msg=str(remat))


@pytest.mark.parametrize("scan_layers", [True, False])
def test_remat_names_mean_what_they_say(scan_layers):
    """ "none" (and `remat=False`) puts no checkpoint around the layers; "dots" saves only the
    weight-matmul outputs; "full" (and True) recomputes the whole layer."""
    _, params, config = reference("llama")
    tokens = random_tokens((1, 4))
    positions, mask = np.arange(4)[None], np.ones((1, 4), bool)

    def checkpoints(remat):
        c = dataclasses.replace(config, remat=remat, scan_layers=scan_layers)
        loss = lambda p: jnp.sum(forward(p, c, tokens, positions, mask)[0])  # noqa: E731
        jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params))
        return jaxpr.count("checkpoint[") + jaxpr.count("remat2["), jaxpr

    assert dataclasses.replace(config, remat=False).remat == "none"
    assert dataclasses.replace(config, remat=True).remat == "full"
    (none, _), (dots, dots_jaxpr), (full, full_jaxpr) = map(checkpoints, ("none", "dots", "full"))
    assert none == 0 and dots > 0 and full > 0
    assert dots_jaxpr != full_jaxpr  # different policies, different residuals
    with pytest.raises(ValueError, match="remat must be one of"):
        dataclasses.replace(config, remat="some")


@pytest.mark.parametrize(
    "name, remats", [("gpt2", (False, True)), ("gpt_neox", (False,)), ("qwen3", (True,))]
)
def test_scanned_and_unrolled_layers_agree(name, remats):
    """`scan_layers` changes how the full pass runs, never what it computes: logits and
    gradients agree, with and without remat (gpt2 reads the layer index, neox has parallel
    residuals, qwen3 q/k norms)."""
    _, params, config = reference(name)
    assert not config.use_scan  # two layers: unrolled by default
    assert dataclasses.replace(config, num_layers=5).use_scan
    tokens, mask, positions = left_padded([12, 7, 1], T)

    def loss(params, config):
        hidden, _ = forward(params, config, tokens, positions, mask)
        return jnp.sum(jnp.where(mask[..., None], lm_logits(params, config, hidden), 0) ** 2)

    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    for remat in remats:
        unrolled = dataclasses.replace(config, scan_layers=False, remat=remat)
        scanned = dataclasses.replace(config, scan_layers=True, remat=remat)
        assert_f32_close(
            logits_fn(params, unrolled, tokens, positions, mask),
            logits_fn(params, scanned, tokens, positions, mask),
            ulps=MODEL,
        )
        (loss_u, grads_u), (loss_s, grads_s) = (
            value_and_grad(params, c) for c in (unrolled, scanned)
        )
        assert_f32_close(loss_u, loss_s, ulps=MODEL)
        assert_f32_close(grads_u, grads_s, ulps=GRADIENT)


@pytest.mark.parametrize(  # suite time: gpt2 in the default set, the other two with -m slow
    "name", ["gpt2", *(pytest.param(n, marks=pytest.mark.slow) for n in ("gpt_neox", "qwen3"))]
)
def test_forward_outputs_slice_equals_the_full_pass_sliced(name):
    """`forward(..., outputs=(start, length))` (the last layer computes only those positions when
    the layers are unrolled) gives the full pass's hidden states there, and the same gradients
    (gpt2: learned positions; neox: parallel residual, partial rotary; qwen3: q/k norms)."""
    _, params, config = reference(name)
    tokens, mask, positions = left_padded([12, 7, 3], T)
    start, length = 5, 6

    def hidden(params, config, outputs):
        h, _ = forward(params, config, tokens, positions, mask, outputs=outputs)
        return h if outputs else h[:, start : start + length]

    def loss(params, config, outputs):
        return jnp.sum(jnp.tanh(hidden(params, config, outputs)) ** 2)

    grad = jax.jit(jax.value_and_grad(loss), static_argnums=(1, 2))
    run = jax.jit(hidden, static_argnums=(1, 2))
    for scan in (False, True):  # the scanned path slices after the pass
        c = dataclasses.replace(config, scan_layers=scan)
        full, sliced = run(params, c, None), run(params, c, (start, length))
        assert sliced.shape == (3, length, config.hidden_size)
        assert_f32_close(sliced, full, ulps=MODEL)
    (loss_full, g_full), (loss_sliced, g_sliced) = (
        grad(params, config, o) for o in (None, (start, length))
    )
    assert_f32_close(loss_sliced, loss_full, ulps=MODEL)
    assert_f32_close(g_sliced, g_full, ulps=GRADIENT)
    with pytest.raises(ValueError, match=r"outputs=\(10, 8\) must be"):
        forward(params, config, tokens, positions, mask, outputs=(10, 8))
    cache = init_cache(config, 3, T + 1)
    with pytest.raises(ValueError, match="for full passes"):
        forward(unstack_layers(params), config, tokens, positions, mask, cache, outputs=(0, 1))


def test_cache_dtype_and_pytree():
    config = reference("qwen3")[2]
    cache = init_cache(config, 2, 8, dtype=jnp.bfloat16)
    # one [B, N, S, K] buffer per layer
    assert len(cache.k) == len(cache.v) == config.num_layers == 2
    for x in cache.k + cache.v:
        assert x.shape == (2, 2, 8, 32) and x.dtype == jnp.bfloat16
    assert cache.mask.dtype == jnp.bool_ and cache.index.dtype == jnp.int32
    leaves = jax.tree.leaves(cache)
    assert len(leaves) == 2 * 2 + 2
    assert isinstance(jax.tree.unflatten(jax.tree.structure(cache), leaves), KVCache)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(family="opt"), "family"),
        (dict(num_kv_heads=3), "num_kv_heads"),
        (dict(norm="batchnorm"), "norm"),
        (dict(activation="swish"), "activation"),
        (dict(dtype="int8"), "dtype"),
        (dict(rotary_pct=0.1), "rotary"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "yarn"),
        (dict(rope_scaling={"rope_type": "llama3", "factor": 2.0}), "missing"),
        (dict(attn_bias=True), "attn_bias"),  # mistral has no biases
        (dict(hidden_size=0), "hidden_size"),
    ],
)
def test_config_validation(change, message):
    base = dict(
        family="mistral",
        vocab_size=64,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    hash(ModelConfig(**base))
    with pytest.raises(ValueError, match=message):
        ModelConfig(**(base | change))


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # lm_head
        {"tie_embeddings": True},
        {"head": "score", "num_labels": 1},
    ],
    ids=["lm_head", "tied", "score"],
)
def test_bfloat16_heads_have_float32_outputs(overrides):
    """In bfloat16 compute the LM, tied and score heads multiply bfloat16 inputs but accumulate
    and return float32: at logits of ~16-32 a bfloat16 output would be off by up to 0.125 (half
    an ulp at 32), i.e. up to 0.125 nat per token in the log-softmax."""
    config = ModelConfig(
        family="llama",
        vocab_size=64,
        hidden_size=64,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        intermediate_size=64,
        max_position_embeddings=32,
        dtype="bfloat16",
        **overrides,
    )
    params = init_params(config, jax.random.key(0))
    hidden = jax.random.normal(jax.random.key(1), (2, 5, 64), jnp.bfloat16) * 24
    if config.head == "score":
        out, kernel = score(params, config, hidden), params["score"]["kernel"]
    else:
        out = lm_logits(params, config, hidden)
        kernel = params["embed"]["embedding"].T if config.tie_embeddings else None
        kernel = params["lm_head"]["kernel"] if kernel is None else kernel
    assert out.dtype == jnp.float32
    # bfloat16 x bfloat16 products are exact in float64; the head rounds only its float32 sum.
    h64 = np.asarray(hidden.astype(jnp.float32), np.float64)
    w64 = np.asarray(jnp.asarray(kernel).astype(jnp.bfloat16).astype(jnp.float32), np.float64)
    want = h64 @ w64
    assert np.abs(want).max() > 8  # large enough that bfloat16 outputs would be visibly off
    assert_f32_close(
        out, want, ulps=REORDERED, scale=float(np.abs(h64).max() * np.abs(w64).sum(0).max())
    )
