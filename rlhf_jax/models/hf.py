"""Hugging Face interop: safetensors load/save, per-tensor weight conversion (config mapping:
`hf_config`).

Weight names. HF `<p>` is `transformer` (GPT-2), `gpt_neox` (NeoX) or `model` (others); `i` is the
layer, whose params we stack on a leading layer axis. Norm `scale`/`bias` are HF `weight`/`bias`;
kernels are HF `weight` transposed (torch Linear is [out, in]; GPT-2 Conv1D is already [in, out])
and split per head; fused q/k/v tensors are split at load and re-fused at save.

    ours                    llama/mistral/qwen2/qwen3   gpt2           gpt_neox
    embed/embedding         <p>.embed_tokens            <p>.wte        <p>.embed_in
    pos_embed/embedding     -                           <p>.wpe        -
    layers/attn_norm        ..input_layernorm           ..ln_1         ..input_layernorm
    layers/attn/{q,k,v}     ..self_attn.{q,k,v}_proj    ..attn.c_attn  ..attention.query_key_value
    layers/attn/o           ..self_attn.o_proj          ..attn.c_proj  ..attention.dense
    layers/attn/{q,k}_norm  ..self_attn.{q,k}_norm      -              -
    layers/mlp_norm         ..post_attention_layernorm  ..ln_2         ..post_attention_layernorm
    layers/mlp/gate         ..mlp.gate_proj             -              -
    layers/mlp/up           ..mlp.up_proj               ..mlp.c_fc     ..mlp.dense_h_to_4h
    layers/mlp/down         ..mlp.down_proj             ..mlp.c_proj   ..mlp.dense_4h_to_h
    final_norm              <p>.norm                    <p>.ln_f       <p>.final_layer_norm
    lm_head/kernel          lm_head                     lm_head        embed_out (or lm_head)
    score/kernel            score                       score          score

`..` is `<p>.layers.i.` (`<p>.h.i.` for GPT-2).
GPT-2 `c_attn` is [D, 3D] = [q | k | v]; NeoX `query_key_value` rows are per head [q_h, k_h, v_h].
Gemma 2/3 name their norms differently (and store them as `weight - 1`, like our scales):

    layers/attn_norm        ..input_layernorm           layers/mlp_norm  ..pre_feedforward_layernorm
    layers/attn_post_norm   ..post_attention_layernorm  layers/mlp_post_norm
                                                                         ..post_feedforward_layernorm

Gemma 3 multimodal checkpoints hold the text decoder under `model.language_model.`
(transformers 5) or `language_model.model.` (4), read as `model.`; their vision tower and
projector are ignored.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.hf_config import config_from_hf, config_to_hf
from rlhf_jax.models.model import Params, init_params

_PREFIX = {
    "gpt2": "transformer",
    "gpt_neox": "gpt_neox",
    "llama": "model",
    "mistral": "model",
    "qwen2": "model",
    "qwen3": "model",
    "gemma2": "model",
    "gemma3": "model",
}
# Buffers some checkpoints carry (causal-mask and rotary caches); transformers ignores them too.
_IGNORED = re.compile(r"(\.attn\.(bias|masked_bias)|\.attention\.(bias|masked_bias)|\.inv_freq)$")


# ----------------------------------------------------------------------------- weights


@dataclasses.dataclass(frozen=True)
class _Spec:
    """One HF tensor <-> one or more param leaves (per layer when `hf` contains `{i}`)."""

    hf: str
    paths: tuple[tuple[str, ...], ...]
    to_params: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_hf: Callable[..., np.ndarray]


def _same(path: tuple[str, ...], hf: str) -> _Spec:
    return _Spec(hf, (path,), lambda w: (w,), lambda p: p)


def _transposed(path: tuple[str, ...], hf: str) -> _Spec:
    return _Spec(hf, (path,), lambda w: (w.T,), lambda p: p.T)


def _linear_in(path: tuple[str, ...], hf: str, heads: int, d: int) -> list[_Spec]:
    """torch Linear [heads*K, D] (+ bias [heads*K]) <-> kernel [D, heads, K], bias [heads, K]."""
    kernel = _Spec(
        f"{hf}.weight",
        (path + ("kernel",),),
        lambda w: (w.T.reshape(w.shape[1], heads, -1),),
        lambda k: k.reshape(d, -1).T,
    )
    bias = _Spec(
        f"{hf}.bias",
        (path + ("bias",),),
        lambda b: (b.reshape(heads, -1),),
        lambda b: b.reshape(-1),
    )
    return [kernel, bias]


def _norm(path: tuple[str, ...], hf: str) -> list[_Spec]:
    return [_same(path + ("scale",), f"{hf}.weight"), _same(path + ("bias",), f"{hf}.bias")]


def _dense(path: tuple[str, ...], hf: str) -> list[_Spec]:
    """torch Linear [out, in] <-> kernel [in, out]; bias as is."""
    return [_transposed(path + ("kernel",), f"{hf}.weight"), _same(path + ("bias",), f"{hf}.bias")]


def _conv1d(path: tuple[str, ...], hf: str) -> list[_Spec]:
    """GPT-2 Conv1D [in, out] <-> kernel [in, out]."""
    return [_same(path + ("kernel",), f"{hf}.weight"), _same(path + ("bias",), f"{hf}.bias")]


def _specs(config: ModelConfig) -> list[_Spec]:
    """Every possible spec of the family; `_expected_specs` drops those without params."""
    c = config
    h, n, d = c.num_heads, c.num_kv_heads, c.hidden_size
    qkv = [("layers", "attn", name) for name in ("q", "k", "v")]
    p = _PREFIX[c.family]
    if c.family == "gpt2":
        b = f"{p}.h.{{i}}"
        fused_w = _Spec(
            f"{b}.attn.c_attn.weight",
            tuple(path + ("kernel",) for path in qkv),
            lambda w: tuple(x.reshape(d, h, -1) for x in np.split(w, 3, axis=1)),
            lambda *ks: np.concatenate([k.reshape(d, -1) for k in ks], axis=1),
        )
        fused_b = _Spec(
            f"{b}.attn.c_attn.bias",
            tuple(path + ("bias",) for path in qkv),
            lambda w: tuple(x.reshape(h, -1) for x in np.split(w, 3)),
            lambda *bs: np.concatenate([x.reshape(-1) for x in bs]),
        )
        out = [
            _Spec(
                f"{b}.attn.c_proj.weight",
                (("layers", "attn", "o", "kernel"),),
                lambda w: (w.reshape(h, -1, d),),
                lambda k: k.reshape(-1, d),
            ),
            _same(("layers", "attn", "o", "bias"), f"{b}.attn.c_proj.bias"),
        ]
        return [
            _same(("embed", "embedding"), f"{p}.wte.weight"),
            _same(("pos_embed", "embedding"), f"{p}.wpe.weight"),
            *_norm(("layers", "attn_norm"), f"{b}.ln_1"),
            fused_w,
            fused_b,
            *out,
            *_norm(("layers", "mlp_norm"), f"{b}.ln_2"),
            *_conv1d(("layers", "mlp", "up"), f"{b}.mlp.c_fc"),
            *_conv1d(("layers", "mlp", "down"), f"{b}.mlp.c_proj"),
            *_norm(("final_norm",), f"{p}.ln_f"),
            _transposed(("lm_head", "kernel"), "lm_head.weight"),
            _transposed(("score", "kernel"), "score.weight"),
        ]
    if c.family == "gpt_neox":
        b = f"{p}.layers.{{i}}"
        fused_w = _Spec(
            f"{b}.attention.query_key_value.weight",
            tuple(path + ("kernel",) for path in qkv),
            lambda w: tuple(
                np.transpose(x, (2, 0, 1)) for x in np.moveaxis(w.reshape(h, 3, -1, d), 1, 0)
            ),
            lambda *ks: np.stack([np.transpose(k, (1, 2, 0)) for k in ks], axis=1).reshape(-1, d),
        )
        fused_b = _Spec(
            f"{b}.attention.query_key_value.bias",
            tuple(path + ("bias",) for path in qkv),
            lambda w: tuple(np.moveaxis(w.reshape(h, 3, -1), 1, 0)),
            lambda *bs: np.stack(bs, axis=1).reshape(-1),
        )
        out_w = _Spec(
            f"{b}.attention.dense.weight",
            (("layers", "attn", "o", "kernel"),),
            lambda w: (w.T.reshape(h, -1, d),),
            lambda k: k.reshape(-1, d).T,
        )
        return [
            _same(("embed", "embedding"), f"{p}.embed_in.weight"),
            *_norm(("layers", "attn_norm"), f"{b}.input_layernorm"),
            fused_w,
            fused_b,
            out_w,
            _same(("layers", "attn", "o", "bias"), f"{b}.attention.dense.bias"),
            *_norm(("layers", "mlp_norm"), f"{b}.post_attention_layernorm"),
            *_dense(("layers", "mlp", "up"), f"{b}.mlp.dense_h_to_4h"),
            *_dense(("layers", "mlp", "down"), f"{b}.mlp.dense_4h_to_h"),
            *_norm(("final_norm",), f"{p}.final_layer_norm"),
            _transposed(("lm_head", "kernel"), "embed_out.weight"),
            _transposed(("score", "kernel"), "score.weight"),
        ]
    b = f"{p}.layers.{{i}}"
    out_w = _Spec(
        f"{b}.self_attn.o_proj.weight",
        (("layers", "attn", "o", "kernel"),),
        lambda w: (w.T.reshape(h, -1, d),),
        lambda k: k.reshape(-1, d).T,
    )
    if c.family in ("gemma2", "gemma3"):
        norms = [
            *_norm(("layers", "attn_post_norm"), f"{b}.post_attention_layernorm"),
            *_norm(("layers", "mlp_norm"), f"{b}.pre_feedforward_layernorm"),
            *_norm(("layers", "mlp_post_norm"), f"{b}.post_feedforward_layernorm"),
        ]
    else:
        norms = _norm(("layers", "mlp_norm"), f"{b}.post_attention_layernorm")
    return [
        _same(("embed", "embedding"), f"{p}.embed_tokens.weight"),
        *_norm(("layers", "attn_norm"), f"{b}.input_layernorm"),
        *_linear_in(("layers", "attn", "q"), f"{b}.self_attn.q_proj", h, d),
        *_linear_in(("layers", "attn", "k"), f"{b}.self_attn.k_proj", n, d),
        *_linear_in(("layers", "attn", "v"), f"{b}.self_attn.v_proj", n, d),
        out_w,
        _same(("layers", "attn", "o", "bias"), f"{b}.self_attn.o_proj.bias"),
        _same(("layers", "attn", "q_norm", "scale"), f"{b}.self_attn.q_norm.weight"),
        _same(("layers", "attn", "k_norm", "scale"), f"{b}.self_attn.k_norm.weight"),
        *norms,
        *_dense(("layers", "mlp", "gate"), f"{b}.mlp.gate_proj"),
        *_dense(("layers", "mlp", "up"), f"{b}.mlp.up_proj"),
        *_dense(("layers", "mlp", "down"), f"{b}.mlp.down_proj"),
        *_norm(("final_norm",), f"{p}.norm"),
        _transposed(("lm_head", "kernel"), "lm_head.weight"),
        _transposed(("score", "kernel"), "score.weight"),
    ]


def _get(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _param_shapes(config: ModelConfig) -> Params:
    return jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))


def _expected_specs(config: ModelConfig, shapes: Params) -> list[_Spec]:
    def exists(path: tuple[str, ...]) -> bool:
        try:
            _get(shapes, path)
        except KeyError:
            return False
        return True

    return [s for s in _specs(config) if all(exists(path) for path in s.paths)]


def _layer_names(spec: _Spec, config: ModelConfig) -> list[str]:
    if "{i}" in spec.hf:
        return [spec.hf.format(i=i) for i in range(config.num_layers)]
    return [spec.hf]


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


# Gemma 3 multimodal checkpoints: the text decoder's prefixes (transformers 5, 4) and the parts
# we ignore (vision tower, projector).
_GEMMA3_TEXT_PREFIXES = (
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
)
_GEMMA3_VISION = re.compile(r"^(model\.)?(vision_tower|multi_modal_projector)\.")


def _canonical_name(name: str, config: ModelConfig, expected: set[str]) -> str | None:
    """Maps a checkpoint name onto an expected name; None for buffers, a tied lm_head and the
    vision parts of a Gemma 3 multimodal checkpoint."""
    if config.family == "gemma3":
        if _GEMMA3_VISION.match(name):
            return None
        for old, new in _GEMMA3_TEXT_PREFIXES:
            if name.startswith(old):
                name = new + name.removeprefix(old)
    if name in expected:
        return name
    prefixed = f"{_PREFIX[config.family]}.{name}"
    if prefixed in expected:  # a base-model checkpoint without the prefix
        return prefixed
    if config.family == "gpt_neox" and name == "lm_head.weight" and "embed_out.weight" in expected:
        return "embed_out.weight"
    if _IGNORED.search(name) or (config.tie_embeddings and name == "lm_head.weight"):
        return None
    return name


def hf_to_params(tensors: dict[str, np.ndarray], config: ModelConfig) -> Params:
    """HF state dict (numpy) -> our params (numpy, `param_dtype`), checking names and shapes.

    Raises ValueError naming the tensor for missing, unexpected or wrongly shaped tensors.
    """
    shapes = _param_shapes(config)
    specs = _expected_specs(config, shapes)
    expected = {name for spec in specs for name in _layer_names(spec, config)}
    by_name: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        canonical = _canonical_name(name, config, expected)
        if canonical is None:
            continue
        if canonical not in expected:
            raise ValueError(
                f"unexpected tensor {name!r} for a {config.family} {config.head} model"
            )
        by_name[canonical] = value
    missing = sorted(expected - set(by_name))
    if missing:
        raise ValueError(f"missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    dtype = config.params_dtype
    params: Params = {}
    for spec in specs:
        leaf_shapes = [_get(shapes, path) for path in spec.paths]
        per_layer = "{i}" in spec.hf
        dummies = [np.zeros(s.shape[1:] if per_layer else s.shape, np.float32) for s in leaf_shapes]
        hf_shape = spec.to_hf(*dummies).shape
        layers = []
        for name in _layer_names(spec, config):
            value = np.asarray(by_name[name])
            if value.shape != hf_shape:
                raise ValueError(
                    f"tensor {name!r} has shape {value.shape}, expected {hf_shape} for this config"
                )
            layers.append(spec.to_params(value))
        for j, path in enumerate(spec.paths):
            parts = [leaves[j] for leaves in layers]
            value = np.stack(parts) if per_layer else parts[0]
            _set(params, path, np.asarray(value, dtype=dtype))
    return params


def params_to_hf(params: Params, config: ModelConfig) -> dict[str, np.ndarray]:
    """Our params -> HF state dict (numpy, param dtype); tied models have no `lm_head`."""
    host = jax.device_get(params)
    tensors: dict[str, np.ndarray] = {}
    for spec in _expected_specs(config, params):
        leaves = [np.asarray(_get(host, path)) for path in spec.paths]
        for i, name in enumerate(_layer_names(spec, config)):
            parts = [leaf[i] for leaf in leaves] if "{i}" in spec.hf else leaves
            tensors[name] = np.ascontiguousarray(spec.to_hf(*parts))
    return tensors


# ----------------------------------------------------------------------------- files


_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def _read_safetensors_raw(file: Path) -> dict[str, np.ndarray]:
    """Memory-mapped safetensors reader for safetensors versions whose numpy backend lacks
    bfloat16."""
    data = np.memmap(file, dtype=np.uint8, mode="r")
    header_len = int(np.frombuffer(data[:8], "<u8")[0])
    header = json.loads(data[8 : 8 + header_len].tobytes())
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        raw = data[8 + header_len + start : 8 + header_len + end]
        out[name] = raw.view(_SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


def _read_safetensors(file: Path) -> dict[str, np.ndarray]:
    try:
        with safe_open(file, framework="np") as f:
            return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except TypeError:  # "data type 'bfloat16' not understood" in older safetensors
        return _read_safetensors_raw(file)


def read_weights(path: Path, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """All tensors of an HF checkpoint directory as NumPy arrays, by HF name: sharded or single
    safetensors files, or (only with `allow_pickle`) PyTorch `.bin` pickles."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        tensors: dict[str, np.ndarray] = {}
        for file in files:
            tensors |= _read_safetensors(path / file)
        return tensors
    files = sorted(path.glob("*.safetensors"))
    if files:
        tensors = {}
        for file in files:
            tensors |= _read_safetensors(file)
        return tensors
    pickles = sorted(path.glob("*.bin"))
    if pickles and not allow_pickle:
        raise ValueError(
            f"{path} has only pickled weights ({pickles[0].name}); pickle can run arbitrary code. "
            "Convert them to safetensors, or pass allow_pickle=True to load them with "
            "torch.load(weights_only=True)."
        )
    if not pickles:
        raise ValueError(f"no *.safetensors or *.bin weights in {path}")
    import torch  # only for explicitly allowed pickled checkpoints

    tensors = {}
    for file in pickles:
        state = torch.load(file, map_location="cpu", weights_only=True)
        tensors |= {k: v.float().numpy() for k, v in state.items()}
    return tensors


def load(
    path: str | Path, *, dtype: str | None = None, allow_pickle: bool = False
) -> tuple[Params, ModelConfig]:
    """Loads a local HF checkpoint directory (config.json + safetensors; never downloads).

    Args:
      path: directory with config.json and `model.safetensors`, sharded safetensors with
        `model.safetensors.index.json`, or (with `allow_pickle`) `*.bin` files.
      dtype: params and compute dtype (e.g. "bfloat16"); default float32 for both.
      allow_pickle: allow `*.bin` pickles (read with `torch.load(weights_only=True)`).

    Returns:
      `(params, config)`: params as jax arrays on the default device.
    """
    import transformers

    path = Path(path)
    hf_config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    config = config_from_hf(hf_config)
    if dtype is not None:
        config = dataclasses.replace(config, dtype=dtype, param_dtype=dtype)
    params = hf_to_params(read_weights(path, allow_pickle), config)
    return jax.tree.map(jax.numpy.asarray, params), config


def save(params: Params, config: ModelConfig, path: str | Path, *, tokenizer: Any = None) -> None:
    """Writes `model.safetensors` + `config.json` (+ the tokenizer) that transformers'
    `AutoModelForCausalLM` / `AutoModelForSequenceClassification` load without key warnings."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(params_to_hf(params, config), path / "model.safetensors", metadata={"format": "pt"})
    config_to_hf(config).save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def value_from_reward(params: Params, config: ModelConfig) -> tuple[Params, ModelConfig]:
    """A value model initialised from a reward model: copied params, same score head."""
    if config.head != "score" or config.num_labels != 1:
        raise ValueError(
            f"value_from_reward needs a reward model (head='score', num_labels=1), got "
            f"head={config.head!r}, num_labels={config.num_labels}"
        )
    return jax.tree.map(lambda x: x.copy(), params), config
