"""Softmax attention: the XLA path (`attend`) and fused kernels for a full causal pass
(`ModelConfig.attention`).

`attend` is the reference: scores `[B, N, G, T, S]` in float32 per layer, then a softmax,
written for XLA (and tuned for XLA:CPU). On accelerators a full pass (training, the
reference / value / reward forwards) can use a fused kernel that never materialises the scores:

- "flash" (TPU): the Pallas flash-attention kernel of `jax.experimental.pallas.ops.tpu`, with
  the padding as segment ids (real tokens 1, pads 0) and its causal mask. The sequence is padded
  to a multiple of its 128-wide key blocks (as pads, which nothing real attends to), kv heads are
  repeated to the query heads (HF `repeat_kv` order), and on a mesh it runs per shard under
  `shard_map` (rows over the batch axes, heads over `tensor`), since a Pallas call has no
  partitioning rule of its own.
- "cudnn" (GPU): `jax.nn.dot_product_attention(implementation="cudnn")` (cuDNN's fused
  attention: bfloat16/float16 only), causal with the key-padding mask.

"auto" (the default) takes "flash" on TPU and "cudnn" on GPU for bfloat16/float16 compute, and the
XLA path otherwise; every variant falls back to the XLA path where the kernel cannot express the
layer: cached passes (prefill and decode attend to the KV cache), sliding-window layers,
soft-capped scores (Gemma 2), and a last layer that computes only some positions. Pad queries
get finite, meaningless outputs in every variant (as in `attend`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from rlhf_jax.models.config import ModelConfig

KERNELS = ("flash", "cudnn")
_BLOCK = 128  # the TPU kernel's key block: the sequence is padded to a multiple of it
_F32 = jnp.float32


@jax.custom_vjp
def _softmax(x: jax.Array) -> jax.Array:
    """`jax.nn.softmax(x, axis=-1)` with the backward's row sums `sum(g * y)` as a dot.

    The same values and gradients; XLA:CPU runs the fused multiply-and-reduce of the stock
    backward 4-5x slower than the equivalent dot at attention shapes (many short rows)."""
    return jax.nn.softmax(x, axis=-1)


def _softmax_fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    y = jax.nn.softmax(x, axis=-1)
    return y, y


def _softmax_bwd(y: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    row_dot = jnp.einsum("...s,...s->...", g, y, preferred_element_type=_F32)
    return ((y * (g - row_dot[..., None].astype(g.dtype))).astype(y.dtype),)


_softmax.defvjp(_softmax_fwd, _softmax_bwd)


def attend(
    q_BTHK: jax.Array,
    k: jax.Array,
    v: jax.Array,
    allowed_BTS: jax.Array,
    scale: float | jax.Array,
    kv_layout: str = "bsnk",
    softcap: float | None = None,
) -> jax.Array:
    """Grouped-query softmax attention; scores and softmax in float32.

    `k`, `v` are `[B, S, N, K]` (`kv_layout="bsnk"`) or `[B, N, S, K]` (`"bnsk"`, the cache).
    Query head h reads kv head `h // (H // N)` (HF `repeat_kv` order). Scaled scores are
    soft-capped (`tanh(s / softcap) * softcap`) before the mask when `softcap` is set. Rows with
    no allowed key get uniform weights (finite, never NaN).
    """
    b, t, h, d = q_BTHK.shape
    n = k.shape[kv_layout.index("n")]
    q_BTNGK = q_BTHK.reshape(b, t, n, h // n, d)
    scores = jnp.einsum(f"btngk,{kv_layout}->bngts", q_BTNGK, k, preferred_element_type=_F32)
    scores = scores * scale
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    scores = jnp.where(allowed_BTS[:, None, None], scores, jnp.finfo(_F32).min)
    probs = _softmax(scores).astype(v.dtype)
    out = jnp.einsum(f"bngts,{kv_layout}->btngk", probs, v)
    return out.reshape(b, t, h, d)


def kernel_for(config: ModelConfig, backend: str | None = None) -> str | None:
    """The fused kernel a full pass of `config` uses ("flash" | "cudnn"), or None for the XLA
    path. `backend`: the platform compiled for (default: `jax.default_backend()`)."""
    if (
        config.attention == "xla"
        or config.attn_logit_softcap is not None
        or config.has_local_layers
        or config.attn_scale_by_inverse_layer
    ):
        return None
    if config.attention in KERNELS:
        return config.attention
    backend = backend or jax.default_backend()
    if backend == "tpu":
        return "flash"
    if backend in ("gpu", "cuda", "rocm") and config.compute_dtype in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return None


def _batch_and_head_axes(b: int, h: int) -> tuple[Any, Any] | None:
    """The mesh axes that split the rows and the heads in the current mesh context (the
    `"batch"` and `"act_heads"` rules, each only where it divides), or None outside a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    import flax.linen as nn

    from rlhf_jax import sharding as sh

    rules = dict(reversed(tuple(nn.get_logical_axis_rules()) or sh.DEFAULT_RULES))

    def axes(name: str, size: int) -> Any:
        names = rules.get(name)
        names = (names,) if isinstance(names, str) else tuple(names or ())
        names = tuple(a for a in names if a in mesh.shape and mesh.shape[a] > 1)
        n = 1
        for a in names:
            n *= mesh.shape[a]
        return (names if len(names) > 1 else names[0]) if names and size % n == 0 else None

    return axes("batch", b), axes("act_heads", h)


def _flash(q_BTHK, k_BTNK, v_BTNK, key_mask_BT, scale: float) -> jax.Array:
    """The TPU kernel on one shard (or the whole batch): `[B, T, H, K]` out."""
    from jax.experimental.pallas.ops.tpu import flash_attention as fa

    b, t, h, _ = q_BTHK.shape
    n = k_BTNK.shape[2]
    pad = -t % _BLOCK
    segments = jnp.pad(key_mask_BT.astype(jnp.int32), ((0, 0), (0, pad)))

    def heads_first(x):  # [B, T, ., K] -> [B, ., T + pad, K]
        return jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).swapaxes(1, 2)

    k, v = (jnp.repeat(x, h // n, axis=2) for x in (k_BTNK, v_BTNK))
    out = fa.flash_attention(
        heads_first(q_BTHK),
        heads_first(k),
        heads_first(v),
        segment_ids=fa.SegmentIds(q=segments, kv=segments),
        causal=True,
        sm_scale=scale,
    )
    return out.swapaxes(1, 2)[:, :t]


def _cudnn(q_BTHK, k_BTNK, v_BTNK, key_mask_BT, scale: float, implementation: str = "cudnn"):
    """`jax.nn.dot_product_attention`: causal, keys masked by `key_mask_BT`, GQA native."""
    mask = key_mask_BT.astype(bool)[:, None, None, :]  # [B, 1, 1, S]
    return jax.nn.dot_product_attention(
        q_BTHK,
        k_BTNK,
        v_BTNK,
        mask=mask,
        scale=scale,
        is_causal=True,
        implementation=implementation,
    )


def fused_attention(
    kernel: str,
    q_BTHK: jax.Array,
    k_BTNK: jax.Array,
    v_BTNK: jax.Array,
    key_mask_BT: jax.Array,
    scale: float,
) -> jax.Array:
    """Causal grouped-query attention of a full pass through `kernel` ("flash" | "cudnn", or
    "cudnn-xla": the same `jax.nn.dot_product_attention` call on the XLA implementation, to test
    this wrapper where cuDNN is absent). Query `i` attends to keys `j <= i` with
    `key_mask[j]`; `q` `[B, T, H, K]`, `k`/`v` `[B, T, N, K]` (H a multiple of N), out
    `[B, T, H, K]` in q's dtype. `scale` must be a Python float (static)."""
    if kernel == "cudnn":
        return _cudnn(q_BTHK, k_BTNK, v_BTNK, key_mask_BT, scale)
    if kernel == "cudnn-xla":
        return _cudnn(q_BTHK, k_BTNK, v_BTNK, key_mask_BT, scale, implementation="xla")
    if kernel != "flash":
        raise ValueError(f"unknown attention kernel {kernel!r}; expected one of {KERNELS}")
    b, _, h, _ = q_BTHK.shape
    split = _batch_and_head_axes(b, h)
    if split is None or split == (None, None):
        return _flash(q_BTHK, k_BTNK, v_BTNK, key_mask_BT, scale)
    rows, heads = split
    n = k_BTNK.shape[2]
    kv_heads = heads if heads is not None and (n % _size(heads) == 0) else None
    if heads is not None and kv_heads is None:  # kv heads do not split: replicate them
        heads = None
    spec_q, spec_kv = P(rows, None, heads, None), P(rows, None, kv_heads, None)
    return jax.shard_map(
        lambda q, k, v, m: _flash(q, k, v, m, scale),
        in_specs=(spec_q, spec_kv, spec_kv, P(rows, None)),
        out_specs=spec_q,
        check_vma=False,
    )(q_BTHK, k_BTNK, v_BTNK, key_mask_BT)


def _size(axes: Any) -> int:
    mesh = jax.sharding.get_abstract_mesh()
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    n = 1
    for a in names:
        n *= mesh.shape[a]
    return n
