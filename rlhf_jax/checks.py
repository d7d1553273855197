"""Input validation for the math core: clear errors at trace time or on concrete values."""

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


def check_if_concrete(ok: jax.Array, message: str | Callable[[], str]) -> bool:
    """Raises ValueError(message) when the boolean scalar `ok` is concrete and False.

    Under `jax.jit` (`ok` traced) nothing is checked and False is returned: the caller makes the
    result NaN instead, which the training loops report as a non-finite quantity. A host callback
    would check at run time, but JAX's persistent compilation cache does not store programs with
    host callbacks. Returns True when the check ran.
    """
    try:
        concrete = bool(ok)
    except jax.errors.ConcretizationTypeError:
        return False
    if not concrete:
        raise ValueError(message() if callable(message) else message)
    return True
