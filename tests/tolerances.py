"""Float32 tolerances for comparing two computations of the same values.

Two programs that compute the same float32 math in a different order (a chunked scan against one
scan, a sharded program against a single-device one, jit against eager, our model against
PyTorch's) agree only up to rounding, and how the rounding falls depends on the fusion XLA picks
and on the CPU (an AMD EPYC rounds some reductions differently from an Intel Xeon). So a tolerance
is a number of float32 units in the last place (ulps, `EPS32` each) of the *magnitude of the values
compared*, never an absolute figure read off one machine's output:

    |actual - desired| <= ulps * EPS32 * scale,   scale = max |desired| over all values compared

An absolute error scaled to the largest value is the right measure for sums: every element of a
reordered reduction carries an error of a few ulps of the largest partial sum, so small elements
(which cancellation produced) have large *relative* errors that mean nothing. A gradient that is 0
in exact arithmetic (a key bias under softmax) is pure rounding noise of the size of the other
gradients, so trees share one scale by default; `per_leaf=True` gives each leaf its own (metrics
of different units). Pass `scale=` when the largest value compared is not the right magnitude
(e.g. a difference that should be 0).

The budgets below are generous on purpose: a real bug (a wrong mask, an off-by-one position, a
missing temperature) moves values by 1e-2 or more of their scale, 10^4-10^5 ulps; rounding moves
them by tens.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

EPS32 = float(np.finfo(np.float32).eps)  # 1.19e-7: one float32 ulp at 1.0

# The same float32 math reassociated (fusion, chunking, sharding, jit or not): a few ulps per
# reordered reduction, through a handful of them.
REORDERED = 64
# Through a whole (tiny) model, or against another framework (PyTorch's kernels, erf/tanh/exp
# implementations): tens of reductions of width 16-256, each a few ulps of its own scale.
MODEL = 256
# Gradients, and values after an optimiser step: a backward pass sums many products, and an
# element that cancels to near 0 still carries the rounding of its largest terms.
GRADIENT = 1024


def tolerance(desired: Any, ulps: float, scale: float | None = None, floor: float = 0.0) -> float:
    """The absolute tolerance `ulps * EPS32 * max(scale, floor)`; `scale` defaults to
    `max |desired|`."""
    if scale is None:
        values = np.abs(np.asarray(desired, dtype=np.float64))
        scale = float(values.max()) if values.size else 0.0
    return ulps * EPS32 * max(scale, floor)


def _as_array_if_numbers(x: Any) -> Any:
    """A plain list or tuple of scalars is one array, not a tree of scalar leaves."""
    if isinstance(x, list | tuple) and not hasattr(x, "_fields"):
        if all(np.ndim(v) == 0 for v in x):
            return np.asarray(x, dtype=np.float64)
    return x


def assert_f32_close(
    actual: Any,
    desired: Any,
    *,
    ulps: float,
    scale: float | None = None,
    floor: float = 0.0,
    per_leaf: bool = False,
    err_msg: str = "",
) -> None:
    """Asserts two arrays (or pytrees of arrays) agree up to float32 rounding of their magnitude.

    Args:
      actual, desired: arrays or pytrees with the same structure and shapes.
      ulps: the rounding budget in float32 ulps of `scale` (see `REORDERED`, `MODEL`, `GRADIENT`).
      scale: the magnitude the budget is measured in; default `max |desired|` over the tree.
      floor: the smallest scale: for a mean or loss that cancels to near 0, the magnitude of the
        terms it sums (metrics of O(1) log-probs, scores and whitened advantages: 1.0).
      per_leaf: the default scale is each leaf's own `max |desired|` instead of the tree's.
      err_msg: prefixed to the failure message (the leaf's path is added for trees).
    """
    actual, desired = _as_array_if_numbers(actual), _as_array_if_numbers(desired)
    got_leaves = jax.tree_util.tree_leaves_with_path(actual)
    want_leaves = jax.tree_util.tree_leaves_with_path(desired)
    assert len(got_leaves) == len(want_leaves), (
        f"{err_msg}: {len(got_leaves)} leaves against {len(want_leaves)}"
    )
    if scale is None and not per_leaf:
        scale = max((float(np.max(np.abs(w), initial=0.0)) for _, w in want_leaves), default=0.0)
    for (path, got), (_, want) in zip(got_leaves, want_leaves, strict=True):
        want64 = np.asarray(want, dtype=np.float64)
        atol = tolerance(want64, ulps, scale, floor)
        where = f"{err_msg} {jax.tree_util.keystr(path)}".strip()
        np.testing.assert_allclose(
            np.asarray(got, dtype=np.float64),
            want64,
            rtol=0,
            atol=atol,
            err_msg=f"{where} (budget {ulps} float32 ulps of scale {atol / ulps / EPS32:.3g})",
        )
