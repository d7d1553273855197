"""HF checkpoint interop: config mapping, load/save round trips through transformers, bad input."""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hf_utils import VOCAB_SIZE, state_dict_numpy, tiny_hf_config, tiny_hf_model, torch_logits
from safetensors.numpy import load_file, save_file

from rlhf_jax import models
from rlhf_jax import sharding as sh
from rlhf_jax.models import (
    config_from_hf,
    config_to_hf,
    hf_to_params,
    index_weights,
    load,
    params_to_hf,
    read_weights,
    save,
    value_from_reward,
)
from rlhf_jax.models.io import StoredTensor
from rlhf_jax.models.weights import LazyLeaf

# name -> (HF family, overrides): one per family plus the flags that change the export format.
VARIANTS = {
    "gpt2": ("gpt2", dict(scale_attn_by_inverse_layer_idx=True)),
    "gpt_neox": ("gpt_neox", {}),
    "gpt_neox_no_bias_scaled": (
        "gpt_neox",
        dict(attention_bias=False, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    ),
    "llama": ("llama", {}),
    "llama_bias_tied": (
        "llama",
        dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    ),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen3": ("qwen3", dict(rope_theta=1e6)),
}
HEADS = {
    "lm": transformers.AutoModelForCausalLM,
    "score": transformers.AutoModelForSequenceClassification,
}


@functools.cache
def hf_reference(name, head="lm"):
    family, overrides = VARIANTS[name]
    model = tiny_hf_model(family, head=head, **overrides)
    config = config_from_hf(model.config)
    return model, hf_to_params(state_dict_numpy(model), config), config


def tokens_mask(head):
    tokens = np.random.default_rng(0).integers(3, VOCAB_SIZE, (2, 10))
    mask = np.ones_like(tokens)
    if head == "score":  # right padding for the sequence-classification read-out
        mask[1, 6:] = 0
        tokens[1, 6:] = 0
    return tokens, mask


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


@pytest.mark.parametrize("head", ["lm", "score"])
@pytest.mark.parametrize("name", VARIANTS)
def test_config_round_trip(name, head):
    _, _, config = hf_reference(name, head)
    assert config_from_hf(config_to_hf(config)) == config
    hash(config)


@pytest.mark.parametrize("head", ["lm", "score"])
@pytest.mark.parametrize("name", VARIANTS)
def test_our_save_loads_in_transformers_with_identical_logits(name, head, tmp_path):
    model, params, config = hf_reference(name, head)
    save(params, config, tmp_path)
    reloaded, info = HEADS[head].from_pretrained(
        tmp_path, output_loading_info=True, attn_implementation="eager"
    )
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert type(reloaded) is type(model)
    tokens, mask = tokens_mask(head)
    np.testing.assert_array_equal(
        torch_logits(reloaded.eval(), tokens, mask), torch_logits(model, tokens, mask)
    )


@pytest.mark.parametrize("head", ["lm", "score"])
@pytest.mark.parametrize("name", VARIANTS)
def test_transformers_save_loads_with_identical_params(name, head, tmp_path):
    model, params, config = hf_reference(name, head)
    model.save_pretrained(tmp_path, safe_serialization=True)
    loaded, loaded_config = load(tmp_path)
    assert loaded_config == config
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(loaded))
    assert_trees_equal(loaded, params)
    # and back: the HF tensors we would write are exactly the ones transformers wrote
    written = load_file(tmp_path / "model.safetensors")
    if config.family == "gpt_neox" and "lm_head.weight" in written:  # we write the v4 name
        written["embed_out.weight"] = written.pop("lm_head.weight")
    ours = params_to_hf(loaded, config)
    assert set(ours) <= set(written)
    for key, value in ours.items():
        np.testing.assert_array_equal(value, written[key], err_msg=key)


def test_load_sharded_files_and_bfloat16_checkpoint(tmp_path):
    model, params, config = hf_reference("qwen3")
    model.to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    loaded, loaded_config = load(tmp_path)
    assert loaded_config == config
    expected = jax.tree.map(lambda x: np.asarray(x.astype(jnp.bfloat16), np.float32), params)
    assert_trees_equal(jax.tree.map(lambda x: np.asarray(x, np.float32), loaded), expected)

    loaded16, config16 = load(tmp_path, dtype="bfloat16")
    assert config16 == dataclasses.replace(config, dtype="bfloat16", param_dtype="bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(loaded16))
    # our header index reads the same tensors as the safetensors library
    ours = read_weights(tmp_path)
    library = {}
    for shard in sorted(tmp_path.glob("*.safetensors")):
        library |= load_file(shard)
    assert set(ours) == set(library)
    for key in ours:
        assert ours[key].dtype == library[key].dtype == jnp.bfloat16
        np.testing.assert_array_equal(ours[key], library[key])


def test_base_model_checkpoint_without_prefix_and_buffers():
    """Old GPT-2 checkpoints name tensors `h.0...` and carry `attn.bias` mask buffers."""
    model, params, config = hf_reference("gpt2")
    tensors = {k.removeprefix("transformer."): v for k, v in state_dict_numpy(model).items()}
    tensors["h.0.attn.bias"] = np.ones((1, 1, 64, 64), np.float32)
    tensors["h.0.attn.masked_bias"] = np.array(-1e4, np.float32)
    assert_trees_equal(hf_to_params(tensors, config), params)


def test_save_writes_tokenizer(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"t{i}": i for i in range(VOCAB_SIZE)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t3"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="t0")
    _, params, config = hf_reference("llama")
    save(params, config, tmp_path, tokenizer=tokenizer)
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded("t5 t7")["input_ids"] == [5, 7]


def test_value_from_reward():
    _, params, config = hf_reference("llama", "score")
    value, value_config = value_from_reward(params, config)
    assert value_config == config and value_config.head == "score"
    assert_trees_equal(value, params)
    assert all(v is not p for v, p in zip(jax.tree.leaves(value), jax.tree.leaves(params)))
    _, lm_params, lm_config = hf_reference("llama")
    with pytest.raises(ValueError, match="reward model"):
        value_from_reward(lm_params, lm_config)


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def llama_tensors():
    model, _, config = hf_reference("llama")
    return state_dict_numpy(model), config


def test_pickle_checkpoint_refused_unless_allowed(tmp_path):
    model, params, config = hf_reference("llama")
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="allow_pickle=True"):
        load(tmp_path)
    loaded, _ = load(tmp_path, allow_pickle=True)
    assert_trees_equal(loaded, params)


def test_missing_weights_file(tmp_path):
    hf_reference("llama")[0].config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        load(tmp_path)


@pytest.mark.parametrize(
    "architecture, message",
    [
        ("LlamaForQuestionAnswering", "LlamaForQuestionAnswering"),
        ("GPT2LMHeadModel", "GPT2LMHeadModel"),
    ],
)
def test_unknown_architecture(architecture, message):
    hf_config = tiny_hf_config("llama", architectures=[architecture])
    with pytest.raises(ValueError, match=message):
        config_from_hf(hf_config)


def test_unsupported_model_type():
    with pytest.raises(ValueError, match="'bert'"):
        config_from_hf(transformers.BertConfig())
    # sliding windows are supported (tests/test_gemma.py checks them against transformers)
    config = config_from_hf(transformers.MistralConfig(sliding_window=16))
    assert config.sliding_window == 16 and all(config.local_layers)


def test_missing_tensor_is_named(llama_tensors):
    tensors, config = llama_tensors
    tensors = dict(tensors)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        hf_to_params(tensors, config)


def test_unexpected_tensor_is_named(llama_tensors, tmp_path):
    tensors, config = llama_tensors
    tensors = dict(tensors) | {"model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)}
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config_to_hf(config).save_pretrained(tmp_path)
    with pytest.raises(
        ValueError, match="unexpected tensor 'model.layers.0.self_attn.q_proj.bias'"
    ):
        load(tmp_path)


def test_shape_mismatch_is_named(llama_tensors):
    tensors, config = llama_tensors
    tensors = dict(tensors)
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((64, 64), np.float32)
    with pytest.raises(ValueError, match="'model.layers.0.self_attn.k_proj.weight' has shape"):
        hf_to_params(tensors, config)
    bad_config = dataclasses.replace(config, intermediate_size=96)
    with pytest.raises(ValueError, match="mlp.gate_proj.weight' has shape \\(128, 64\\)"):
        hf_to_params(llama_tensors[0], bad_config)


def test_score_head_in_lm_checkpoint_is_unexpected():
    model, _, config = hf_reference("gpt2", "score")
    lm_config = dataclasses.replace(config, head="lm")
    with pytest.raises(ValueError, match="unexpected tensor 'score.weight'"):
        hf_to_params(state_dict_numpy(model), lm_config)


# ----------------------------------------------------------------------------- lazy loading

FSDP8 = sh.MeshConfig(data=1, fsdp=8, tensor=1)


def library_tensors(path):
    """Every tensor of a safetensors checkpoint, read whole by the safetensors library."""
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors |= load_file(file)
    return tensors


def save_tiny_llama(path, *, stored="float32", sharded=False, **overrides):
    model = tiny_hf_model("llama", seed=5, **overrides)
    model.to(getattr(torch, stored)).save_pretrained(
        path, max_shard_size="100KB" if sharded else "1GB"
    )
    assert (path / "model.safetensors.index.json").exists() == sharded
    return model


@pytest.mark.parametrize("on_mesh", [False, True], ids=["one_device", "fsdp8"])
@pytest.mark.parametrize(
    "stored, dtype", [("float32", None), ("float32", "bfloat16"), ("bfloat16", None)]
)
@pytest.mark.parametrize("sharded", [False, True], ids=["single_file", "sharded_files"])
def test_lazy_load_equals_eager_conversion(tmp_path, sharded, stored, dtype, on_mesh):
    """The lazy, slice-by-slice load gives exactly the eager conversion of the whole state dict
    (the same bytes and casts), with every leaf placed with its sharding."""
    save_tiny_llama(tmp_path, stored=stored, sharded=sharded)
    mesh = sh.make_mesh(FSDP8) if on_mesh else None
    params, config = load(tmp_path, dtype=dtype, mesh=mesh)
    assert config.param_dtype == (dtype or "float32")
    want = hf_to_params(library_tensors(tmp_path), config)
    assert jax.tree.structure(params) == jax.tree.structure(want)
    shardings = models.param_shardings(config, mesh) if on_mesh else None
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        w = functools.reduce(lambda t, k: t[k.key], path, want)
        assert isinstance(x, jax.Array) and x.dtype == w.dtype == config.params_dtype
        np.testing.assert_array_equal(np.asarray(x), w, err_msg=jax.tree_util.keystr(path))
        if on_mesh:
            s = functools.reduce(lambda t, k: t[k.key], path, shardings)
            assert x.sharding == s
            for shard in x.addressable_shards:
                assert shard.data.shape == s.shard_shape(x.shape)
        else:
            assert len(x.devices()) == 1
    if on_mesh:  # fsdp splits the stacked kernels along `embed`, not the layers
        q = params["layers"]["attn"]["q"]["kernel"]
        assert q.sharding.spec[:2] == (None, "fsdp")


@pytest.mark.parametrize("on_mesh", [False, True], ids=["one_device", "fsdp8"])
def test_lazy_load_never_holds_the_checkpoint_on_the_host(tmp_path, monkeypatch, on_mesh):
    """Host (NumPy) memory that loading allocates and frees again: on an fsdp=8 mesh less than
    one stacked leaf (one device's slice plus one layer's tensor at a time), on one device less
    than three (the leaf being placed, one layer, and the last leaf's buffer until the runtime
    releases it). Reading the whole state dict first, as before, peaks at twice the checkpoint.

    What stays allocated at the end is the devices' memory (the CPU runtime may keep a host
    array as a device buffer), so it is subtracted from the peak."""
    import tracemalloc

    config = models.ModelConfig(
        family="llama", vocab_size=256, hidden_size=256, num_layers=8, num_heads=4,
        num_kv_heads=4, head_dim=64, intermediate_size=1024, max_position_embeddings=64,
    )  # fmt: skip
    params = models.init_params(config, jax.random.key(0))
    save(params, config, tmp_path)
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    leaf = max(x.nbytes for x in jax.tree.leaves(params))  # a stacked mlp kernel, 8 MiB
    assert leaf <= total / 4
    mesh = sh.make_mesh(FSDP8) if on_mesh else None
    put, placed = jax.device_put, []

    def recording_put(x, *args, **kwargs):
        placed.append(np.asarray(x).nbytes)
        return put(x, *args, **kwargs)

    load(tmp_path, mesh=mesh)  # warm up (imports, caches)
    monkeypatch.setattr(jax, "device_put", recording_put)
    tracemalloc.start()
    try:
        loaded, _ = load(tmp_path, mesh=mesh)
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - kept < (leaf if on_mesh else 3 * leaf), (peak, kept, leaf, total)
    assert max(placed) == (leaf // 8 if on_mesh else leaf)  # one device's slice at a time
    assert_trees_equal(loaded, params)


def test_lazy_load_reads_only_the_layers_each_device_holds(tmp_path, monkeypatch):
    """With the layer axis sharded over 8 devices each device's slice is one layer: every
    tensor is read exactly once (non-layer tensors once for all devices that replicate them)."""
    save_tiny_llama(tmp_path, num_hidden_layers=8)
    reads = []
    read = StoredTensor.__array__

    def recording(self, *args, **kwargs):
        reads.append(self.name)
        return read(self, *args, **kwargs)

    monkeypatch.setattr(StoredTensor, "__array__", recording)
    rules = sh.make_rules({"layers": "fsdp", "embed": None})
    params, config = load(tmp_path, mesh=sh.make_mesh(FSDP8), rules=rules)
    assert params["layers"]["mlp"]["up"]["kernel"].sharding.spec[0] == "fsdp"
    assert sorted(reads) == sorted(library_tensors(tmp_path))
    assert_trees_equal(params, hf_to_params(library_tensors(tmp_path), config))


def test_lazy_leaf_indexing(tmp_path):
    save_tiny_llama(tmp_path, stored="bfloat16")
    config = config_from_hf(transformers.AutoConfig.from_pretrained(tmp_path))
    lazy = hf_to_params(index_weights(tmp_path), config, lazy=True)
    want = hf_to_params(library_tensors(tmp_path), config)
    kernel, embed = lazy["layers"]["attn"]["q"]["kernel"], lazy["embed"]["embedding"]
    assert isinstance(kernel, LazyLeaf) and kernel.dtype == np.float32
    assert kernel.shape == want["layers"]["attn"]["q"]["kernel"].shape and kernel.ndim == 4
    for x, w in [
        (kernel, want["layers"]["attn"]["q"]["kernel"]),
        (embed, want["embed"]["embedding"]),
    ]:
        for index in [
            (),
            0,
            -1,
            (slice(None), slice(8, 24)),
            (slice(1, None), ..., slice(0, 16, 2)),
            (..., 3),
            np.int64(1),
            ([1, 0],),
        ]:
            np.testing.assert_array_equal(x[index], w[index], err_msg=str(index))
        np.testing.assert_array_equal(np.asarray(x), w)
        np.testing.assert_array_equal(np.asarray(x, np.float64), w.astype(np.float64))


@pytest.mark.parametrize(
    "change, message",
    [
        ("missing", "missing tensor 'model.layers.1.mlp.up_proj.weight'"),
        ("unexpected", "unexpected tensor 'model.layers.0.self_attn.q_proj.bias'"),
        ("shape", "'model.layers.0.self_attn.k_proj.weight' has shape \\(64, 64\\)"),
    ],
)
def test_lazy_load_errors_name_the_tensor_before_reading_any(
    tmp_path, monkeypatch, change, message
):
    save_tiny_llama(tmp_path, sharded=True)
    tensors = library_tensors(tmp_path)
    if change == "missing":
        del tensors["model.layers.1.mlp.up_proj.weight"]
    elif change == "unexpected":
        tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
    else:
        tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((64, 64), np.float32)
    for file in tmp_path.glob("model*.safetensors*"):
        file.unlink()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})

    def no_reads(self, *args, **kwargs):
        raise AssertionError(f"read {self.name} before checking names and shapes")

    monkeypatch.setattr(StoredTensor, "__array__", no_reads)
    with pytest.raises(ValueError, match=message):
        load(tmp_path, mesh=sh.make_mesh(FSDP8))


def test_truncated_checkpoint_is_named(tmp_path):
    save_tiny_llama(tmp_path)
    file = tmp_path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        load(tmp_path)


def test_unsupported_dtype_is_named(tmp_path):
    save_tiny_llama(tmp_path)
    file = tmp_path / "model.safetensors"
    data = file.read_bytes()
    n = int(np.frombuffer(data[:8], "<u8")[0])
    header = json.loads(data[8 : 8 + n])
    header["model.norm.weight"]["dtype"] = "F4"
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    file.write_bytes(np.uint64(len(text)).tobytes() + text + data[8 + n :])
    with pytest.raises(ValueError, match="'model.norm.weight' in .* unsupported dtype F4"):
        load(tmp_path)
