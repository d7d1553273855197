"""Gemma 2, Gemma 3 and sliding-window attention (Mistral, Qwen2) against transformers' PyTorch
models on tiny random weights: logits with left padding, cached decode past the window, greedy
generation, score heads, HF export both ways, a PPO and a GRPO iteration, and bad input."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hf_utils import EOS_ID, PAD_ID, VOCAB_SIZE, randomize_, state_dict_numpy, torch_logits
from safetensors.numpy import load_file
from tolerances import MODEL, assert_f32_close, tolerance

import rlhf_jax as rj
from rlhf_jax import models
from rlhf_jax.models import (
    ModelConfig,
    config_from_hf,
    config_to_hf,
    forward,
    hf_to_params,
    init_cache,
    lm_logits,
    load,
    params_to_hf,
    save,
)
from rlhf_jax.sampling import SamplingConfig, generate

WINDOW = 4  # shorter than every sequence below, so every test runs past it
_SIZES = dict(
    vocab_size=VOCAB_SIZE,
    pad_token_id=PAD_ID,
    bos_token_id=1,
    eos_token_id=EOS_ID,
    num_labels=1,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=128,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
)
_GEMMA = dict(
    query_pre_attn_scalar=24, sliding_window=WINDOW, hidden_activation="gelu_pytorch_tanh"
)
# name -> (HF model_type, overrides). Two layers: sliding then full (Gemma), full then sliding
# (Qwen2's max_window_layers=1), or both sliding (Mistral).
VARIANTS = {
    "gemma2": (
        "gemma2",
        _GEMMA
        | dict(
            attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0,
            attention_bias=True,
            rope_theta=500.0,
        ),
    ),
    "gemma3": (
        "gemma3_text",
        _GEMMA
        | dict(
            sliding_window_pattern=2,
            rope_theta=500.0,
            rope_scaling={"rope_type": "linear", "factor": 2.0},
            rope_local_base_freq=50.0,
            final_logit_softcapping=3.0,
            tie_word_embeddings=False,
        ),
    ),
    "mistral": ("mistral", dict(sliding_window=WINDOW, tie_word_embeddings=False)),
    "qwen2": (
        "qwen2",
        dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    ),
}
# Qwen3 slides like Qwen2 (the same transformers code): checked for logits only.
LOGIT_VARIANTS = {
    **VARIANTS,
    "qwen3": ("qwen3", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
}
HEADS = {
    "lm": transformers.AutoModelForCausalLM,
    "score": transformers.AutoModelForSequenceClassification,
}


def hf_model(hf_config, head="lm", seed=0):
    """Random float32 torch model in eval mode with eager attention."""
    torch.manual_seed(seed)
    model = HEADS[head].from_config(hf_config, attn_implementation="eager", dtype=torch.float32)
    model.config.architectures = [type(model).__name__]
    randomize_(model, seed)
    return model.eval()


@functools.cache
def reference(name, head="lm"):
    """(torch model, our params, our config) for a variant."""
    model_type, overrides = LOGIT_VARIANTS[name]
    model = hf_model(transformers.AutoConfig.for_model(model_type, **_SIZES, **overrides), head)
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


jit_generate = jax.jit(generate, static_argnums=(1, 5))
sequence_scores_fn = jax.jit(models.sequence_scores, static_argnums=1)


def left_padded(lengths, t, seed=0):
    """Tokens, mask and exclusive-cumsum positions of left-padded rows of the given lengths."""
    mask = np.arange(t)[None, :] >= t - np.asarray(lengths)[:, None]
    tokens = np.where(mask, np.random.default_rng(seed).integers(3, VOCAB_SIZE, mask.shape), PAD_ID)
    return tokens, mask, np.cumsum(mask, axis=1) - mask


B, T = 3, 12


def test_configs_carry_the_layer_pattern():
    expect = {
        "gemma2": (True, False),
        "gemma3": (True, False),
        "mistral": (True, True),
        "qwen2": (False, True),
    }
    for name, local in expect.items():
        config = reference(name)[2]
        assert config.local_layers == local and config.sliding_window == WINDOW, name
    gemma3 = reference("gemma3")[2]
    assert (gemma3.rope_theta, gemma3.rope_local_theta) == (500.0, 50.0)
    assert dict(gemma3.rope_scaling) == {"rope_type": "linear", "factor": 2.0}
    assert gemma3.attn_logit_softcap is None and gemma3.final_logit_softcap == 3.0
    assert reference("gemma2")[2].attn_logit_softcap == 5.0


@pytest.mark.parametrize("name", LOGIT_VARIANTS)
def test_left_padded_logits_match_torch_scanned_and_unrolled(name):
    """Real positions of a left-padded batch get transformers' logits, with the layers unrolled
    and, where sliding and full layers mix, as one `nn.scan` (the pattern is scanned data)."""
    model, params, config = reference(name)
    tokens, mask, positions = left_padded([12, 7, 3], T)
    want = torch_logits(model, tokens, mask, positions)[mask]
    assert not config.use_scan  # two layers: unrolled by default
    mixed = len(set(config.local_layers)) == 2
    for c in (config, dataclasses.replace(config, scan_layers=True))[: 1 + mixed]:
        ours = np.asarray(logits_fn(params, c, tokens, positions, mask))
        assert np.isfinite(ours).all()
        assert_f32_close(ours[mask], want, ulps=MODEL, err_msg=f"{name} scan={c.use_scan}")


def test_the_window_changes_the_logits():
    """Guards the tests above: without the window the logits move far outside the budget."""
    model, params, config = reference("qwen2")
    tokens, mask, positions = left_padded([12, 7, 3], T)
    unwindowed = dataclasses.replace(config, sliding_window=None, layer_types=None)
    ours = np.asarray(logits_fn(params, unwindowed, tokens, positions, mask))
    want = torch_logits(model, tokens, mask, positions)
    assert np.abs(ours - want)[mask].max() > 100 * tolerance(want[mask], MODEL)


@pytest.mark.parametrize("name", VARIANTS)
def test_prefill_and_decode_past_the_window_match_full_pass(name):
    _, params, config = reference(name)
    prompt_len, steps = 8, 4
    prompt, prompt_mask, _ = left_padded([8, 5, 2], prompt_len, seed=1)
    new_tokens = np.random.default_rng(2).integers(3, VOCAB_SIZE, (B, steps))
    new_mask = np.ones((B, steps), bool)
    new_mask[2, 1] = False  # a pad between real tokens (a finished row): not counted in the window
    tokens = np.concatenate([prompt, new_tokens], axis=1)
    mask = np.concatenate([prompt_mask, new_mask], axis=1)
    positions = np.cumsum(mask, axis=1) - mask
    full = np.asarray(logits_fn(params, config, tokens, positions, mask))

    cache = init_cache(config, B, T + 1)
    sl = slice(0, prompt_len)
    logits, cache = cached_logits_fn(
        params, config, tokens[:, sl], positions[:, sl], mask[:, sl], cache
    )
    real = mask[:, sl]
    assert_f32_close(np.asarray(logits)[real], full[:, sl][real], ulps=MODEL, err_msg="prefill")
    for i in range(prompt_len, T):
        sl = slice(i, i + 1)
        logits, cache = cached_logits_fn(
            params, config, tokens[:, sl], positions[:, sl], mask[:, sl], cache
        )
        real = mask[:, i]
        assert_f32_close(np.asarray(logits)[real, 0], full[real, i], ulps=MODEL, err_msg=f"{i}")
    assert int(cache.index) == T


def hf_greedy(model, tokens, mask, new_tokens):
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.as_tensor(tokens),
            attention_mask=torch.as_tensor(mask.astype(np.int64)),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=PAD_ID,
            eos_token_id=None,
        )
    return out[:, tokens.shape[1] :].numpy()


@pytest.mark.parametrize("name", VARIANTS)
def test_greedy_generation_matches_transformers(name):
    """Prefill and a chunked decode (the cache grows between chunks) past the window give
    transformers' greedy tokens (its own sliding-window cache)."""
    model, params, config = reference(name)
    tokens, mask, _ = left_padded([7, 4, 2], 7, seed=4)
    sampling = SamplingConfig(max_new_tokens=10, greedy=True, decode_chunks=2)
    out = jit_generate(params, config, tokens, mask, jax.random.key(0), sampling)
    np.testing.assert_array_equal(out.tokens, hf_greedy(model, tokens, mask, 10))


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_score_head_matches_torch_sequence_classification(name):
    model, params, config = reference(name, head="score")
    assert config.head == "score" and config.num_labels == 1
    assert type(model).__name__ == config_to_hf(config).architectures[0]
    lengths = [12, 9, 4]
    mask = np.arange(T)[None, :] < np.asarray(lengths)[:, None]  # right padding
    tokens = np.where(mask, np.random.default_rng(3).integers(3, VOCAB_SIZE, (B, T)), PAD_ID)
    positions = np.cumsum(mask, axis=1) - mask
    ours = sequence_scores_fn(params, config, tokens, positions, mask)
    assert_f32_close(ours, torch_logits(model, tokens, mask), ulps=MODEL)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize(
    "name, head", [(n, "lm") for n in VARIANTS] + [("gemma2", "score"), ("gemma3", "score")]
)
def test_export_round_trips_through_transformers(name, head, tmp_path):
    model, params, config = reference(name, head)
    assert config_from_hf(config_to_hf(config)) == config
    # ours -> transformers: the same class, no key warnings, identical logits
    save(params, config, tmp_path / "ours")
    reloaded, info = HEADS[head].from_pretrained(
        tmp_path / "ours", output_loading_info=True, attn_implementation="eager"
    )
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert type(reloaded) is type(model)
    tokens, mask, positions = left_padded([10, 6], 10, seed=5)
    np.testing.assert_array_equal(
        torch_logits(reloaded.eval(), tokens, mask, positions),
        torch_logits(model, tokens, mask, positions),
    )
    # transformers -> ours: the same config and params, and the same tensors written back
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    loaded, loaded_config = load(tmp_path / "hf")
    assert loaded_config == config
    assert_trees_equal(loaded, params)
    written = load_file(tmp_path / "hf" / "model.safetensors")
    for key, value in params_to_hf(loaded, config).items():
        np.testing.assert_array_equal(value, written[key], err_msg=key)


def tiny_gemma3_multimodal(head):
    """A tiny Gemma3ForConditionalGeneration / Gemma3ForSequenceClassification (vision tower of
    one layer); its text config asks for final soft-capping, which transformers' multimodal LM
    does not apply."""
    _, overrides = VARIANTS["gemma3"]
    text = _SIZES | overrides | dict(final_logit_softcapping=3.0)
    text = {k: v for k, v in text.items() if k not in ("num_labels", "tie_word_embeddings")}
    vision = dict(
        model_type="siglip_vision_model",
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    hf_config = transformers.Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=1,
        image_token_index=VOCAB_SIZE - 1,
        boi_token_index=VOCAB_SIZE - 3,
        eoi_token_index=VOCAB_SIZE - 2,
        num_labels=1,
    )
    cls = {
        "lm": transformers.Gemma3ForConditionalGeneration,
        "score": transformers.Gemma3ForSequenceClassification,
    }[head]
    torch.manual_seed(0)
    model = cls._from_config(hf_config, attn_implementation="eager", dtype=torch.float32)
    model.config.architectures = [cls.__name__]
    randomize_(model, 0)
    return model.eval()


@pytest.mark.parametrize("head", ["lm", "score"])
def test_gemma3_multimodal_checkpoint_loads_its_text_decoder(head, tmp_path):
    model = tiny_gemma3_multimodal(head)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    params, config = load(tmp_path / "hf")  # the vision tower and projector are skipped
    assert config.family == "gemma3" and config.head == head and config.tie_embeddings
    if head == "lm":  # as transformers' Gemma3ForConditionalGeneration: no final soft-capping
        assert config.final_logit_softcap is None
    tokens, mask, positions = left_padded([10, 6], 10, seed=6)
    hidden, _ = jax.jit(forward, static_argnums=1)(params, config, tokens, positions, mask)
    if head == "lm":
        ours = np.asarray(jax.jit(lm_logits, static_argnums=1)(params, config, hidden))
        want = torch_logits(model, tokens, mask, positions)
        assert_f32_close(ours[mask], want[mask], ulps=MODEL)
    else:
        ours = jax.jit(models.score, static_argnums=1)(params, config, hidden)[:, -1]
        assert_f32_close(ours, torch_logits(model, tokens, mask, positions), ulps=MODEL)
    # the transformers 5 in-memory names load too
    state = state_dict_numpy(model)
    assert any(k.startswith("model.language_model.") for k in state)
    assert_trees_equal(hf_to_params(state, config), params)
    # exported as the text decoder, which transformers runs to the same logits
    save(params, config, tmp_path / "ours")
    text_model = HEADS[head].from_pretrained(tmp_path / "ours", attn_implementation="eager")
    assert type(text_model).__name__ == (
        "Gemma3ForCausalLM" if head == "lm" else "Gemma3TextForSequenceClassification"
    )
    assert_f32_close(
        torch_logits(text_model.eval(), tokens, mask, positions),
        torch_logits(model, tokens, mask, positions),
        ulps=MODEL,
    )


# ----------------------------------------------------------------------- RL on a tiny Gemma 2

TINY = ModelConfig(
    family="gemma2",
    vocab_size=64,
    hidden_size=32,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    head_dim=16,
    intermediate_size=64,
    max_position_embeddings=64,
    activation="gelu_pytorch_tanh",
    tie_embeddings=True,
    norm_plus_one=True,
    post_norms=True,
    embed_scale=True,
    query_pre_attn_scalar=16,
    attn_logit_softcap=50.0,
    final_logit_softcap=30.0,
    sliding_window=4,
    layer_types=("sliding_attention", "full_attention"),
    scan_layers=True,  # training steps scan over the two kinds of layers
)
TINY_RM = dataclasses.replace(TINY, head="score")


def tiny_prompts(n):
    rng = np.random.default_rng(3)
    mask = np.ones((n, 6), bool)
    mask[0, :3] = False  # one left-padded prompt
    return np.where(mask, rng.integers(3, TINY.vocab_size, (n, 6)), PAD_ID).astype(np.int32), mask


def test_ppo_iteration_on_a_tiny_gemma2_policy_and_reward_model():
    policy = models.init_params(TINY, jax.random.key(0))
    reward = models.init_params(TINY_RM, jax.random.key(1))
    assert float(jnp.abs(policy["final_norm"]["scale"]).max()) == 0.0  # stored as weight - 1
    config = rj.PPOConfig(
        batch_size=4, response_length=6, stop_token_ids=(EOS_ID,), num_ppo_epochs=1
    )
    state = rj.init_state(policy, config, value_params=reward)
    step = rj.jit_iteration(config, rj.RLModels(policy=TINY, value=TINY_RM, reward=TINY_RM))
    prompts, mask = tiny_prompts(4)
    frozen = rj.FrozenParams(ref=policy, reward=reward)
    state, metrics = step(state, frozen, prompts, mask, jax.random.key(0))
    rj.check_finite(metrics, 0)
    assert int(state.iteration) == 1 and all(np.isfinite(np.asarray(v)) for v in metrics.values())


def test_grpo_iteration_on_a_tiny_gemma2_policy_and_reward_model():
    policy = models.init_params(TINY, jax.random.key(0))
    reward = models.init_params(TINY_RM, jax.random.key(1))
    config = rj.GRPOConfig(
        num_prompts=2, num_generations=2, response_length=6, stop_token_ids=(EOS_ID,), beta=0.1
    )
    step = rj.jit_iteration(config, rj.RLModels(policy=TINY, reward=TINY_RM))
    prompts, mask = tiny_prompts(2)
    frozen = rj.FrozenParams(ref=policy, reward=reward)
    state, metrics = step(rj.init_state(policy, config), frozen, prompts, mask, jax.random.key(0))
    rj.check_finite(metrics, 0)
    assert int(state.iteration) == 1 and all(np.isfinite(np.asarray(v)) for v in metrics.values())


# ------------------------------------------------------------------------------- bad input

_GEMMA2_FIELDS = {f.name: getattr(TINY, f.name) for f in dataclasses.fields(TINY)}


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(layer_types=("sliding_attention", "chunked_attention")), r"layer_types\[1\]"),
        (dict(layer_types=("full_attention",)), "layer_types has 1 entries for 2 layers"),
        (dict(sliding_window=None), "sliding_window is None"),
        (dict(sliding_window=0), "sliding_window must be a positive int"),
        (dict(family="llama"), "norm_plus_one=True cannot be expressed"),
        (dict(norm_plus_one=False), "norm_plus_one"),
        (dict(query_pre_attn_scalar=None), "query_pre_attn_scalar is required"),
        (dict(final_logit_softcap=0.0), "final_logit_softcap must be > 0"),
        (dict(family="gemma3", qk_norm=True), "attn_logit_softcap"),
        (dict(family="gemma3", qk_norm=True, attn_logit_softcap=None), "rope_local_theta"),
        (dict(rope_local_theta=1e4), "rope_local_theta"),
    ],
)
def test_gemma_config_validation(change, message):
    hash(ModelConfig(**_GEMMA2_FIELDS))
    with pytest.raises(ValueError, match=message):
        ModelConfig(**(_GEMMA2_FIELDS | change))


def test_windows_only_where_the_family_can_express_them():
    llama = dict(
        vocab_size=64,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    with pytest.raises(ValueError, match="sliding_window=4 cannot be expressed"):
        ModelConfig(family="llama", sliding_window=4, **llama)
    with pytest.raises(ValueError, match="layer_types=.* cannot be expressed"):
        ModelConfig(
            family="mistral",
            sliding_window=4,
            layer_types=("full_attention", "sliding_attention"),
            **llama,
        )
    with pytest.raises(ValueError, match="final_logit_softcap=30.0 cannot be expressed"):
        ModelConfig(family="qwen3", final_logit_softcap=30.0, **llama)
    qwen3 = ModelConfig(family="qwen3", qk_norm=True, sliding_window=4, **llama)  # as Qwen2
    assert config_from_hf(config_to_hf(qwen3)) == qwen3 and qwen3.local_layers == (True, True)


def hf_config(name, **overrides):
    model_type, base = VARIANTS[name]
    return transformers.AutoConfig.for_model(model_type, **(_SIZES | base | overrides))


def test_unsupported_hf_fields_are_named():
    layer_types = ["full_attention", "chunked_attention"]
    with pytest.raises(ValueError, match=r"qwen2: layer_types\[1\]='chunked_attention'"):
        config_from_hf(hf_config("qwen2", layer_types=layer_types))
    local_linear = {
        "full_attention": {"rope_type": "default", "rope_theta": 500.0},
        "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 50.0},
    }
    with pytest.raises(ValueError, match=r"rope_parameters\['sliding_attention'\].*'linear'"):
        config_from_hf(hf_config("gemma3", rope_scaling=None, rope_parameters=local_linear))
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        config_from_hf(hf_config("gemma3", use_bidirectional_attention=True))
    yarn = {"rope_type": "yarn", "factor": 2.0, "rope_theta": 500.0}
    with pytest.raises(ValueError, match="rope_scaling type 'yarn' is not supported"):
        config_from_hf(hf_config("gemma2", rope_theta=None, rope_parameters=yarn))
    with pytest.raises(ValueError, match="'Gemma2ForTokenClassification'"):
        config_from_hf(hf_config("gemma2", architectures=["Gemma2ForTokenClassification"]))
