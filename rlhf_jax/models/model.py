"""One Flax linen decoder LM for GPT-2, GPT-NeoX, Llama/Mistral, Qwen2/Qwen3 and Gemma 2/3.

Layer params carry a leading layer axis. A full pass (no cache: training, scoring) runs the layers
as one `nn.scan` (`_layers`, which `init` also creates the params through), so its compile time
does not grow with depth. For shallow models (`ModelConfig.scan_layers`) the same scan is fully
unrolled (straight-line layers on static slices of the weights, without the scan's per-layer
dynamic slicing and stacking), and a pass asked for a few positions (`forward(..., outputs=)`)
runs its last layer apart, on those positions only. A cached pass (prefill and decode) runs the
layers one by one over a KV cache held as one `[B, N, S, K]` array per layer, so each decode step
writes only the new slot in place and reads each layer's cache without copying it; that keeps
the cost of a decode step proportional to the work, not to copies of the cache. The KV cache is
an explicit pytree argument and return value. Functions take plain nested param dicts;
`ModelConfig` is static.

Sliding-window and full-attention layers (Mistral, Qwen2/3, Gemma 2/3) differ only in data: each
layer gets its `is_local` flag (scanned with the layers' params) and picks its attention mask and
RoPE table from the pass's two (see `masks`), so a model that mixes them still scans.

Param tree (L = num_layers, D = hidden, H/N = query/kv heads, K = head_dim, F = mlp, V = vocab):

    embed/embedding [V, D]                 pos_embed/embedding [P, D]      (learned positions)
    layers/attn_norm/{scale, bias} [L, D]   layers/mlp_norm/{scale, bias} [L, D]  (bias: layernorm)
    layers/attn_post_norm/scale [L, D]      layers/mlp_post_norm/scale [L, D]     (post_norms)
    layers/attn/q/{kernel [L, D, H, K], bias [L, H, K]}
    layers/attn/k, v/{kernel [L, D, N, K], bias [L, N, K]}
    layers/attn/o/{kernel [L, H, K, D], bias [L, D]}
    layers/attn/q_norm, k_norm/scale [L, K]                                   (qk_norm)
    layers/mlp/{gate, up}/{kernel [L, D, F], bias [L, F]}   layers/mlp/down/{kernel [L, F, D], ...}
    final_norm/{scale, bias} [D]
    lm_head/kernel [D, V] (head "lm", untied)      score/kernel [D, num_labels] (head "score")
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from rlhf_jax.models import attention, masks
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.layers import Dense, Norm
from rlhf_jax.models.rope import apply_rope, rope_tables

Params = dict[str, Any]
_F32 = jnp.float32


class KVCache(flax.struct.PyTreeNode):
    """Explicit key/value cache for all layers (a pytree).

    Attributes:
      k, v: tuples of `num_layers` arrays, each `[B, num_kv_heads, max_len, head_dim]`: post-RoPE
        keys and values of layer `i` (one buffer per layer, so a decode step updates each in
        place).
      mask: bool `[B, max_len]`, True where a slot holds a real (non-pad) token.
      index: int32 scalar, the next slot to write.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    mask: jax.Array
    index: jax.Array


def init_cache(
    config: ModelConfig, batch_size: int, max_len: int, dtype: Any | None = None
) -> KVCache:
    """Empty cache: zero k/v (`dtype`, default the compute dtype), mask all False, index 0."""
    shape = (batch_size, config.num_kv_heads, max_len, config.head_dim)
    dtype = config.compute_dtype if dtype is None else dtype
    layers = range(config.num_layers)
    return KVCache(
        k=tuple(jnp.zeros(shape, dtype) for _ in layers),
        v=tuple(jnp.zeros(shape, dtype) for _ in layers),
        mask=jnp.zeros((batch_size, max_len), bool),
        index=jnp.zeros((), jnp.int32),
    )


def _constrain(x: jax.Array, *axes: str | None) -> jax.Array:
    return nn.with_logical_constraint(x, axes)


def _activation(name: str, x: jax.Array) -> jax.Array:
    if name == "silu":
        return jax.nn.silu(x)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return jax.nn.gelu(x, approximate=True)
    return jax.nn.relu(x)


class Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, rope, allowed_BTS, layer_idx, kv, index, queries=None):
        """`queries=(start, length)` (static, full pass only): only those positions query (and
        are returned); keys and values still come from all T positions."""
        c = self.config
        heads = (c.num_heads, c.head_dim)
        kv_heads = (c.num_kv_heads, c.head_dim)
        q_rope = rope
        x_q = x_BTD
        if queries is not None:
            rows = slice(queries[0], queries[0] + queries[1])
            x_q, allowed_BTS = x_BTD[:, rows], allowed_BTS[:, rows]
            q_rope = None if rope is None else tuple(table[:, rows] for table in rope)
        q = Dense(c, heads, ("embed", "heads", "head_dim"), c.attn_bias, name="q")(x_q)
        k = Dense(c, kv_heads, ("embed", "kv_heads", "head_dim"), c.attn_bias, name="k")(x_BTD)
        v = Dense(c, kv_heads, ("embed", "kv_heads", "head_dim"), c.attn_bias, name="v")(x_BTD)
        if c.qk_norm:
            q = Norm(c, "rmsnorm", "head_dim", name="q_norm")(q)
            k = Norm(c, "rmsnorm", "head_dim", name="k_norm")(k)
        if rope is not None:
            q = apply_rope(q, *q_rope)
            k = apply_rope(k, *rope)
        q = _constrain(q, "batch", "length", "act_heads", None)
        k = _constrain(k, "batch", "length", "act_kv_heads", None)
        v = _constrain(v, "batch", "length", "act_kv_heads", None)
        layout = "bsnk"
        if kv is not None:  # write the T new slots of this layer's [B, N, S, K] cache in place
            cache_k, cache_v = kv
            at = (0, 0, index, 0)
            k = lax.dynamic_update_slice(cache_k, k.swapaxes(1, 2).astype(cache_k.dtype), at)
            v = lax.dynamic_update_slice(cache_v, v.swapaxes(1, 2).astype(cache_v.dtype), at)
            k = _constrain(k, "batch", "act_kv_heads", "cache_length", None)
            v = _constrain(v, "batch", "act_kv_heads", "cache_length", None)
            kv, layout = (k, v), "bnsk"
        scale = c.head_dim**-0.5 if c.attn_scale else 1.0
        if c.query_pre_attn_scalar is not None:
            scale = c.query_pre_attn_scalar**-0.5
        if c.attn_scale_by_inverse_layer:
            scale = scale / (jnp.asarray(layer_idx) + 1).astype(_F32)
        k, v = k.astype(q.dtype), v.astype(q.dtype)
        kernel = attention.kernel_for(c) if kv is None and queries is None else None
        if kernel is not None:  # a full pass: the last query's row of its mask is the key mask
            out = attention.fused_attention(kernel, q, k, v, allowed_BTS[:, -1], float(scale))
        else:
            out = attention.attend(q, k, v, allowed_BTS, scale, layout, c.attn_logit_softcap)
        out = _constrain(out, "batch", "length", "act_heads", None)
        o = Dense(c, (c.hidden_size,), ("heads", "head_dim", "embed"), c.attn_out_bias, 2, name="o")
        return o(out), kv


class MLP(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x_BTD):
        c = self.config
        f = (c.intermediate_size,)
        h = Dense(c, f, ("embed", "mlp"), c.mlp_bias, name="up")(x_BTD)
        if c.mlp == "gated":
            gate = Dense(c, f, ("embed", "mlp"), c.mlp_bias, name="gate")(x_BTD)
            h = _activation(c.activation, gate) * h
        else:
            h = _activation(c.activation, h)
        h = _constrain(h, "batch", "length", "act_mlp")
        return Dense(c, (c.hidden_size,), ("mlp", "embed"), c.mlp_bias, name="down")(h)


class Block(nn.Module):
    """One decoder layer: `(h, (layer_idx, is_local, kv)) -> (h, kv)`; the `nn.scan` body of a
    full pass, applied layer by layer (with one layer's params and cache) in a cached pass.

    `rope` is `rope_tables`' `(global, local)` pair (None for learned positions) and `allowed`
    the `masks.Masks` pair; the layer takes the local ones when `is_local` (see `masks`)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, h_BTD, xs, rope, allowed, index, queries=None):
        """`queries=(start, length)`: compute (and return) only those positions; see
        `Attention`."""
        c = self.config
        layer_idx, is_local, kv = xs
        rope = None if rope is None else masks.for_layer(is_local, *rope)
        allowed_BTS = masks.for_layer(is_local, *allowed)
        attn = Attention(c, name="attn")
        attn_out, kv = attn(
            Norm(c, c.norm, name="attn_norm")(h_BTD),
            rope,
            allowed_BTS,
            layer_idx,
            kv,
            index,
            queries,
        )
        if c.post_norms:
            attn_out = Norm(c, c.norm, name="attn_post_norm")(attn_out)
        if queries is not None:
            h_BTD = h_BTD[:, queries[0] : queries[0] + queries[1]]
        mlp_norm, mlp = Norm(c, c.norm, name="mlp_norm"), MLP(c, name="mlp")

        def mlp_out(x_BTD):
            y_BTD = mlp(mlp_norm(x_BTD))
            return Norm(c, c.norm, name="mlp_post_norm")(y_BTD) if c.post_norms else y_BTD

        if c.parallel_residual:
            h_BTD = h_BTD + attn_out + mlp_out(h_BTD)
        else:
            h_BTD = h_BTD + attn_out
            h_BTD = h_BTD + mlp_out(h_BTD)
        return _constrain(h_BTD, "batch", "length", "act_embed"), kv


def _remat(fn, config: ModelConfig, **kwargs):
    """`fn` (a layer) under the config's rematerialisation (`ModelConfig.remat`): "full"
    recomputes the whole layer in the backward pass; "dots" keeps only the outputs of the weight
    matmuls and recomputes the cheap elementwise work (norms, RoPE, activations, attention
    softmax): half the activation memory at no measurable cost; "none" keeps everything."""
    if config.remat == "none":
        return fn
    policy = (
        None if config.remat == "full" else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    )
    remat = nn.remat if isinstance(fn, type) else jax.checkpoint
    return remat(fn, prevent_cse=False, policy=policy, **kwargs)


def _layers(config: ModelConfig) -> nn.Module:
    """The full pass's layers: `Block` (under the config's remat) as one `nn.scan` over layer
    params stacked on a leading axis, `(h, (layer_idx, is_local, None), rope, allowed, None) ->
    (h, None)`, as many layers as `layer_idx` holds. Fully unrolled (`unroll=True`: static
    slices and straight-line layers) when `ModelConfig.use_scan` is False."""
    return nn.scan(
        _remat(Block, config),
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
        unroll=1 if config.use_scan else True,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(config)


def _layer_xs(config: ModelConfig, count: int) -> tuple[Any, ...]:
    """The scanned inputs of the first `count` layers: their indices and `is_local` flags."""
    return jnp.arange(count), jnp.asarray(masks.layer_flags(config)[:count]), None


def _full_pass_inputs(config: ModelConfig, positions_BT: jax.Array, mask_BT: jax.Array):
    """RoPE tables (`rope_tables`) and the `[B, T, T]` masks of a full pass
    (`masks.full_pass_masks`): query `i` attends to keys `j <= i` with `mask[j]`."""
    return rope_tables(config, positions_BT), masks.full_pass_masks(config, mask_BT)


class Transformer(nn.Module):
    """Decoder LM: embeddings, the layers (`_layers`), final norm and heads; `forward` runs a
    pass, `logits` / `scores` the heads, `init_all` creates every param."""

    config: ModelConfig

    def setup(self) -> None:
        c = self.config
        init = nn.initializers.normal(c.initializer_range)
        self.embed = nn.Embed(
            c.vocab_size,
            c.hidden_size,
            dtype=c.compute_dtype,
            param_dtype=c.params_dtype,
            embedding_init=nn.with_logical_partitioning(init, ("vocab", "embed")),
        )
        if c.positions == "learned":
            self.pos_embed = nn.Embed(
                c.max_position_embeddings,
                c.hidden_size,
                dtype=c.compute_dtype,
                param_dtype=c.params_dtype,
                embedding_init=nn.with_logical_partitioning(init, (None, "embed")),
            )
        self.layers = _layers(c)
        self.final_norm = Norm(c, c.norm)
        if c.head == "lm" and not c.tie_embeddings:
            self.lm_head = Dense(c, (c.vocab_size,), ("embed", "vocab"), False, float32_out=True)
        if c.head == "score":
            self.score = Dense(c, (c.num_labels,), ("embed", None), False, float32_out=True)

    def embed_tokens(self, tokens_BT, positions_BT):
        # The lookup reads a table gathered along `embed` (sharded over the vocabulary only): the
        # rows come out split over the batch axes, which a table split along `embed` over `fsdp`
        # cannot give without replicating the gathered activations first.
        table_VD = _constrain(self.embed.embedding, "vocab", None)
        c = self.config
        h = jnp.take(table_VD.astype(c.compute_dtype), tokens_BT, axis=0)
        if c.embed_scale:  # Gemma: sqrt(hidden) rounded to the compute dtype, as transformers
            h = h * jnp.asarray(c.hidden_size**0.5, c.compute_dtype)
        if c.positions == "learned":
            h = h + self.pos_embed(positions_BT)
        return _constrain(h, "batch", "length", "act_embed")

    def final(self, h_BTD):
        return self.final_norm(h_BTD)

    def logits(self, hidden_BTD):
        c = self.config
        if c.head != "lm" and not c.tie_embeddings:
            raise ValueError("lm_logits needs head='lm' or tied embeddings; this is a score model")
        if c.tie_embeddings:  # the embedding table as the head, float32 out like `lm_head`
            table_VD = self.embed.embedding.astype(c.compute_dtype)
            logits = lax.dot_general(
                hidden_BTD.astype(c.compute_dtype),
                table_VD,
                (((hidden_BTD.ndim - 1,), (1,)), ((), ())),
                preferred_element_type=_F32,
            )
        else:
            logits = self.lm_head(hidden_BTD)
        if c.final_logit_softcap is not None:
            cap = c.final_logit_softcap
            logits = jnp.tanh(logits / cap) * cap
        return _constrain(logits, "batch", "length", "act_vocab")

    def scores(self, hidden_BTD):
        if self.config.head != "score":
            raise ValueError("score needs a config with head='score'")
        return self.score(hidden_BTD)

    def init_all(self, tokens_BT):
        """Touches every submodule so `init` creates all params (the layers' through `_layers`)."""
        c = self.config
        h = self.embed_tokens(tokens_BT, tokens_BT)
        rope, allowed = _full_pass_inputs(c, tokens_BT, tokens_BT >= 0)
        h, _ = self.layers(h, _layer_xs(c, c.num_layers), rope, allowed, None)
        h = self.final_norm(h)
        return self.logits(h) if c.head == "lm" else self.scores(h)


def _init_variables(config: ModelConfig, key: jax.Array) -> dict[str, Any]:
    tokens = jnp.zeros((1, 1), jnp.int32)
    return Transformer(config).init(key, tokens, method=Transformer.init_all)


@functools.partial(jax.jit, static_argnums=0)
def init_params(config: ModelConfig, key: jax.Array) -> Params:
    """Random params (normal(initializer_range) kernels, zero biases, unit norms), `param_dtype`.

    A plain nested dict of arrays (no partitioning boxes). Jitted (`config` static); for sharded
    init wrap it again: `jax.jit(init_params, static_argnums=0, out_shardings=...)`.
    """
    return nn.meta.unbox(_init_variables(config, key)["params"])


def param_shapes(config: ModelConfig) -> Params:
    """Params-shaped tree of `jax.ShapeDtypeStruct`s (no computation)."""
    return jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))


def logical_axes(config: ModelConfig) -> Any:
    """Params-shaped tree of `PartitionSpec`s of logical axis names (no computation)."""
    abstract = jax.eval_shape(lambda key: _init_variables(config, key), jax.random.key(0))
    return nn.get_partition_spec(abstract)["params"]


def unstack_layers(params: Params) -> Params:
    """`params` with `params["layers"]` split into a tuple of per-layer param dicts.

    Only the cached pass (`forward` with a cache) accepts this form. Slicing a layer out of the
    stacked weights is a copy; a decode loop that slices inside every step copies all weights per
    token (on CPU that is most of the step). `generate` unstacks once before its loop instead, at
    the price of one transient copy of the layer weights.
    """
    layers = params["layers"]
    if isinstance(layers, (list, tuple)):
        return params
    n = jax.tree.leaves(layers)[0].shape[0]
    per_layer = tuple(jax.tree.map(lambda w, i=i: w[i], layers) for i in range(n))
    return {**params, "layers": per_layer}


def forward(
    params: Params,
    config: ModelConfig,
    tokens_BT: jax.Array,
    positions_BT: jax.Array,
    mask_BT: jax.Array,
    cache: KVCache | None = None,
    *,
    outputs: tuple[int, int] | None = None,
) -> tuple[jax.Array, KVCache | None]:
    """Final-normed hidden states `[B, T, D]` (compute dtype) and the updated cache.

    Args:
      tokens_BT: int token ids.
      positions_BT: int position ids (use the exclusive cumsum of the mask for left-padded rows;
        learned positions must be < max_position_embeddings).
      mask_BT: bool/int, 1 where the token is real.
      params: the param tree; for a cached pass also `unstack_layers(params)`.
      cache: None for a full pass: each query attends to keys `j <= i` with `mask[j]`.
        Otherwise the k/v of the T tokens go to slots `[index, index + T)` (the caller keeps
        `index + T <= max_len`), `mask_BT` to `cache.mask` there, and query `i` (slot
        `index + i`) attends to slots `j <= index + i` with `cache.mask[j]`; index advances by T.
        Prefill (T = prompt length) and decode (T = 1) are the same code; `index` may be traced.
        Sliding-window layers (`ModelConfig.local_layers`) see, in either pass, only keys among
        the last `sliding_window` real tokens up to the query (see `masks`); their cache is full
        length too.
      outputs: full pass only: `(start, length)` (static ints) returns the hidden states of
        positions `[start, start + length)` only, `[B, length, D]`. With unrolled layers
        (`ModelConfig.use_scan` False) the last layer runs apart and computes only those
        positions (its queries, attention output and MLP), so callers that need a few positions
        (PPO's response tokens) skip part of its FLOPs; a scanned pass computes every position
        and slices (running the last layer apart would slice the stacked weights the scan reads,
        a copy of them).

    Rows of pad queries are finite but meaningless.
    """
    model = Transformer(config)
    if cache is None:
        if isinstance(params["layers"], (list, tuple)):
            raise ValueError(
                "forward without a cache needs the stacked params, not unstack_layers(params)"
            )
        if outputs is not None and not (
            0 <= outputs[0] and outputs[1] >= 1 and outputs[0] + outputs[1] <= tokens_BT.shape[1]
        ):
            raise ValueError(
                f"forward: outputs={outputs} must be (start, length) with length >= 1 inside the "
                f"{tokens_BT.shape[1]} positions"
            )
        return _full_pass(params, config, tokens_BT, positions_BT, mask_BT, outputs), None
    if outputs is not None:
        raise ValueError("forward: outputs=(start, length) is for full passes (cache=None)")
    if len(cache.k) != config.num_layers:
        raise ValueError(
            f"forward: the cache holds {len(cache.k)} layers, the model has {config.num_layers}; "
            "build it with init_cache(config, ...)"
        )
    variables = {"params": params}
    h = model.apply(variables, tokens_BT, positions_BT, method=Transformer.embed_tokens)
    rope = rope_tables(config, positions_BT)
    t, index = tokens_BT.shape[1], cache.index
    kv_mask = lax.dynamic_update_slice(cache.mask, mask_BT.astype(bool), (0, index))
    allowed = masks.cached_masks(config, kv_mask, index, t)
    # Unrolled: each layer reads its own weights and its own cache buffer, and writes back only
    # the new slots.
    layers = params["layers"]
    if not isinstance(layers, (list, tuple)):
        layers = unstack_layers(params)["layers"]
    block, keys, values = Block(config), [], []
    is_local = masks.layer_flags(config)
    for i, layer in enumerate(layers):
        xs = (np.int32(i), is_local[i], (cache.k[i], cache.v[i]))
        h, (k, v) = block.apply({"params": layer}, h, xs, rope, allowed, index)
        keys.append(k)
        values.append(v)
    h = model.apply(variables, h, method=Transformer.final)
    return h, KVCache(k=tuple(keys), v=tuple(values), mask=kv_mask, index=index + t)


def _full_pass(
    params: Params,
    config: ModelConfig,
    tokens_BT: jax.Array,
    positions_BT: jax.Array,
    mask_BT: jax.Array,
    queries: tuple[int, int] | None,
) -> jax.Array:
    """`forward` without a cache: the layers through `_layers`. `queries=(start, length)`: the
    hidden states of those positions; with unrolled layers the last one computes only them (the
    earlier layers need every position for its keys and values). Its params are split from the
    stack once (`jnp.split`, whose transpose is one concatenate: the backward writes each weight
    gradient once instead of summing two pads)."""
    model, variables = Transformer(config), {"params": params}
    h = model.apply(variables, tokens_BT, positions_BT, method=Transformer.embed_tokens)
    rope, allowed = _full_pass_inputs(config, positions_BT, mask_BT)
    layers, n, last = params["layers"], config.num_layers, None
    if queries is not None and not config.use_scan:  # the last layer runs apart, on `queries`
        split = jax.tree.map(lambda w: jnp.split(w, [n - 1]), layers)
        is_split = lambda x: isinstance(x, list)
        layers = jax.tree.map(lambda parts: parts[0], split, is_leaf=is_split)
        last = {"params": jax.tree.map(lambda parts: parts[1][0], split, is_leaf=is_split)}
    scanned = n if last is None else n - 1
    if scanned:
        xs = _layer_xs(config, scanned)
        h, _ = _layers(config).apply({"params": layers}, h, xs, rope, allowed, None)
    if last is not None:
        xs = (np.int32(n - 1), masks.layer_flags(config)[n - 1], None)
        layer = lambda v, h: Block(config).apply(v, h, xs, rope, allowed, None, queries)[0]
        h = _remat(layer, config)(last, h)
    elif queries is not None:
        h = h[:, queries[0] : queries[0] + queries[1]]
    return model.apply(variables, h, method=Transformer.final)


def lm_logits(params: Params, config: ModelConfig, hidden_BTD: jax.Array) -> jax.Array:
    """LM logits `[B, T, V]`, float32 whatever the compute dtype (tied embedding or `lm_head`,
    computed in the compute dtype with float32 accumulation and output)."""
    return Transformer(config).apply({"params": params}, hidden_BTD, method=Transformer.logits)


def score(params: Params, config: ModelConfig, hidden_BTD: jax.Array) -> jax.Array:
    """Sequence-classification head `[B, T, num_labels]` (HF `score`, no bias) at every position,
    float32 (computed in the compute dtype with float32 accumulation and output)."""
    return Transformer(config).apply({"params": params}, hidden_BTD, method=Transformer.scores)


def sequence_scores(
    params: Params,
    config: ModelConfig,
    tokens_BT: jax.Array,
    positions_BT: jax.Array,
    mask_BT: jax.Array,
    *,
    first_scored: int = 0,
) -> jax.Array:
    """Reward-model output `[B, num_labels]`: the score at the last real (mask = 1) token of each
    row, like HF sequence classification reading the last non-pad token. All-pad rows read 0.

    `first_scored` (static): a position at or before every row's last real token (e.g. `P - 1`
    for left-padded prompts of length P followed by responses); the last layer then computes only
    positions `first_scored ..` (`forward(..., outputs=)`). Rows whose last real token lies
    before it read position `first_scored`.
    """
    t = tokens_BT.shape[1]
    if not 0 <= first_scored < t:
        raise ValueError(f"sequence_scores: first_scored={first_scored} must be in [0, {t})")
    outputs = (first_scored, t - first_scored) if first_scored else None
    hidden_BSD, _ = forward(params, config, tokens_BT, positions_BT, mask_BT, outputs=outputs)
    last_B = jnp.max(jnp.where(mask_BT.astype(bool), jnp.arange(t), 0), axis=1)
    index_B = jnp.maximum(last_B - first_scored, 0)
    hidden_B1D = jnp.take_along_axis(hidden_BSD, index_B[:, None, None], axis=1)
    return score(params, config, hidden_B1D)[:, 0]
