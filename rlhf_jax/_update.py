"""The minibatch step shared by the PPO and critic-free updates: gradient accumulation over
micro-batches, then optimiser updates that are skipped when anything is not finite."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax


def accumulate_grads(
    grad_fn: Callable[[Any], tuple[Any, dict[str, jax.Array]]],
    params: Any,
    micro_inputs: Any,
    n_micro: int,
) -> tuple[Any, dict[str, jax.Array]]:
    """Mean gradients over `n_micro` micro-batches (the leading axis of `micro_inputs`) and the
    mean of their aux metrics. `grad_fn(one_micro_batch) -> (grads, aux)`; `params` gives the
    gradients' structure. One micro-batch calls it directly (no accumulation buffers), more run
    as a `lax.scan` that adds `grads / n_micro`."""
    if n_micro == 1:
        return grad_fn(jax.tree.map(lambda x: x[0], micro_inputs))

    def step(acc, inputs):
        grads, aux = grad_fn(inputs)
        return jax.tree.map(lambda a, g: a + g / n_micro, acc, grads), aux

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, aux = jax.lax.scan(step, zeros, micro_inputs)
    return grads, jax.tree.map(jnp.mean, aux)


def apply_if_finite(
    models: Sequence[tuple[optax.GradientTransformation, Any, Any, Any]], loss: jax.Array
) -> tuple[list[tuple[Any, Any]], jax.Array, list[jax.Array]]:
    """Applies one optimiser step per `(tx, grads, opt_state, params)`, all or none.

    The step is skipped (params and optimiser moments unchanged) when `loss` or any
    gradient norm is not finite; the norms are `optax.tree.norm`, so an inf or NaN anywhere in
    a gradient makes its norm non-finite (as does a finite gradient whose squares overflow, which
    global-norm clipping could not use either). A `lax.cond`, so a skipped step costs nothing.
    A skipped step still advances the learning-rate schedules' step counters (not Adam's), as
    PyTorch's scheduler steps past an optimiser step that a gradient scaler skipped, so the
    schedule keeps following the iteration.

    Returns `[(params, opt_state), ...]`, `ok` (bool scalar, the step was applied) and the
    gradient norms.
    """
    norms = [optax.tree.norm(grads) for _, grads, _, _ in models]
    ok = jnp.isfinite(loss)
    for norm in norms:
        ok = ok & jnp.isfinite(norm)

    def apply(_):
        out = []
        for tx, grads, opt_state, params in models:
            updates, opt_state = tx.update(grads, opt_state, params)
            out.append((optax.apply_updates(params, updates), opt_state))
        return out

    def keep(_):
        return [(params, _advance_schedules(opt_state)) for _, _, opt_state, params in models]

    return jax.lax.cond(ok, apply, keep, None), ok, norms


def _is_schedule_state(node: Any) -> bool:
    return isinstance(node, optax.ScaleByScheduleState)


def _advance_schedules(opt_state: Any) -> Any:
    """`opt_state` with the step counter of every `scale_by_schedule` (the learning-rate schedule
    inside `optax.adamw(schedule)`) advanced by one."""
    return jax.tree.map(
        lambda node: (
            node._replace(count=optax.safe_increment(node.count))
            if _is_schedule_state(node)
            else node
        ),
        opt_state,
        is_leaf=_is_schedule_state,
    )
