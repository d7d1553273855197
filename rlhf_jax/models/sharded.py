"""Model-specific sharding: parameter shardings, sharded init, a jitted forward (sharded
loading: `models.load(path, mesh=mesh)`).

The parallelism layer (`rlhf_jax.sharding`: meshes, logical-axis rules, placement,
`jit_with_rules`) knows nothing about models; this module applies it to `ModelConfig` models
through their logical axes (`logical_axes`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rlhf_jax import sharding as sh
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
