"""Multi-process runs: initialising JAX's distributed runtime when a launcher asks for it, and
which process is the main one."""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax


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
