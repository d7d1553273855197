"""Logical-axis rules and their translation into mesh ``PartitionSpec``s / ``NamedSharding``s.

Models annotate parameters and activations with *logical* axis names ("embed", "mlp", "batch",
...); a rule table maps each logical name onto mesh axes of the ``("data", "fsdp", "tensor")``
mesh. Translation never fails on awkward shapes: a dimension that the chosen mesh axes do not
divide (``kv_heads=2`` over ``tensor=4``, a tiny vocabulary) is replicated instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

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


def axes_tuple(axes: MeshAxes) -> tuple[str, ...]:
    """A rule's mesh axes (None, a name or a tuple of names) as a tuple of names."""
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def rules_by_name(rules: Rules) -> dict[str, MeshAxes]:
    """``rules`` as a mapping from logical name to mesh axes; the earlier rule wins."""
    out: dict[str, MeshAxes] = {}
    for name, axes in rules:
        out.setdefault(name, axes)
    return out


def leaf_shape(x: Any) -> tuple[int, ...]:
    """The shape of an array, a ``jax.ShapeDtypeStruct`` or anything ``np.shape`` reads."""
    return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def is_spec_leaf(x: Any) -> bool:
    """Leaves of a pytree of logical specs: ``PartitionSpec`` or ``None``."""
    return x is None or isinstance(x, PartitionSpec)


def unbox(tree: Any) -> Any:
    """Strip Flax ``Partitioned`` metadata boxes, leaving the raw values."""
    return nn.meta.unbox(tree)


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
    rule_map = rules_by_name(DEFAULT_RULES if rules is None else rules)
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
        names = axes_tuple(entry) if entry is not PartitionSpec.UNCONSTRAINED else ()
        wanted: list[str] = []
        for name in names:
            axes = rule_map[name] if name in rule_map else (name if name in mesh.shape else None)
            wanted.extend(a for a in axes_tuple(axes) if a in mesh.shape and a not in wanted)
        wanted = [a for a in wanted if a not in used]
        while wanted and dim % math.prod(mesh.shape[a] for a in wanted):
            wanted.pop()
        used.update(wanted)
        out.append(None if not wanted else wanted[0] if len(wanted) == 1 else tuple(wanted))
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


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
    shapes = unbox(shapes_or_arrays)
    return jax.tree.map(
        lambda spec, x: NamedSharding(mesh, logical_to_mesh_spec(spec, leaf_shape(x), mesh, rules)),
        logical_specs,
        shapes,
        is_leaf=is_spec_leaf,
    )
