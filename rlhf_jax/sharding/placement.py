"""Putting arrays on a mesh: sharded init and loading of parameters, batch and replicated
placement, and optimizer-state shardings that mirror the parameters'.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rlhf_jax.sharding.mesh import batch_axes
from rlhf_jax.sharding.rules import Rules, axes_tuple, leaf_shape, logical_to_sharding, unbox

# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------


def _resolve_logical_specs(logical_specs_or_fn: Any, abstract: Any) -> Any:
    if logical_specs_or_fn is None:
        return nn.get_partition_spec(abstract)
    if callable(logical_specs_or_fn):
        return logical_specs_or_fn(abstract)
    return logical_specs_or_fn


def sharded_init(
    init_fn: Callable[..., Any],
    logical_specs_or_fn: Any,
    mesh: Mesh,
    rules: Rules | None,
    *args: Any,
) -> Any:
    """Run ``init_fn(*args)`` so that every output array is born sharded on ``mesh``.

    ``jax.eval_shape`` gives the output shapes; each output gets a ``NamedSharding`` from its
    logical spec; ``jax.jit(init_fn, out_shardings=...)`` then materialises each shard directly
    on its device (no device ever holds the full model). Flax ``Partitioned`` boxes are removed,
    so the result is a plain pytree of ``jax.Array`` (e.g. ``{"params": {...}}``).

    ``logical_specs_or_fn``: ``None`` to read the logical specs from the Flax
    ``nn.with_logical_partitioning`` metadata, a callable ``abstract_outputs -> specs``, or a
    pytree of logical ``PartitionSpec``s matching the (unboxed) outputs. ``rules=None`` means
    ``DEFAULT_RULES``. With ``jax_threefry_partitionable`` (the default) the values do not
    depend on the mesh.
    """
    abstract = jax.eval_shape(init_fn, *args)
    specs = _resolve_logical_specs(logical_specs_or_fn, abstract)
    shardings = logical_to_sharding(specs, abstract, mesh, rules)
    unboxed_init = lambda *a: unbox(init_fn(*a))
    return jax.jit(unboxed_init, out_shardings=shardings)(*args)


def shard_params(
    params: Any,
    logical_specs: Any,
    mesh: Mesh,
    rules: Rules | None = None,
    *,
    dtype: Any = None,
) -> Any:
    """Place an existing host pytree (e.g. NumPy arrays loaded from a checkpoint) on ``mesh``.

    Each leaf is placed device by device: every addressable device receives only its own slice
    (``x[index]``, which for a lazy leaf such as :class:`rlhf_jax.models.weights.LazyLeaf` reads and
    converts only that slice), and the host holds one slice at a time (devices with the same
    slice share one read). So the full model is never materialised on one device, nor on the
    host beyond what the leaves themselves hold. In a multi-process run every process passes
    the same (host, possibly lazy) pytree and only reads the slices its devices need. ``dtype``
    optionally casts each slice on the host (e.g. to ``jnp.bfloat16``). Returns a pytree of
    ``jax.Array`` with the same structure.
    """
    params = unbox(params)
    shardings = logical_to_sharding(logical_specs, params, mesh, rules)

    def place(x: Any, sharding: NamedSharding) -> jax.Array:
        if not (hasattr(x, "shape") and hasattr(x, "dtype")):
            x = np.asarray(x)
        shape = tuple(x.shape)
        out_dtype = jax.dtypes.canonicalize_dtype(x.dtype if dtype is None else dtype)
        by_index: dict[tuple, tuple[Any, list[Any]]] = {}
        for device, index in sharding.addressable_devices_indices_map(shape).items():
            key = tuple((i.start, i.stop, i.step) if isinstance(i, slice) else i for i in index)
            by_index.setdefault(key, (index, []))[1].append(device)
        arrays = []
        for index, devices in by_index.values():
            host = np.asarray(x[index], dtype=out_dtype)
            placed = [jax.device_put(host, d) for d in devices]
            jax.block_until_ready(placed)  # a transfer in flight keeps `host` alive
            arrays += placed
            del host
        return jax.make_array_from_single_device_arrays(shape, sharding, arrays)

    return jax.tree.map(place, params, shardings)


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


def replicated(mesh: Mesh) -> NamedSharding:
    """A sharding that keeps a full copy of the array on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Sharding for an ``ndim``-dimensional batch array: leading axis split over
    ``("data", "fsdp")``, other axes replicated. ``ndim=0`` gives a replicated sharding."""
    if ndim < 0:
        raise ValueError(f"ndim must be >= 0, got {ndim}")
    if ndim == 0:
        return replicated(mesh)
    return NamedSharding(mesh, PartitionSpec(batch_axes(mesh), *([None] * (ndim - 1))))


def local_batch_slice(mesh: Mesh, global_batch_size: int) -> slice:
    """The rows of a ``global_batch_size`` batch that this process feeds to :func:`place_batch`.

    The rows held by this process's devices under :func:`batch_sharding` (contiguous, as
    ``make_mesh`` lays processes out along the batch axes). Single process: ``slice(0, B)``.
    A data loader reads exactly these rows of each global batch on this process.
    """
    n_shards = math.prod(mesh.shape[a] for a in batch_axes(mesh))
    if global_batch_size < 1 or global_batch_size % n_shards:
        raise ValueError(
            f"global batch size {global_batch_size} is not a positive multiple of "
            f"data*fsdp={n_shards}; pad the batch or change the mesh."
        )
    index_map = batch_sharding(mesh, 1).addressable_devices_indices_map((global_batch_size,))
    rows: set[int] = set()
    for (index,) in index_map.values():
        rows.update(range(*index.indices(global_batch_size)))
    start, stop = min(rows), max(rows) + 1
    if len(rows) != stop - start:
        raise ValueError(
            f"this process's devices hold non-contiguous batch rows of the mesh {dict(mesh.shape)}"
            "; build the mesh with make_mesh (processes laid out along the batch axes)."
        )
    return slice(start, stop)


def place_batch(batch: Any, mesh: Mesh) -> Any:
    """Put a batch pytree on ``mesh`` with its leading axis split over ``("data", "fsdp")``.

    Single process: ``batch`` is the global batch and is ``device_put`` with
    :func:`batch_sharding`. Multi-process: each process passes *its local slice* of the global
    batch (global batch / ``jax.process_count()`` rows, in process-index order) and the global
    array is assembled with ``jax.make_array_from_process_local_data``. Scalar leaves are
    replicated (and must agree across processes). The leading dimension of the global batch
    must be divisible by ``data * fsdp``.
    """
    n_shards = math.prod(mesh.shape[a] for a in batch_axes(mesh))
    multi = jax.process_count() > 1

    def place(x: Any) -> jax.Array:
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        sharding = batch_sharding(mesh, x.ndim)
        if x.ndim == 0:
            return jax.device_put(x, sharding) if not multi else _replicate_global(x, sharding)
        if not multi:
            if x.shape[0] % n_shards:
                raise ValueError(
                    f"Batch leading dimension {x.shape[0]} (shape {x.shape}) is not divisible "
                    f"by data*fsdp={n_shards}; pad the batch or change the mesh."
                )
            return jax.device_put(x, sharding)
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return jax.tree.map(place, batch)


def place_replicated(tree: Any, mesh: Mesh) -> Any:
    """Put a pytree of host arrays (or PRNG keys) on every device of ``mesh`` (a full copy each).
    In a multi-process run every process passes the same values."""
    sharding = replicated(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def place(x: Any) -> jax.Array:
        if jnp.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
            data = _replicate_global(jax.random.key_data(x), sharding)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        return _replicate_global(x, sharding)

    return jax.tree.map(place, tree)


def _replicate_global(x: Any, sharding: NamedSharding) -> jax.Array:
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx], dtype=x.dtype)


# --------------------------------------------------------------------------------------------
# Optimizer state
# --------------------------------------------------------------------------------------------


def _fits(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> bool:
    if len(spec) > len(shape):
        return False
    for dim, axes in zip(shape, spec, strict=False):
        size = math.prod(mesh.shape[a] for a in axes_tuple(axes))
        if dim % size:
            return False
    return True


def optimizer_state_shardings(opt_state_shapes: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for an optax state, mirroring the parameter shardings where the state does.

    ``opt_state_shapes`` is typically ``jax.eval_shape(tx.init, params)``; ``param_shardings``
    is the params pytree with ``NamedSharding`` leaves. A state leaf whose key path *ends with*
    a parameter's key path (e.g. ``[0].mu['params']['dense']['kernel']``) gets that parameter's
    sharding (the longest such parameter path wins), provided the sharding fits the leaf's shape;
    every other leaf (step counts, factored statistics, schedule state) is replicated. This
    handles ``optax.chain``, ``MaskedState`` and ``inject_hyperparams`` without knowing them.
    """
    by_path: dict[tuple[Any, ...], NamedSharding] = {}
    for path, sharding in jax.tree_util.tree_flatten_with_path(param_shardings)[0]:
        by_path[tuple(path)] = sharding
    lengths = sorted({len(p) for p in by_path}, reverse=True)
    rep = replicated(mesh)

    def pick(path: tuple[Any, ...], leaf: Any) -> NamedSharding:
        shape = leaf_shape(leaf)
        for n in lengths:
            if n > len(path):
                continue
            sharding = by_path.get(tuple(path[len(path) - n :]))
            if sharding is not None:
                if _fits(sharding.spec, shape, mesh):
                    return NamedSharding(mesh, sharding.spec)
                return rep
        return rep

    return jax.tree_util.tree_map_with_path(pick, unbox(opt_state_shapes))
