"""One process of a multi-process JAX run on localhost CPUs, started by the tests.

Usage (one command per process, same port)::

    python tests/multihost_worker.py --task reduce --coordinator localhost:PORT \
        --num-processes 2 --process-id I --local-devices 2 --out result_I.npz

Each process gets ``--local-devices`` virtual CPU devices and talks to the others through gloo
collectives. A *task* is a function ``(args) -> dict[str, np.ndarray]`` registered in ``TASKS``;
its result is written with ``np.savez`` to ``--out`` (every process writes its own file so the
test can check that all processes agree). Tasks build their inputs with deterministic helpers
(like :func:`reduce_inputs`) that the test also imports to compute the single-process
reference. Add a task (e.g. two PPO iterations) by writing a function and registering it.

Exit codes: 0 ok, 3 gloo CPU collectives unavailable in this jaxlib, anything else an error.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

EXIT_NO_GLOO = 3
REPO_ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------------------------
# Deterministic inputs and the computation, shared with the test's single-process reference.
# --------------------------------------------------------------------------------------------

REDUCE_BATCH, REDUCE_EMBED, REDUCE_OUT = 8, 16, 12


def reduce_inputs() -> dict[str, np.ndarray]:
    """Global inputs of the ``reduce`` task: a batch ``x``/``mask`` and an fsdp-sharded weight."""
    rng = np.random.default_rng(0)
    x_BD = rng.standard_normal((REDUCE_BATCH, REDUCE_EMBED)).astype(np.float32)
    mask_B = (rng.random(REDUCE_BATCH) < 0.6).astype(np.float32)
    mask_B[0] = 1.0
    w_DO = rng.standard_normal((REDUCE_EMBED, REDUCE_OUT)).astype(np.float32)
    return {"x_BD": x_BD, "mask_B": mask_B, "w_DO": w_DO}


def reduce_compute(mesh: Any, batch: dict[str, Any], w_DO: Any) -> dict[str, np.ndarray]:
    """Jitted global computation: a matmul with sharded weights and masked means over the batch.

    ``batch`` is already placed on ``mesh`` (leading axis over data/fsdp); outputs are
    replicated so every process can read them in full.
    """
    import jax
    import jax.numpy as jnp

    from rlhf_jax import sharding as sh

    def f(batch: dict[str, jax.Array], w_DO: jax.Array) -> dict[str, jax.Array]:
        y_BO = batch["x_BD"] @ w_DO
        mask_B = batch["mask_B"]
        masked_mean = jnp.sum(y_BO.sum(-1) * mask_B) / jnp.sum(mask_B) / y_BO.shape[-1]
        col_mean_O = jnp.sum(y_BO * mask_B[:, None], axis=0) / jnp.sum(mask_B)
        return {"y_BO": y_BO, "masked_mean": masked_mean, "col_mean_O": col_mean_O}

    rep = sh.replicated(mesh)
    out_shardings = {"y_BO": rep, "masked_mean": rep, "col_mean_O": rep}
    out = jax.jit(f, out_shardings=out_shardings)(batch, w_DO)
    return {k: np.asarray(v.addressable_data(0)) for k, v in out.items()}


def reduce_shard_inputs(mesh: Any, local_rows: slice | None = None) -> tuple[Any, Any]:
    """Place the ``reduce`` inputs on ``mesh``; ``local_rows`` selects this process's batch rows
    (``None``: the whole batch, single process)."""
    import jax

    from rlhf_jax import sharding as sh

    inputs = reduce_inputs()
    rows = slice(None) if local_rows is None else local_rows
    batch = sh.place_batch({"x_BD": inputs["x_BD"][rows], "mask_B": inputs["mask_B"][rows]}, mesh)
    w_DO = sh.shard_params(
        {"w": inputs["w_DO"]},
        {"w": jax.sharding.PartitionSpec("embed", "mlp")},
        mesh,
        sh.DEFAULT_RULES,
    )["w"]
    return batch, w_DO


# --------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------


def task_reduce(args: argparse.Namespace) -> dict[str, np.ndarray]:
    import jax

    from rlhf_jax import sharding as sh

    mesh = sh.make_mesh(sh.MeshConfig(data=2, fsdp=-1))
    per_process = REDUCE_BATCH // jax.process_count()
    start = jax.process_index() * per_process
    batch, w_DO = reduce_shard_inputs(mesh, slice(start, start + per_process))
    out = reduce_compute(mesh, batch, w_DO)
    out["batch_spec"] = np.asarray(str(batch["x_BD"].sharding.spec))
    out["w_spec"] = np.asarray(str(w_DO.sharding.spec))
    out["process_count"] = np.asarray(jax.process_count())
    out["global_devices"] = np.asarray(jax.device_count())
    out["local_rows"] = np.asarray([start, start + per_process])
    return out


TASKS: dict[str, Callable[[argparse.Namespace], dict[str, np.ndarray]]] = {
    "reduce": task_reduce,
}


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(TASKS), required=True)
    parser.add_argument("--coordinator", required=True, help="host:port of process 0")
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--local-devices", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.local_devices}"
    sys.path.insert(0, str(REPO_ROOT))

    import jax

    jax.config.update("jax_num_cpu_devices", args.local_devices)
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception as e:  # any failure here means "no gloo in this jaxlib"
        print(f"gloo CPU collectives unavailable: {e!r}", file=sys.stderr)
        return EXIT_NO_GLOO

    from rlhf_jax import sharding as sh

    sh.initialize_distributed(
        coordinator_address=args.coordinator,
        num_processes=args.num_processes,
        process_id=args.process_id,
    )
    result = TASKS[args.task](args)
    np.savez(args.out, **result)
    jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(1)
