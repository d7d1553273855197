"""LoRA in the model layer against transformers + peft on random weights (A and B non-zero)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from hf_utils import VOCAB_SIZE, state_dict_numpy, tiny_hf_model, torch_logits
from tolerances import GRADIENT, MODEL, assert_f32_close

from rlhf_jax import models
from rlhf_jax.models import lora

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tokens(seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, VOCAB_SIZE, (3, 10))
    mask = np.ones_like(tokens)
    mask[1, :3] = 0  # left padding
    tokens[1, :3] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return tokens, mask, positions


def _ours(params, config, tokens, mask, positions):
    hidden, _ = models.forward(params, config, jnp.asarray(tokens), positions, jnp.asarray(mask))
    if config.head == "lm":
        return np.asarray(models.lm_logits(params, config, hidden))
    return np.asarray(models.score(params, config, hidden))


def _peft_model(family: str, head: str = "lm", r: int = 4, alpha: float = 12.0, **kwargs):
    """A random tiny HF model, its base state dict and the peft model with random A and B."""
    model = tiny_hf_model(family, head)
    base = state_dict_numpy(model)
    task = "CAUSAL_LM" if head == "lm" else "SEQ_CLS"
    lora_config = peft.LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=TARGETS,
        init_lora_weights=False,  # random B as well: a zero B would hide a wrong layout
        task_type=task,
        **kwargs,
    )
    torch.manual_seed(1)
    return peft.get_peft_model(model, lora_config).eval(), base


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_forward_equals_peft(family):
    peft_model, base_tensors = _peft_model(family)
    config = models.config_from_hf(peft_model.base_model.model.config)
    base = models.hf_to_params(base_tensors, config)
    adapter_tensors = {
        k: v.detach().numpy() for k, v in peft.get_peft_model_state_dict(peft_model).items()
    }
    adapters, lora_config = lora.adapter_from_peft(
        adapter_tensors, peft_model.peft_config["default"].to_dict(), config
    )
    assert lora_config.lora.rank == 4 and lora_config.lora.scale == 3.0
    params = lora.join(adapters, base)
    tokens, mask, positions = _tokens()
    want = torch_logits(peft_model, tokens, mask, positions)
    got = _ours(params, lora_config, tokens, mask, positions)
    real = mask.astype(bool)
    assert_f32_close(got[real], want[real], ulps=MODEL)
    # The adapters matter: the base model's logits differ by far more than the tolerance.
    plain = _ours(base, config, tokens, mask, positions)
    assert np.max(np.abs(plain[real] - want[real])) > 1e-2
    # lora.base(params) is the base model; merge folds the adapters into the kernels.
    np.testing.assert_array_equal(
        _ours(lora.base(params), lora_config, tokens, mask, positions), plain
    )
    merged = lora.merge(params, lora_config)
    assert not lora.has_adapters(merged)
    assert_f32_close(_ours(merged, config, tokens, mask, positions)[real], want[real], ulps=MODEL)


def test_score_model_adapter_trains_its_head_and_equals_peft():
    peft_model, base_tensors = _peft_model("llama", head="score")
    config = models.config_from_hf(peft_model.base_model.model.config)
    base = models.hf_to_params(base_tensors, config)
    with torch.no_grad():  # a trained head differs from the base's
        head = peft_model.base_model.model.score.modules_to_save["default"]
        head.weight.add_(0.5)
    adapter_tensors = {
        k: v.detach().numpy() for k, v in peft.get_peft_model_state_dict(peft_model).items()
    }
    adapters, lora_config = lora.adapter_from_peft(
        adapter_tensors, peft_model.peft_config["default"].to_dict(), config
    )
    assert "score" in adapters
    params = lora.join(adapters, base)
    tokens, mask, positions = _tokens()
    with torch.no_grad():
        want = peft_model(
            input_ids=torch.as_tensor(tokens), attention_mask=torch.as_tensor(mask)
        ).logits.numpy()
    hidden, _ = models.forward(params, lora_config, jnp.asarray(tokens), positions, mask)
    got = np.asarray(models.score(params, lora_config, hidden))[:, -1]
    assert_f32_close(got, want, ulps=MODEL)
    trainable, frozen = lora.split(params, lora_config.lora)
    assert set(trainable) == {"layers", "score"}
    assert "score" not in frozen


def _random_lora_params(family="llama", seed=0, **lora_kwargs):
    model = tiny_hf_model(family)
    config = models.config_from_hf(model.config)
    config = dataclasses.replace(config, lora=lora.LoRAConfig(rank=4, alpha=8.0, **lora_kwargs))
    params = models.init_params(config, jax.random.key(seed))
    base = models.hf_to_params(state_dict_numpy(model), dataclasses.replace(config, lora=None))
    trainable, _ = lora.split(params, config.lora)
    trainable = jax.tree.map(  # non-zero B
        lambda x: x + 0.05 * jax.random.normal(jax.random.key(seed + 1), x.shape), trainable
    )
    return model, lora.join(trainable, base), config


def test_exported_adapter_loads_in_peft_with_the_same_logits(tmp_path):
    model, params, config = _random_lora_params()
    base_config = dataclasses.replace(config, lora=None)
    models.save(lora.base(params), base_config, tmp_path / "base")
    lora.save_peft(tmp_path / "adapter", params, config, base_model_name_or_path="base")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    loaded = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    tokens, mask, positions = _tokens(1)
    want = _ours(params, config, tokens, mask, positions)
    got = torch_logits(loaded, tokens, mask, positions)
    real = mask.astype(bool)
    assert_f32_close(got[real], want[real], ulps=MODEL)
    # ... and back: our loader gives the same adapters.
    adapters, loaded_config = lora.load_peft(tmp_path / "adapter", base_config)
    assert loaded_config == config
    assert_f32_close(adapters, lora.split(params, config.lora)[0], ulps=1)


def test_fresh_adapters_leave_the_model_unchanged_and_cached_decode_applies_them():
    model, params, config = _random_lora_params()
    base_config = dataclasses.replace(config, lora=None)
    fresh = models.init_params(config, jax.random.key(3))
    a = fresh["layers"]["attn"]["q"]["lora_a"]
    assert a.dtype == jnp.float32 and float(jnp.abs(a).max()) > 0
    assert not np.any(np.asarray(fresh["layers"]["attn"]["q"]["lora_b"]))
    tokens, mask, positions = _tokens(2)
    plain = _ours(lora.base(fresh), base_config, tokens, mask, positions)
    np.testing.assert_array_equal(_ours(fresh, config, tokens, mask, positions), plain)
    # The cached pass (prefill then decode) applies the adapters like the full pass.
    full = _ours(params, config, tokens, mask, positions)
    cache = models.init_cache(config, 3, 10)
    unstacked = models.unstack_layers(params)
    hidden, cache = models.forward(
        unstacked, config, tokens[:, :7], positions[:, :7], mask[:, :7], cache
    )
    steps = [hidden]
    for t in range(7, 10):
        h, cache = models.forward(
            unstacked,
            config,
            tokens[:, t : t + 1],
            positions[:, t : t + 1],
            mask[:, t : t + 1],
            cache,
        )
        steps.append(h)
    cached = np.asarray(models.lm_logits(params, config, jnp.concatenate(steps, axis=1)))
    real = mask.astype(bool)
    assert_f32_close(cached[real], full[real], ulps=MODEL)


def test_gradients_reach_only_the_trainable_half():
    _, params, config = _random_lora_params(train_modules=("lm_head",))
    trainable, frozen = lora.split(params, config.lora)
    assert set(trainable) == {"layers", "lm_head"} and "embed" in frozen
    tokens, mask, positions = _tokens()

    def loss(t):
        p = lora.join(t, frozen)
        hidden, _ = models.forward(p, config, jnp.asarray(tokens), positions, jnp.asarray(mask))
        return jnp.mean(models.lm_logits(p, config, hidden) ** 2)

    grads = jax.grad(loss)(trainable)
    assert jax.tree.structure(grads) == jax.tree.structure(trainable)
    for leaf in jax.tree.leaves(grads):
        assert float(jnp.abs(leaf).max()) > 0
    # The adapter gradient equals the gradient of the merged kernel pulled back through A B.
    a = trainable["layers"]["mlp"]["down"]["lora_a"]
    b = trainable["layers"]["mlp"]["down"]["lora_b"]

    def loss_kernel(kernel):
        p = lora.merge(lora.join(trainable, frozen), config)  # every other adapter folded in
        p["layers"]["mlp"]["down"] = dict(p["layers"]["mlp"]["down"], kernel=kernel)
        base_config = dataclasses.replace(config, lora=None)
        hidden, _ = models.forward(
            p, base_config, jnp.asarray(tokens), positions, jnp.asarray(mask)
        )
        return jnp.mean(models.lm_logits(p, base_config, hidden) ** 2)

    kernel = frozen["layers"]["mlp"]["down"]["kernel"] + config.lora.scale * lora.delta(a, b)
    g_kernel = jax.grad(loss_kernel)(kernel)  # [L, F, D]
    want_b = config.lora.scale * jnp.einsum("lfr,lfd->lrd", a, g_kernel)
    assert_f32_close(grads["layers"]["mlp"]["down"]["lora_b"], want_b, ulps=GRADIENT)


def test_bad_lora_configs_are_clear_errors():
    with pytest.raises(ValueError, match="unknown module 'qkv'"):
        lora.LoRAConfig(targets=("qkv",))
    with pytest.raises(ValueError, match="positive integer"):
        lora.LoRAConfig(rank=0)
    with pytest.raises(ValueError, match="only 0"):
        lora.LoRAConfig(dropout=0.1)
    with pytest.raises(ValueError, match="unknown module 'norm'"):
        lora.LoRAConfig(train_modules=("norm",))
    gpt2 = models.config_from_hf(tiny_hf_model("gpt2").config)
    with pytest.raises(ValueError, match="fuses them"):
        dataclasses.replace(gpt2, lora=lora.LoRAConfig())
    assert lora.LoRAConfig(targets=("v", "q_proj")).targets == ("q", "v")


def test_adapter_of_another_base_is_refused(tmp_path):
    _, params, config = _random_lora_params()
    lora.save_peft(tmp_path / "adapter", params, config, base_model_name_or_path="x")
    other = tiny_hf_model("llama", intermediate_size=96)
    other_config = models.config_from_hf(other.config)
    with pytest.raises(ValueError, match="different base model"):
        lora.load_peft(tmp_path / "adapter", other_config)
    with pytest.raises(ValueError, match="not a peft adapter"):
        lora.load_peft(tmp_path, other_config)
