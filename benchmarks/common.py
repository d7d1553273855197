"""Small helpers shared by the benchmarks: timing, a matmul roofline, memory, threads, JSON output.

Timings on shared machines are noisy: compare implementations measured in the same process,
interleaved (`time_interleaved`), and quote medians.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence of numbers."""
    return float(statistics.median(values))


def time_fn(fn: Callable[..., Any], *args: Any, repeats: int = 5, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of `fn(*args)` for each of `repeats` calls, after `warmup` untimed calls.

    Every call's result goes through `jax.block_until_ready`, so asynchronous dispatch is included
    in the time (torch / numpy results pass through unchanged).
    """
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return times


def time_interleaved(
    fns: dict[Any, Callable[[], Any]],
    *,
    repeats: int = 5,
    warmup: int = 1,
    cpu_out: dict[Any, list[float]] | None = None,
) -> dict[Any, list[float]]:
    """Times several zero-argument callables round-robin (a, b, c, a, b, c, ...), so machine load
    hits them alike. Returns each name's list of `repeats` wall-clock times in seconds.

    If `cpu_out` is given, it receives each name's process CPU seconds per call as well: on an
    oversubscribed machine CPU time tracks the work done far more stably than wall time (but it
    counts spin-waiting threads, so compare it only between similar runtimes, e.g. XLA vs XLA).
    """
    for fn in fns.values():
        for _ in range(warmup):
            jax.block_until_ready(fn())
    times: dict[Any, list[float]] = {name: [] for name in fns}
    cpu: dict[Any, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    if cpu_out is not None:
        cpu_out.update(cpu)
    return times


def measure_matmul_flops(dtype: str = "float32", n: int = 2048, repeats: int = 5) -> float:
    """The machine's measured `jnp.dot` rate in FLOP/s (median over `repeats`) for an n x n x n
    matmul of `dtype`: a practical roofline for the achieved-FLOP/s column."""
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (n, n), jnp.dtype(dtype))
    b = jax.random.normal(key_b, (n, n), jnp.dtype(dtype))
    dot = jax.jit(jnp.dot)
    seconds = median(time_fn(dot, a, b, repeats=repeats, warmup=1))
    return 2.0 * n**3 / seconds


def llama_config(
    *,
    layers: int,
    hidden: int,
    intermediate: int,
    heads: int,
    vocab: int,
    kv_heads: int | None = None,
    max_positions: int = 2048,
    **overrides: Any,
) -> Any:
    """A Llama `ModelConfig` from the benchmark sizes (head_dim = hidden / heads); `overrides`
    replace any other field."""
    from rlhf_jax import models

    fields = dict(
        family="llama",
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads if kv_heads is None else kv_heads,
        head_dim=hidden // heads,
        intermediate_size=intermediate,
        max_position_embeddings=max_positions,
    )
    return models.ModelConfig(**{**fields, **overrides})


def tiny_llama(args: Any, **overrides: Any) -> Any:
    """The peer script's random Llama from the benchmark flags (`--layers --hidden --intermediate
    --heads --vocab --prompt-len --response-len`): `--vocab N` ordinary tokens plus pad (id N)
    and eos (id N + 1). `overrides` replace any `ModelConfig` field."""
    fields = dict(
        max_positions=max(512, args.prompt_len + args.response_len),
        pad_token_id=args.vocab,
        eos_token_id=args.vocab + 1,
    )
    return llama_config(
        layers=args.layers,
        hidden=args.hidden,
        intermediate=args.intermediate,
        heads=args.heads,
        vocab=args.vocab + 2,
        **{**fields, **overrides},
    )


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (`ru_maxrss`: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def set_threads(n: int) -> None:
    """Limits torch to `n` intra-op and (when still allowed) inter-op threads."""
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:  # only settable before the first parallel op
        pass


def environment() -> dict[str, Any]:
    """Versions and machine facts to store next to results."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "numpy": np.__version__,
    }
    for name in ("torch", "transformers", "flax"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            pass
    return info


def write_json(path: str | Path, name: str, args: dict[str, Any], results: dict[str, Any]) -> None:
    """Writes `{"benchmark", "args", "environment", "results", "time"}` to `path` as JSON."""
    record = {
        "benchmark": name,
        "args": args,
        "environment": environment(),
        "results": results,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=float) + "\n")


def top_xla_ops(
    fn: Callable[[], Any], trace_dir: str | Path, calls: int = 3, top: int = 15
) -> list[tuple[str, float, int]]:
    """Runs `fn()` `calls` times under `jax.profiler` and returns the `top` XLA ops (thunks) by
    total time as `(name, ms per call, count per call)`. Names match `compiled.as_text()`, so a
    slow `copy` / `dynamic-slice` fusion can be looked up in the HLO."""
    jax.block_until_ready(fn())
    jax.profiler.start_trace(str(trace_dir))
    for _ in range(calls):
        jax.block_until_ready(fn())
    jax.profiler.stop_trace()
    files = sorted(glob.glob(f"{trace_dir}/plugins/profile/*/*.trace.json.gz"))
    events = json.load(gzip.open(files[-1]))["traceEvents"]
    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for event in events:
        name = event.get("name", "")
        if event.get("ph") != "X" or "::" in name or name.startswith(("$", "Pjit", "while")):
            continue  # keep leaf ops: skip executor, Python and loop-container events
        totals[name][0] += event["dur"] / 1e3
        totals[name][1] += 1
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
    return [(name, ms / calls, count // calls) for name, (ms, count) in ranked]
