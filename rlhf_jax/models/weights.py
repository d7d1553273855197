"""Hugging Face weight names <-> our param layout: `hf_to_params` and `params_to_hf`, one tensor
at a time (config mapping: `hf_config`; checkpoint files: `io`).

HF `<p>` is `transformer` (GPT-2), `gpt_neox` (NeoX) or `model` (others); `i` is the layer, whose
params we stack on a leading layer axis. Norm `scale`/`bias` are HF `weight`/`bias`;
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

Conversion can be lazy (`hf_to_params(..., lazy=True)`, what `io.load` uses): names and shapes
are checked first, and each param leaf (`LazyLeaf`) reads and converts one layer's tensor at a
time when a device's slice of it is placed.

Gemma 3 multimodal checkpoints hold the text decoder under `model.language_model.`
(transformers 5) or `language_model.model.` (4), read as `model.`; their vision tower and
projector are ignored.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.model import Params, param_shapes

PREFIX = {
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


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """One HF tensor <-> one or more param leaves (per layer when `hf` contains `{i}`)."""

    hf: str
    paths: tuple[tuple[str, ...], ...]
    to_params: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_hf: Callable[..., np.ndarray]


def _same(path: tuple[str, ...], hf: str) -> WeightSpec:
    return WeightSpec(hf, (path,), lambda w: (w,), lambda p: p)


def _transposed(path: tuple[str, ...], hf: str) -> WeightSpec:
    return WeightSpec(hf, (path,), lambda w: (w.T,), lambda p: p.T)


def _linear_in(path: tuple[str, ...], hf: str, heads: int, d: int) -> list[WeightSpec]:
    """torch Linear [heads*K, D] (+ bias [heads*K]) <-> kernel [D, heads, K], bias [heads, K]."""
    kernel = WeightSpec(
        f"{hf}.weight",
        (path + ("kernel",),),
        lambda w: (w.T.reshape(w.shape[1], heads, -1),),
        lambda k: k.reshape(d, -1).T,
    )
    bias = WeightSpec(
        f"{hf}.bias",
        (path + ("bias",),),
        lambda b: (b.reshape(heads, -1),),
        lambda b: b.reshape(-1),
    )
    return [kernel, bias]


def _norm(path: tuple[str, ...], hf: str) -> list[WeightSpec]:
    return [_same(path + ("scale",), f"{hf}.weight"), _same(path + ("bias",), f"{hf}.bias")]


def _dense(path: tuple[str, ...], hf: str) -> list[WeightSpec]:
    """torch Linear [out, in] <-> kernel [in, out]; bias as is."""
    return [_transposed(path + ("kernel",), f"{hf}.weight"), _same(path + ("bias",), f"{hf}.bias")]


def _conv1d(path: tuple[str, ...], hf: str) -> list[WeightSpec]:
    """GPT-2 Conv1D [in, out] <-> kernel [in, out]."""
    return [_same(path + ("kernel",), f"{hf}.weight"), _same(path + ("bias",), f"{hf}.bias")]


def _specs(config: ModelConfig) -> list[WeightSpec]:
    """Every possible spec of the family; `expected_specs` drops those without params."""
    c = config
    h, n, d = c.num_heads, c.num_kv_heads, c.hidden_size
    qkv = [("layers", "attn", name) for name in ("q", "k", "v")]
    p = PREFIX[c.family]
    if c.family == "gpt2":
        b = f"{p}.h.{{i}}"
        fused_w = WeightSpec(
            f"{b}.attn.c_attn.weight",
            tuple(path + ("kernel",) for path in qkv),
            lambda w: tuple(x.reshape(d, h, -1) for x in np.split(w, 3, axis=1)),
            lambda *ks: np.concatenate([k.reshape(d, -1) for k in ks], axis=1),
        )
        fused_b = WeightSpec(
            f"{b}.attn.c_attn.bias",
            tuple(path + ("bias",) for path in qkv),
            lambda w: tuple(x.reshape(h, -1) for x in np.split(w, 3)),
            lambda *bs: np.concatenate([x.reshape(-1) for x in bs]),
        )
        out = [
            WeightSpec(
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
        fused_w = WeightSpec(
            f"{b}.attention.query_key_value.weight",
            tuple(path + ("kernel",) for path in qkv),
            lambda w: tuple(
                np.transpose(x, (2, 0, 1)) for x in np.moveaxis(w.reshape(h, 3, -1, d), 1, 0)
            ),
            lambda *ks: np.stack([np.transpose(k, (1, 2, 0)) for k in ks], axis=1).reshape(-1, d),
        )
        fused_b = WeightSpec(
            f"{b}.attention.query_key_value.bias",
            tuple(path + ("bias",) for path in qkv),
            lambda w: tuple(np.moveaxis(w.reshape(h, 3, -1), 1, 0)),
            lambda *bs: np.stack(bs, axis=1).reshape(-1),
        )
        out_w = WeightSpec(
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
    out_w = WeightSpec(
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


def get_path(tree: Any, path: tuple[str, ...]) -> Any:
    """`tree[path[0]][path[1]]...` (KeyError where the path does not exist)."""
    for key in path:
        tree = tree[key]
    return tree


def expected_specs(config: ModelConfig, shapes: Params) -> list[WeightSpec]:
    """The specs of `config`'s family whose params exist in `shapes` (a param-shaped tree)."""

    def exists(path: tuple[str, ...]) -> bool:
        try:
            get_path(shapes, path)
        except KeyError:
            return False
        return True

    return [s for s in _specs(config) if all(exists(path) for path in s.paths)]


def layer_names(spec: WeightSpec, config: ModelConfig) -> list[str]:
    """The HF names of `spec`'s tensors: one per layer for a per-layer spec, else one."""
    if "{i}" in spec.hf:
        return [spec.hf.format(i=i) for i in range(config.num_layers)]
    return [spec.hf]


def set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
    """`tree[path[0]]...[path[-1]] = value`, creating the dicts on the way."""
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


def canonical_name(name: str, config: ModelConfig, expected: set[str]) -> str | None:
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
    prefixed = f"{PREFIX[config.family]}.{name}"
    if prefixed in expected:  # a base-model checkpoint without the prefix
        return prefixed
    if config.family == "gpt_neox" and name == "lm_head.weight" and "embed_out.weight" in expected:
        return "embed_out.weight"
    if _IGNORED.search(name) or (config.tie_embeddings and name == "lm_head.weight"):
        return None
    return name


class LazyLeaf:
    """A param leaf converted from its HF tensor(s) only when indexed: `shape`, `dtype`,
    `x[index]` (a NumPy array of that slice) and `np.asarray(x)` (the whole leaf).

    A stacked leaf (leading layer axis) converts the layers its index covers one at a time:
    each layer's HF tensor is read (from its file, for a checkpoint loaded lazily), converted by
    the spec's `to_params`, sliced and cast into the output. So `jax.make_array_from_callback`
    or `rlhf_jax.sharding.shard_params` asking for one device's slice never makes the host hold
    more than that slice plus one layer's tensor.
    """

    def __init__(
        self, spec: WeightSpec, part: int, sources: list[Any], shape: tuple[int, ...], dtype: Any
    ) -> None:
        self.spec, self.part, self.sources = spec, part, sources
        self.per_layer = "{i}" in spec.hf
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"LazyLeaf({self.spec.hf!r}, shape={self.shape}, dtype={self.dtype})"

    def _convert(self, source: Any) -> np.ndarray:
        return self.spec.to_params(np.asarray(source))[self.part]

    def __getitem__(self, index: Any) -> np.ndarray:
        basic = _basic_index(index, self.ndim)
        if basic is None:  # advanced indexing: materialise, then index
            return np.asarray(self)[index]
        index = basic
        if not self.per_layer:
            return np.asarray(self._convert(self.sources[0])[index], self.dtype)
        layers = range(self.shape[0])[index[0]]
        rest = index[1:]
        if isinstance(layers, int):
            return np.asarray(self._convert(self.sources[layers])[rest], self.dtype)
        # the slice's shape without converting anything (a zero-strided view)
        rest_shape = np.broadcast_to(np.zeros((), np.uint8), self.shape[1:])[rest].shape
        out = np.empty((len(layers), *rest_shape), self.dtype)
        for k, i in enumerate(layers):
            out[k] = np.asarray(self._convert(self.sources[i])[rest], self.dtype)
        return out

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        out = self[(slice(None),) * self.ndim]
        return out if dtype is None else out.astype(dtype, copy=False)


def _basic_index(index: Any, ndim: int) -> tuple[Any, ...] | None:
    """`index` as `ndim` ints / slices (Ellipsis expanded, missing dims full); None if it is
    not a basic index."""
    index = index if isinstance(index, tuple) else (index,)
    if any(not isinstance(i, (int, np.integer, slice)) and i is not Ellipsis for i in index):
        return None
    if sum(i is Ellipsis for i in index) > 1:
        return None
    if Ellipsis in index:
        at = index.index(Ellipsis)
        fill = (slice(None),) * (ndim - len(index) + 1)
        index = index[:at] + fill + index[at + 1 :]
    if len(index) > ndim:
        return None
    index = tuple(int(i) if isinstance(i, np.integer) else i for i in index)
    return index + (slice(None),) * (ndim - len(index))


def hf_to_params(tensors: Mapping[str, Any], config: ModelConfig, *, lazy: bool = False) -> Params:
    """HF state dict -> our params in `param_dtype`, checking names and shapes.

    `tensors` maps HF names to NumPy arrays, or to anything with `shape` that `np.asarray`
    reads (the lazily read tensors of `index_weights`). Returns NumPy arrays, or with `lazy`
    `LazyLeaf`s that convert (and read) one layer at a time when indexed.

    Raises ValueError naming the tensor for missing, unexpected or wrongly shaped tensors
    (before anything is converted).
    """
    shapes = param_shapes(config)
    specs = expected_specs(config, shapes)
    expected = {name for spec in specs for name in layer_names(spec, config)}
    by_name: dict[str, Any] = {}
    for name, value in tensors.items():
        canonical = canonical_name(name, config, expected)
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
        leaf_shapes = [get_path(shapes, path) for path in spec.paths]
        per_layer = "{i}" in spec.hf
        dummies = [np.zeros(s.shape[1:] if per_layer else s.shape, np.float32) for s in leaf_shapes]
        hf_shape = spec.to_hf(*dummies).shape
        sources = []
        for name in layer_names(spec, config):
            value = by_name[name]
            if tuple(np.shape(value)) != hf_shape:
                raise ValueError(
                    f"tensor {name!r} has shape {tuple(np.shape(value))}, expected {hf_shape} "
                    "for this config"
                )
            getattr(value, "dtype", None)  # a StoredTensor's ValueError for a dtype it cannot read
            sources.append(value)
        for j, (path, leaf) in enumerate(zip(spec.paths, leaf_shapes, strict=True)):
            set_path(params, path, LazyLeaf(spec, j, sources, leaf.shape, dtype))
    if lazy:
        return params
    return jax.tree.map(np.asarray, params, is_leaf=lambda x: isinstance(x, LazyLeaf))


def params_to_hf(params: Params, config: ModelConfig) -> dict[str, np.ndarray]:
    """Our params -> HF state dict (numpy, param dtype); tied models have no `lm_head`."""
    host = jax.device_get(params)
    tensors: dict[str, np.ndarray] = {}
    for spec in expected_specs(config, params):
        leaves = [np.asarray(get_path(host, path)) for path in spec.paths]
        for i, name in enumerate(layer_names(spec, config)):
            parts = [leaf[i] for leaf in leaves] if "{i}" in spec.hf else leaves
            tensors[name] = np.ascontiguousarray(spec.to_hf(*parts))
    return tensors
