"""The ``("data", "fsdp", "tensor")`` device mesh: its axis names, its configuration and its
construction.

- ``data``: pure data parallelism (params replicated, batch split);
- ``fsdp``: the batch is split *and* parameters / optimizer state are sharded along their
  ``embed`` dimension (ZeRO-3 / FSDP style; XLA inserts the all-gathers);
- ``tensor``: Megatron-style tensor parallelism over heads, MLP hidden units and vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import AxisType, Mesh

AXIS_NAMES: tuple[str, str, str] = ("data", "fsdp", "tensor")
"""Mesh axis names, outermost first. ``tensor`` is innermost so it maps onto the fastest links."""

BATCH_AXES: tuple[str, str] = ("data", "fsdp")
"""Mesh axes that split the leading (batch) dimension of a batch."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Sizes of the ``("data", "fsdp", "tensor")`` mesh axes.

    At most one size may be ``-1``, meaning "all remaining devices". The default puts every
    device on ``data`` (pure data parallelism).
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self) -> None:
        sizes = self.sizes()
        for name, size in zip(AXIS_NAMES, sizes, strict=True):
            if isinstance(size, bool) or not isinstance(size, int):
                raise TypeError(f"MeshConfig.{name} must be an int, got {size!r}")
            if size != -1 and size < 1:
                raise ValueError(f"MeshConfig.{name} must be >= 1 or -1 (the rest), got {size}")
        if sizes.count(-1) > 1:
            raise ValueError(
                f"At most one MeshConfig axis may be -1 (the rest), got "
                f"data={self.data}, fsdp={self.fsdp}, tensor={self.tensor}"
            )

    def sizes(self) -> tuple[int, int, int]:
        """The configured sizes ``(data, fsdp, tensor)``, possibly containing ``-1``."""
        return (self.data, self.fsdp, self.tensor)

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        """Concrete axis sizes for ``num_devices`` devices; raises ``ValueError`` if impossible."""
        sizes = self.sizes()
        known = math.prod(s for s in sizes if s != -1)
        desc = f"data={self.data}, fsdp={self.fsdp}, tensor={self.tensor}"
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(
                    f"MeshConfig({desc}) cannot use {num_devices} devices: the fixed axes need a "
                    f"multiple of {known} devices. Choose axis sizes whose product divides "
                    f"{num_devices}."
                )
            data, fsdp, tensor = (num_devices // known if s == -1 else s for s in sizes)
            return (data, fsdp, tensor)
        if known != num_devices:
            raise ValueError(
                f"MeshConfig({desc}) needs {known} devices but {num_devices} are available. "
                f"Make data*fsdp*tensor equal {num_devices}, or set one axis to -1 to use the "
                f"remaining devices."
            )
        return sizes


def make_mesh(config: MeshConfig | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """Build a ``("data", "fsdp", "tensor")`` mesh over ``devices`` (default: all devices).

    The mesh uses ``AxisType.Auto`` axes, i.e. classic GSPMD propagation: shardings are given
    at jit boundaries (``in_shardings``/``out_shardings``) and by ``with_sharding_constraint``.
    In a multi-process run ``devices`` defaults to the global device list, so every process
    must build the same mesh.
    """
    config = MeshConfig() if config is None else config
    devices = jax.devices() if devices is None else list(devices)
    shape = config.resolve(len(devices))
    return jax.make_mesh(
        shape, AXIS_NAMES, axis_types=(AxisType.Auto,) * len(AXIS_NAMES), devices=devices
    )


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes that split a batch's leading dimension (`BATCH_AXES` present in `mesh`)."""
    return tuple(a for a in BATCH_AXES if a in mesh.shape)
