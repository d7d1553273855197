"""Model-specific sharding: parameter shardings, sharded init and loading, a jitted forward.

The parallelism layer (`rlhf_jax.sharding`: meshes, logical-axis rules, placement,
`jit_with_rules`) knows nothing about models; this module applies it to `ModelConfig` models
through their logical axes (`logical_axes`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rlhf_jax import sharding as sh
from rlhf_jax.models import hf
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.model import forward, init_params, lm_logits, logical_axes, score

Rules = sh.Rules


def _positions(mask_BT: jax.Array) -> jax.Array:
    """Exclusive cumulative sum of the mask: position ids of left- or right-padded rows."""
    mask = mask_BT.astype(jnp.int32)
    return jnp.cumsum(mask, axis=-1) - mask


def _abstract_params(config: ModelConfig) -> Any:
    return jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))


def param_shardings(config: ModelConfig, mesh: Mesh, rules: Rules | None = None) -> dict[str, Any]:
    """``NamedSharding`` for every parameter of a model with ``config`` (a params-shaped tree).

    Each parameter's logical axes (:func:`rlhf_jax.models.logical_axes`, e.g. the q kernel
    ``("layers", "embed", "heads", "head_dim")``) are translated by ``rules`` with the
    replicate-on-non-divisible fallback of :func:`rlhf_jax.sharding.logical_to_mesh_spec`. No
    computation: only shapes are evaluated.
    """
    return sh.logical_to_sharding(logical_axes(config), _abstract_params(config), mesh, rules)


def sharded_init_params(
    config: ModelConfig, key: jax.Array, mesh: Mesh, rules: Rules | None = None
) -> dict[str, Any]:
    """:func:`rlhf_jax.models.init_params` with every parameter born sharded on ``mesh`` (no
    device ever holds a whole tensor). Same values as the unsharded init for the same ``key``
    (partitionable threefry). In a multi-process run every process calls it with the same key.
    """
    return sh.sharded_init(
        functools.partial(init_params, config), logical_axes(config), mesh, rules, key
    )


def load_sharded(
    path: str | Path,
    mesh: Mesh,
    rules: Rules | None = None,
    *,
    dtype: str | None = None,
    allow_pickle: bool = False,
) -> tuple[dict[str, Any], ModelConfig]:
    """Load a local HF checkpoint directory straight onto ``mesh``, shard by shard.

    Like :func:`rlhf_jax.models.load` (same ``dtype`` / ``allow_pickle`` semantics, never
    downloads), but the converted host (NumPy) params go through
    :func:`rlhf_jax.sharding.shard_params`: each device receives only its slice, so no device
    holds the whole model. The host still holds
    one converted copy per process. In a multi-process run every process calls it with the same
    ``path`` (a shared or replicated file system). Returns ``(params, config)``.
    """
    import transformers

    path = Path(path)
    if not (path / "config.json").exists():
        raise ValueError(f"{path} is not an HF checkpoint directory (no config.json)")
    hf_config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    config = hf.config_from_hf(hf_config)
    if dtype is not None:
        config = dataclasses.replace(config, dtype=dtype, param_dtype=dtype)
    host = hf.hf_to_params(hf.read_weights(path, allow_pickle), config)
    return sh.shard_params(host, logical_axes(config), mesh, rules), config


def _out_spec(logical: tuple[str | None, ...], dims: tuple[int, ...], mesh: Mesh, rules) -> Any:
    """Mesh spec of an output whose batch dimension (``-1`` in ``dims``) is assumed divisible
    by ``data * fsdp`` (the inputs' batch sharding already requires it)."""
    n_batch = math.prod(mesh.shape[a] for a in sh.batch_axes(mesh))
    shape = tuple(n_batch if d == -1 else d for d in dims)
    return NamedSharding(mesh, sh.logical_to_mesh_spec(PartitionSpec(*logical), shape, mesh, rules))


def jit_forward(
    config: ModelConfig, mesh: Mesh | None = None, rules: Rules | None = None
) -> Callable[..., jax.Array]:
    """Jitted full forward pass to the model's head: ``fn(params, tokens_BT, mask_BT)``.

    ``tokens_BT`` int, ``mask_BT`` 1 on real tokens (left or right padding; positions are the
    exclusive cumsum of the mask). Returns float ``[B, T, V]`` LM logits for ``head="lm"`` or
    ``[B, T, num_labels]`` scores for ``head="score"``, in the compute dtype; pad positions are
    finite but meaningless. With a ``mesh``: params are expected with :func:`param_shardings`,
    tokens/mask batch-sharded (``B`` divisible by ``data * fsdp``), and the output is sharded
    over the batch (and the vocabulary over ``tensor`` where it divides).
    """

    def run(params: Any, tokens_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
        mask_BT = jnp.asarray(mask_BT, bool)
        hidden, _ = forward(params, config, tokens_BT, _positions(mask_BT), mask_BT)
        if config.head == "score":
            return score(params, config, hidden)
        return lm_logits(params, config, hidden)

    if mesh is None:
        return sh.jit_with_rules(run, None, rules)
    batch = sh.batch_sharding(mesh, 2)
    if config.head == "score":
        out = _out_spec(("batch",), (-1, 1, config.num_labels), mesh, rules)
    else:
        out = _out_spec(("batch", "length", "act_vocab"), (-1, 1, config.vocab_size), mesh, rules)
    return sh.jit_with_rules(
        run,
        mesh,
        rules,
        in_shardings=(param_shardings(config, mesh, rules), batch, batch),
        out_shardings=out,
    )
