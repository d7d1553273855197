"""Input validation for the math core: clear errors at trace time, or at run time by callback."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def check_same_shape(where: str, **arrays: jax.typing.ArrayLike) -> None:
    """Raises ValueError naming every argument when the given arrays differ in shape."""
    shapes = {name: tuple(np.shape(a)) for name, a in arrays.items()}
    if len(set(shapes.values())) > 1:
        described = ", ".join(f"{name}{list(shape)}" for name, shape in shapes.items())
        raise ValueError(f"{where}: arguments must have the same shape, got {described}")


def check_floating(where: str, name: str, x: jax.typing.ArrayLike) -> None:
    """Raises TypeError when `x` is not a floating-point array (e.g. integer logits)."""
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise TypeError(
            f"{where}: {name} must be a floating-point array, got dtype {jnp.result_type(x)}; "
            f"cast it with .astype(jnp.float32)"
        )


def runtime_check(ok: jax.Array, message: str | Callable[[], str]) -> None:
    """Raises ValueError(message) when the boolean scalar `ok` is False.

    Checked immediately for concrete values; under `jax.jit` the check runs on the host through a
    `jax.debug.callback` and the error surfaces as a runtime error carrying the message.
    """

    def _raise_if_not(ok_value: np.ndarray) -> None:
        if not bool(ok_value):
            raise ValueError(message() if callable(message) else message)

    try:
        concrete = bool(ok)
    except jax.errors.ConcretizationTypeError:
        jax.debug.callback(_raise_if_not, ok)
        return
    _raise_if_not(np.asarray(concrete))
