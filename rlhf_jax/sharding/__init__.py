"""Device mesh, logical-axis rules, sharded init, batch placement and constraints inside steps.

Models annotate parameters and activations with *logical* axis names ("embed", "mlp", "batch",
...). A rule table maps each logical name onto *mesh* axes of a 3-D mesh
``("data", "fsdp", "tensor")``:

- ``data``: pure data parallelism (params replicated, batch split);
- ``fsdp``: the batch is split *and* parameters / optimizer state are sharded along their
  ``embed`` dimension (ZeRO-3 / FSDP style; XLA inserts the all-gathers);
- ``tensor``: Megatron-style tensor parallelism over heads, MLP hidden units and vocabulary.

Everything here is a plain function over pytrees and depends on jax and flax only (``mesh``: the
mesh and its config; ``rules``: logical-axis rules and logical -> mesh specs; ``placement``:
sharded init, parameter / batch / replicated placement, optimizer-state shardings; ``context``:
``with_rules``, ``MeshJit``, ``constrain``; ``distributed``: multi-process setup). The
model-specific entry points (parameter shardings, sharded init and loading, jitted forward) are in
`rlhf_jax.models.sharded`, the jitted sampler in `rlhf_jax.sampling`. The typical flow is::

    mesh = make_mesh(MeshConfig(data=-1, fsdp=2))
    params = sharded_init(model.init, None, mesh, DEFAULT_RULES, key, tokens_BT)
    batch = place_batch(host_batch, mesh)
    with with_rules(mesh, DEFAULT_RULES):
        logits = jax.jit(model.apply)(params, batch["tokens"])

Sharding decisions are made per array and never fail on awkward shapes: a dimension that the
chosen mesh axes do not divide (``kv_heads=2`` over ``tensor=4``, a tiny vocabulary) is
replicated instead, so results are always correct, only less sharded.
"""

from rlhf_jax.sharding.context import (
    MeshJit,
    constrain,
    constrain_batch,
    jit_with_rules,
    with_rules,
)
from rlhf_jax.sharding.distributed import initialize_distributed, is_main_process
from rlhf_jax.sharding.mesh import AXIS_NAMES, BATCH_AXES, MeshConfig, batch_axes, make_mesh
from rlhf_jax.sharding.placement import (
    batch_sharding,
    local_batch_slice,
    optimizer_state_shardings,
    place_batch,
    place_replicated,
    replicated,
    shard_params,
    sharded_init,
)
from rlhf_jax.sharding.rules import (
    DEFAULT_RULES,
    MeshAxes,
    Rules,
    logical_to_mesh_spec,
    logical_to_sharding,
    make_rules,
)

__all__ = [
    "AXIS_NAMES",
    "BATCH_AXES",
    "DEFAULT_RULES",
    "MeshConfig",
    "MeshAxes",
    "MeshJit",
    "Rules",
    "batch_axes",
    "batch_sharding",
    "constrain",
    "constrain_batch",
    "initialize_distributed",
    "is_main_process",
    "jit_with_rules",
    "local_batch_slice",
    "logical_to_mesh_spec",
    "logical_to_sharding",
    "make_mesh",
    "make_rules",
    "optimizer_state_shardings",
    "place_batch",
    "place_replicated",
    "replicated",
    "shard_params",
    "sharded_init",
    "with_rules",
]
