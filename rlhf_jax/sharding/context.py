"""Logical-axis constraints inside jitted steps: the ``with_rules`` context, jitted functions
that trace inside it (``MeshJit``, ``jit_with_rules``), and ``constrain`` / ``constrain_batch``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from rlhf_jax.sharding.rules import (
    DEFAULT_RULES,
    Rules,
    axes_tuple,
    is_spec_leaf,
    leaf_shape,
    logical_to_mesh_spec,
    rules_by_name,
)

# --------------------------------------------------------------------------------------------
# Context for logical constraints inside models
# --------------------------------------------------------------------------------------------


def _flax_rules(mesh: Mesh, rules: Rules) -> Rules:
    """Rules restricted to the mesh's axes, as Flax's ``logical_axis_rules`` expects."""
    out = []
    for name, axes in rules:
        kept = tuple(a for a in axes_tuple(axes) if a in mesh.shape)
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
            mesh_spec = logical_to_mesh_spec(spec, leaf_shape(x), mesh, rules)
            return jax.lax.with_sharding_constraint(x, mesh_spec)

        return jax.tree.map(leaf, subtree)

    return jax.tree.map(one, logical_specs, tree, is_leaf=is_spec_leaf)


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
    batch_rule = rules_by_name(rules).get("batch")
    axes = tuple(a for a in axes_tuple(batch_rule) if a in mesh.shape)
    spec = PartitionSpec(*([None] * axis), axes or None)

    def leaf(x: Any) -> Any:
        if np.ndim(x) <= axis:
            return x
        return jax.lax.with_sharding_constraint(x, spec)

    return jax.tree.map(leaf, tree)
