"""Device mesh, logical-axis rules, sharded init and batch placement.

Models annotate parameters and activations with *logical* axis names ("embed", "mlp", "batch",
...). A rule table maps each logical name onto *mesh* axes of a 3-D mesh
``("data", "fsdp", "tensor")``:

- ``data``: pure data parallelism (params replicated, batch split);
- ``fsdp``: the batch is split *and* parameters / optimizer state are sharded along their
  ``embed`` dimension (ZeRO-3 / FSDP style; XLA inserts the all-gathers);
- ``tensor``: Megatron-style tensor parallelism over heads, MLP hidden units and vocabulary.

Everything here is a plain function over pytrees and depends on jax and flax only; the
model-specific entry points (parameter shardings, sharded init and loading, jitted forward) are in
`rlhf_jax.models.sharded`, the jitted sampler in `rlhf_jax.sampling`. The typical flow is::

    mesh = make_mesh(MeshConfig(data=-1, fsdp=2))
    params = sharded_init(model.init, None, mesh, DEFAULT_RULES, key, tokens_BT)
    batch = place_batch(host_batch, mesh)
    with with_rules(mesh, DEFAULT_RULES):
        logits = jax.jit(model.apply)(params, batch["tokens"])

Sharding decisions are made per array and never fail on awkward shapes: a dimension that the
chosen mesh axes do not divide (``kv_heads=2`` over ``tensor=4``, a tiny vocabulary) is
replicated instead, so results are always correct, only less sharded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

__all__ = [
    "AXIS_NAMES",
    "BATCH_AXES",
    "DEFAULT_RULES",
    "MeshConfig",
    "MeshJit",
    "Rules",
    "batch_axes",
    "batch_sharding",
    "constrain",
    "constrain_batch",
    "initialize_distributed",
    "is_main_process",
    "jit_with_rules",
    "local_batch_slice",
    "logical_to_mesh_spec",
    "logical_to_sharding",
    "make_mesh",
    "make_rules",
    "optimizer_state_shardings",
    "place_batch",
    "place_replicated",
    "replicated",
    "shard_params",
    "sharded_init",
    "with_rules",
]

AXIS_NAMES: tuple[str, str, str] = ("data", "fsdp", "tensor")
"""Mesh axis names, outermost first. ``tensor`` is innermost so it maps onto the fastest links."""

BATCH_AXES: tuple[str, str] = ("data", "fsdp")
"""Mesh axes that split the leading (batch) dimension of a batch."""

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

DEFAULT_RULES: Rules = (
    # Parameter axes.
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    # Activation axes.
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("cache_length", None),
)
"""Logical axis name -> mesh axes. Earlier rules win when one name appears twice."""


# --------------------------------------------------------------------------------------------
# Mesh
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Sizes of the ``("data", "fsdp", "tensor")`` mesh axes.

    At most one size may be ``-1``, meaning "all remaining devices". The default puts every
    device on ``data`` (pure data parallelism).
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self) -> None:
        sizes = self.sizes()
        for name, size in zip(AXIS_NAMES, sizes, strict=True):
            if isinstance(size, bool) or not isinstance(size, int):
                raise TypeError(f"MeshConfig.{name} must be an int, got {size!r}")
            if size != -1 and size < 1:
                raise ValueError(f"MeshConfig.{name} must be >= 1 or -1 (the rest), got {size}")
        if sizes.count(-1) > 1:
            raise ValueError(
                f"At most one MeshConfig axis may be -1 (the rest), got "
                f"data={self.data}, fsdp={self.fsdp}, tensor={self.tensor}"
            )

    def sizes(self) -> tuple[int, int, int]:
        """The configured sizes ``(data, fsdp, tensor)``, possibly containing ``-1``."""
        return (self.data, self.fsdp, self.tensor)

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        """Concrete axis sizes for ``num_devices`` devices; raises ``ValueError`` if impossible."""
        sizes = self.sizes()
        known = math.prod(s for s in sizes if s != -1)
        desc = f"data={self.data}, fsdp={self.fsdp}, tensor={self.tensor}"
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(
                    f"MeshConfig({desc}) cannot use {num_devices} devices: the fixed axes need a "
                    f"multiple of {known} devices. Choose axis sizes whose product divides "
                    f"{num_devices}."
                )
            data, fsdp, tensor = (num_devices // known if s == -1 else s for s in sizes)
            return (data, fsdp, tensor)
        if known != num_devices:
            raise ValueError(
                f"MeshConfig({desc}) needs {known} devices but {num_devices} are available. "
                f"Make data*fsdp*tensor equal {num_devices}, or set one axis to -1 to use the "
                f"remaining devices."
            )
        return sizes


def make_mesh(config: MeshConfig | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """Build a ``("data", "fsdp", "tensor")`` mesh over ``devices`` (default: all devices).

    The mesh uses ``AxisType.Auto`` axes, i.e. classic GSPMD propagation: shardings are given
    at jit boundaries (``in_shardings``/``out_shardings``) and by ``with_sharding_constraint``.
    In a multi-process run ``devices`` defaults to the global device list, so every process
    must build the same mesh.
    """
    config = MeshConfig() if config is None else config
    devices = jax.devices() if devices is None else list(devices)
    shape = config.resolve(len(devices))
    return jax.make_mesh(
        shape, AXIS_NAMES, axis_types=(AxisType.Auto,) * len(AXIS_NAMES), devices=devices
    )


# --------------------------------------------------------------------------------------------
# Logical axis rules
# --------------------------------------------------------------------------------------------


def make_rules(
    overrides: Mapping[str, MeshAxes] | None = None, base: Rules = DEFAULT_RULES
) -> Rules:
    """Return ``base`` with ``overrides`` applied.

    A logical name already in ``base`` keeps its position and gets the new mesh axes; new names
    are appended in the mapping's order. Example: ``make_rules({"embed": None})`` turns FSDP
    parameter sharding off, ``make_rules({"act_embed": "tensor"})`` shards the residual stream.
    """
    overrides = dict(overrides or {})
    for name, axes in overrides.items():
        _check_mesh_axes(name, axes)
    rules = [(name, overrides.pop(name, axes)) for name, axes in base]
    rules.extend(overrides.items())
    return tuple(rules)


def _check_mesh_axes(name: str, axes: MeshAxes) -> None:
    ok = axes is None or isinstance(axes, str)
    ok = ok or (isinstance(axes, tuple) and all(isinstance(a, str) for a in axes))
    if not ok:
        raise TypeError(
            f"Rule for {name!r} must map to None, a str or a tuple of str; got {axes!r}"
        )


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_mesh_spec(
    logical_spec: PartitionSpec | Sequence[Any] | None,
    shape: Sequence[int],
    mesh: Mesh,
    rules: Rules | None = None,
) -> PartitionSpec:
    """Translate one logical ``PartitionSpec`` into a mesh ``PartitionSpec`` for ``shape``.

    Semantics, dimension by dimension, left to right:

    - an entry is ``None``, a logical name, or a tuple of logical names (their mesh axes are
      concatenated); a name that is not in ``rules`` but is a mesh axis name maps to itself,
      any other unknown name means "replicated";
    - mesh axes the mesh does not have are ignored (a ``("data",)``-only mesh just works);
    - a mesh axis already used by an earlier dimension of the same spec is skipped, so no
      mesh axis appears twice;
    - of the remaining mesh axes, the longest prefix whose total size divides the dimension is
      used; if none does (``kv_heads=2`` over ``tensor=4``), the dimension is replicated.

    ``None`` and specs of scalars give ``PartitionSpec()`` (replicated). A spec longer than
    ``shape`` is an error; a shorter one leaves the trailing dimensions replicated.
    """
    rule_map: dict[str, MeshAxes] = {}
    for name, axes in DEFAULT_RULES if rules is None else rules:
        rule_map.setdefault(name, axes)
    shape = tuple(shape)
    if logical_spec is None or len(shape) == 0:
        return PartitionSpec()
    logical_spec = tuple(logical_spec)
    if len(logical_spec) > len(shape):
        raise ValueError(
            f"Logical spec {logical_spec} has {len(logical_spec)} entries but the array has "
            f"shape {shape}"
        )
    used: set[str] = set()
    out: list[MeshAxes] = []
    for dim, entry in zip(shape, logical_spec, strict=False):
        names = _as_tuple(entry) if entry is not PartitionSpec.UNCONSTRAINED else ()
        wanted: list[str] = []
        for name in names:
            axes = rule_map[name] if name in rule_map else (name if name in mesh.shape else None)
            wanted.extend(a for a in _as_tuple(axes) if a in mesh.shape and a not in wanted)
        wanted = [a for a in wanted if a not in used]
        while wanted and dim % math.prod(mesh.shape[a] for a in wanted):
            wanted.pop()
        used.update(wanted)
        out.append(None if not wanted else wanted[0] if len(wanted) == 1 else tuple(wanted))
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def _is_spec_leaf(x: Any) -> bool:
    return x is None or isinstance(x, PartitionSpec)


def _unbox(tree: Any) -> Any:
    """Strip Flax ``Partitioned`` metadata boxes, leaving the raw values."""
    return nn.meta.unbox(tree)


def logical_to_sharding(
    logical_specs: Any,
    shapes_or_arrays: Any,
    mesh: Mesh,
    rules: Rules | None = None,
) -> Any:
    """Map a pytree of logical ``PartitionSpec``s to a pytree of ``NamedSharding``s.

    ``logical_specs`` has ``PartitionSpec`` (or ``None``) leaves, e.g. from
    ``nn.get_partition_spec(jax.eval_shape(model.init, ...))``; ``shapes_or_arrays`` has the
    same structure with anything that has a ``.shape`` (arrays, ``jax.ShapeDtypeStruct``;
    Flax metadata boxes are unboxed). See :func:`logical_to_mesh_spec` for the per-array rules,
    including the replicate-on-non-divisible fallback. ``rules=None`` means ``DEFAULT_RULES``.
    """
    shapes = _unbox(shapes_or_arrays)
    return jax.tree.map(
        lambda spec, x: NamedSharding(mesh, logical_to_mesh_spec(spec, _shape(x), mesh, rules)),
        logical_specs,
        shapes,
        is_leaf=_is_spec_leaf,
    )


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
    unboxed_init = lambda *a: _unbox(init_fn(*a))
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
    (``x[index]``, which for a lazy leaf such as :class:`rlhf_jax.models.hf.LazyLeaf` reads and
    converts only that slice), and the host holds one slice at a time (devices with the same
    slice share one read). So the full model is never materialised on one device, nor on the
    host beyond what the leaves themselves hold. In a multi-process run every process passes
    the same (host, possibly lazy) pytree and only reads the slices its devices need. ``dtype``
    optionally casts each slice on the host (e.g. to ``jnp.bfloat16``). Returns a pytree of
    ``jax.Array`` with the same structure.
    """
    params = _unbox(params)
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


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes that split a batch's leading dimension (`BATCH_AXES` present in `mesh`)."""
    return tuple(a for a in BATCH_AXES if a in mesh.shape)


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
        size = math.prod(mesh.shape[a] for a in _as_tuple(axes))
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
        shape = _shape(leaf)
        for n in lengths:
            if n > len(path):
                continue
            sharding = by_path.get(tuple(path[len(path) - n :]))
            if sharding is not None:
                if _fits(sharding.spec, shape, mesh):
                    return NamedSharding(mesh, sharding.spec)
                return rep
        return rep

    return jax.tree_util.tree_map_with_path(pick, _unbox(opt_state_shapes))


# --------------------------------------------------------------------------------------------
# Context for logical constraints inside models
# --------------------------------------------------------------------------------------------


def _flax_rules(mesh: Mesh, rules: Rules) -> Rules:
    """Rules restricted to the mesh's axes, as Flax's ``logical_axis_rules`` expects."""
    out = []
    for name, axes in rules:
        kept = tuple(a for a in _as_tuple(axes) if a in mesh.shape)
        out.append((name, None if not kept else kept[0] if len(kept) == 1 else kept))
    return tuple(out)


@contextlib.contextmanager
def with_rules(mesh: Mesh, rules: Rules | None = None) -> Iterator[Mesh]:
    """Context in which ``nn.with_logical_constraint`` inside models takes effect under jit.

    Sets ``mesh`` as the current mesh (``jax.set_mesh``) and installs ``rules`` as Flax's
    logical axis rules. Note that inside jit XLA accepts constraints on dimensions the mesh axes
    do not divide (it pads), so activations need no divisibility fallback. Trace (call the
    jitted function for the first time) inside this context. Yields the mesh.
    """
    rules = DEFAULT_RULES if rules is None else rules
    with jax.set_mesh(mesh), nn.logical_axis_rules(_flax_rules(mesh, rules)):
        yield mesh


class MeshJit:
    """A ``jax.jit``-ed function that is always traced, lowered and run inside
    :func:`with_rules` ``(mesh, rules)``, so the models' ``nn.with_logical_constraint`` calls take
    effect without the caller managing a context. Call it like the function; ``lower``,
    ``trace`` and ``eval_shape`` work as on a jitted function. Arguments are first bound to
    ``fn``'s signature (defaults filled in) and passed positionally, so ``in_shardings`` with
    one entry per positional parameter also cover defaulted and keyword arguments (keyword-only
    parameters, e.g. those a ``functools.partial`` binds, are not passed). ``jitted`` is the
    underlying ``jax.jit`` object (calling it outside the context would trace without the
    constraints).
    """

    def __init__(
        self, fn: Callable[..., Any], mesh: Mesh, rules: Rules | None = None, **jit_kwargs: Any
    ) -> None:
        self.mesh = mesh
        self.rules = DEFAULT_RULES if rules is None else rules
        self.jitted = jax.jit(fn, **jit_kwargs)
        self._signature = inspect.signature(fn)
        functools.update_wrapper(self, fn)

    def _bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        bound = self._signature.bind(*args, **kwargs)
        # Defaults of positional parameters are passed explicitly; keyword-only ones are left to
        # the function (`functools.partial(fn, config=...)` shows its bound keywords as
        # keyword-only defaults: passing them would make them traced arguments).
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        for name, param in self._signature.parameters.items():
            if param.kind in positional and name not in bound.arguments:
                if param.default is not inspect.Parameter.empty:
                    bound.arguments[name] = param.default
        return bound.args, bound.kwargs

    def _run(self, method: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        args, kwargs = self._bind(args, kwargs)
        with with_rules(self.mesh, self.rules):
            return method(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(self.jitted, args, kwargs)

    def lower(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(self.jitted.lower, args, kwargs)

    def trace(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(self.jitted.trace, args, kwargs)

    def eval_shape(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(self.jitted.eval_shape, args, kwargs)


def jit_with_rules(
    fn: Callable[..., Any], mesh: Mesh | None = None, rules: Rules | None = None, **jit_kwargs: Any
) -> Callable[..., Any]:
    """``jax.jit(fn, **jit_kwargs)``; with a ``mesh``, a :class:`MeshJit` that traces and runs
    inside ``with_rules(mesh, rules)`` (``rules=None``: ``DEFAULT_RULES``)."""
    if mesh is None:
        if rules is not None:
            raise ValueError("jit_with_rules: rules were given without a mesh; pass mesh= too")
        return jax.jit(fn, **jit_kwargs)
    return MeshJit(fn, mesh, rules, **jit_kwargs)


# --------------------------------------------------------------------------------------------
# Constraints inside steps
# --------------------------------------------------------------------------------------------


def _current_mesh_and_rules() -> tuple[Any, Rules] | None:
    """The mesh and logical-axis rules of the enclosing :func:`with_rules` (or ``jax.set_mesh``:
    then ``DEFAULT_RULES``); None outside any mesh context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    rules = tuple(nn.get_logical_axis_rules()) or DEFAULT_RULES
    return mesh, rules


def constrain(tree: Any, logical_specs: Any) -> Any:
    """``tree`` with every leaf constrained (``jax.lax.with_sharding_constraint``) to the mesh
    spec its logical spec gives on the current mesh, with the replicate-on-non-divisible fallback
    of :func:`logical_to_mesh_spec`: a tree constrained by a model's parameter axes
    (``models.logical_axes``) gets exactly the parameters' shardings (``param_shardings``).

    Use it inside steps for what propagation gets wrong, e.g. a gradient accumulator carried
    through a ``lax.scan`` (like the params, not a full copy per device). It takes effect when
    traced inside :func:`with_rules` (a :class:`MeshJit`, or a ``jax.jit`` first called in that
    context); without a mesh context it returns ``tree`` unchanged, so the same function runs on
    one device. ``logical_specs`` is a pytree prefix of ``tree`` with ``PartitionSpec`` (or None)
    leaves.
    """
    context = _current_mesh_and_rules()
    if context is None:
        return tree
    mesh, rules = context

    def one(spec: Any, subtree: Any) -> Any:
        def leaf(x: Any) -> Any:
            mesh_spec = logical_to_mesh_spec(spec, _shape(x), mesh, rules)
            return jax.lax.with_sharding_constraint(x, mesh_spec)

        return jax.tree.map(leaf, subtree)

    return jax.tree.map(one, logical_specs, tree, is_leaf=_is_spec_leaf)


def constrain_batch(tree: Any, axis: int = 0) -> Any:
    """``tree`` with dimension ``axis`` of every leaf split like a batch (over the mesh axes of
    the logical ``"batch"`` rule, ``("data", "fsdp")`` by default), the other dimensions
    replicated; see :func:`constrain` for when it applies. For micro-batches gathered from a
    batch (rows picked by a global permutation), so each device computes on its share of rows.
    As for the models' activation constraints there is no divisibility fallback: XLA pads a
    dimension the axes do not divide (a micro-batch of 4 rows on 8 devices), which costs less
    than every device computing every row."""
    context = _current_mesh_and_rules()
    if context is None:
        return tree
    mesh, rules = context
    rule_map: dict[str, MeshAxes] = {}
    for name, axes in rules:
        rule_map.setdefault(name, axes)
    axes = tuple(a for a in _as_tuple(rule_map.get("batch")) if a in mesh.shape)
    spec = PartitionSpec(*([None] * axis), axes or None)

    def leaf(x: Any) -> Any:
        if np.ndim(x) <= axis:
            return x
        return jax.lax.with_sharding_constraint(x, spec)

    return jax.tree.map(leaf, tree)


# --------------------------------------------------------------------------------------------
# Multi-process
# --------------------------------------------------------------------------------------------


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    try:
        return int(value) if value else None
    except ValueError:
        return None


def _cluster_env_detected() -> bool:
    """Whether a known launcher says this job has more than one process."""
    counts = [
        _env_int("SLURM_STEP_NUM_TASKS") or _env_int("SLURM_NTASKS"),
        _env_int("OMPI_COMM_WORLD_SIZE"),
        len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")),
        _env_int("MEGASCALE_NUM_SLICES"),
    ]
    return any(c is not None and c > 1 for c in counts)


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: int | Sequence[int] | None = None,
) -> bool:
    """Initialise multi-process JAX if this run has several processes; otherwise do nothing.

    Call once per process, before any other JAX work. Multi-process is assumed when
    ``num_processes > 1`` or ``coordinator_address`` is given, when the environment variables
    ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` (with ``JAX_PROCESS_ID``) say so, or when a
    launcher JAX auto-detects reports several processes (SLURM, Open MPI, multi-host Cloud TPU);
    missing arguments are then left to ``jax.distributed.initialize``'s auto-detection.
    ``num_processes=1`` forces single-process. Returns ``True`` when JAX is (now) running
    multi-process. Calling it again after a successful initialisation is a no-op.
    """
    if jax.distributed.is_initialized():
        return True
    if num_processes is None:
        num_processes = _env_int("JAX_NUM_PROCESSES")
    if process_id is None:
        process_id = _env_int("JAX_PROCESS_ID")
    if coordinator_address is None:
        coordinator_address = os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes == 1:
        return False
    multi = (num_processes or 0) > 1 or coordinator_address is not None
    if not multi and not _cluster_env_detected():
        return False
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
    )
    return True


def is_main_process() -> bool:
    """``True`` on process 0 (the one that should log, print and write checkpoints' metadata)."""
    return jax.process_index() == 0
