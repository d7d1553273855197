"""Host-process helpers: reading (possibly sharded, multi-process) device arrays on the host,
scoring each process's own rows with a host function, and the process's memory."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from rlhf_jax.sharding import is_main_process

# jax.monitoring duration events of making a program: tracing to a jaxpr, lowering it to MLIR,
# and XLA's compile (a persistent-cache hit skips the last).
_COMPILE_EVENTS = frozenset(
    {
        "/jax/core/compile/jaxpr_trace_duration",
        "/jax/core/compile/jaxpr_to_mlir_module_duration",
        "/jax/core/compile/backend_compile_duration",
    }
)
_compile_total = [0.0]


@functools.cache
def _listen_to_compiles() -> None:
    def on_event(name: str, seconds: float, **unused) -> None:
        if name in _COMPILE_EVENTS:
            _compile_total[0] += seconds

    jax.monitoring.register_event_duration_secs_listener(on_event)


def compile_seconds() -> float:
    """Seconds this process has spent tracing, lowering and compiling JAX programs since the
    first call of this function (which starts the count). Differences between two calls time the
    compilation inside a stretch of work, e.g. one training iteration."""
    _listen_to_compiles()
    return _compile_total[0]


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (macOS, musl)
        return None


def release_host_memory() -> bool:
    """Returns freed heap memory to the operating system (glibc `malloc_trim(0)`).

    XLA compilation allocates and frees hundreds of MB on the host; glibc keeps the freed pages,
    so without a trim they stay in the process's resident set and add to every later peak (on a
    small model about 400 MB of a 1.1 GB peak). Call it after the first (compiling) step. Returns
    False where there is no `malloc_trim` (non-glibc platforms); nothing else changes.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def to_host(tree: Any) -> Any:
    """Numpy copies of (possibly sharded, multi-process) arrays: the global values."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


def local_rows(x: jax.Array, rows: slice) -> np.ndarray:
    """Rows `rows` of `x`, an array whose leading axis is split over the mesh: this process's own
    rows (`sharding.local_batch_slice`) are read from its own shards (no collective; none of the
    other processes' rows cross the network); all rows (every process passing `slice(None)`)
    are gathered (`to_host`). ValueError for other rows of a multi-process array."""
    n = x.shape[0]
    start, stop, _ = rows.indices(n)
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))[start:stop]
    if (start, stop) == (0, n):
        return np.asarray(to_host(x))
    out: np.ndarray | None = None
    covered = np.zeros(stop - start, bool)
    for shard in x.addressable_shards:
        lo, hi, _ = (shard.index[0] if shard.index else slice(None)).indices(n)
        a, b = max(lo, start), min(hi, stop)
        if a >= b or covered[a - start : b - start].all():
            continue
        data_ = np.asarray(shard.data)
        if out is None:
            out = np.empty((stop - start, *x.shape[1:]), data_.dtype)
        out[a - start : b - start] = data_[a - lo : b - lo]
        covered[a - start : b - start] = True
    if out is None or not covered.all():
        raise ValueError(
            f"rows {start}:{stop} of a batch of {n} are not all on this process's devices; pass "
            "the process's own rows (sharding.local_batch_slice) or all of them"
        )
    return out


def score_rows(
    score: Callable[[], tuple[Any, Mapping[str, float]]], rows: slice, batch_size: int
) -> tuple[np.ndarray, dict[str, float]]:
    """Host reward scores of a global batch of `batch_size` rows, each process scoring only
    `rows` (its own, `sharding.local_batch_slice`; or every row, then no process needs the
    others'). `score() -> (scores of rows, metrics)` runs here; the scores of all processes are
    gathered (a float per row) in row order and each metric (a mean over rows; every process
    scores as many) is averaged over the processes. Returns float32 `[batch_size]` scores and the
    metrics, the same on every process. An exception in any process's `score` is raised in every
    process (the failing one re-raises its own), so none waits forever in a later collective."""
    start, stop, _ = rows.indices(batch_size)
    error: BaseException | None = None
    try:
        out, metrics = score()
        scores = np.asarray(out, np.float32).reshape(-1)
        metrics = {k: float(v) for k, v in metrics.items()}
        if scores.shape != (stop - start,):
            raise ValueError(f"expected {stop - start} scores, got shape {list(scores.shape)}")
    except Exception as err:  # re-raised below, after every process has heard of it
        error, scores, metrics = err, np.zeros(stop - start, np.float32), {}
    if jax.process_count() == 1 or (start, stop) == (0, batch_size):
        if error is not None:
            raise error
        return scores, metrics
    from jax.experimental import multihost_utils

    failed = np.asarray(multihost_utils.process_allgather(np.array(error is not None)))
    if failed.any():
        if error is not None:
            raise error
        bad = ", ".join(str(int(i)) for i in np.flatnonzero(failed))
        raise RuntimeError(f"the reward function failed in process {bad}; see its output")
    keys = sorted(metrics)
    gathered = multihost_utils.process_allgather(
        {
            "start": np.array(start),
            "scores": scores,
            "metrics": np.array([metrics[k] for k in keys], np.float64),
        }
    )
    order = np.argsort(np.asarray(gathered["start"]))
    all_scores = np.concatenate([np.asarray(gathered["scores"])[i] for i in order])
    if all_scores.shape != (batch_size,):
        raise RuntimeError(
            f"the processes scored {all_scores.shape[0]} rows of a batch of {batch_size}"
        )
    means = np.asarray(gathered["metrics"]).mean(axis=0)
    return all_scores, {k: float(v) for k, v in zip(keys, means)}


def gather_to_main(tree: Any) -> Any:
    """The global values of a (possibly sharded, multi-process) pytree as NumPy on process 0
    (e.g. to export it) and None on the others. Leaf by leaf: a process other than 0 holds one
    gathered leaf at a time beyond its shards, and drops it."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    main = is_main_process()
    leaves, treedef = jax.tree.flatten(tree)
    out = []
    for leaf in leaves:
        full = multihost_utils.process_allgather(leaf, tiled=True)
        out.append(np.asarray(full) if main else None)
        del full
    return jax.tree.unflatten(treedef, out) if main else None


def fetch_metrics(device_metrics: Mapping[str, Any]) -> dict[str, float]:
    """An iteration's metrics as host floats, its device arrays fetched as one tree (`to_host`:
    one device-to-host transfer, not one `float()` per key; host numbers such as a reward
    function's metrics are taken as they are). The training loops call it after
    dispatching the next iteration where they can, so the device is never idle while the host
    waits for, logs and checks the metrics."""
    arrays = {k: v for k, v in device_metrics.items() if isinstance(v, jax.Array)}
    fetched = to_host(arrays)
    return {k: float(fetched[k] if k in arrays else v) for k, v in device_metrics.items()}
