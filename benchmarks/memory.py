"""Per-device memory of PPO's four models (policy + AdamW, value + AdamW, reference, reward)
under FSDP / tensor parallelism, against one unsharded copy, on 8 virtual CPU devices.

    python3 benchmarks/memory.py                      # Llama 8 layers, hidden 512 (abstract)
    python3 benchmarks/memory.py --layers 32 --hidden 4096 --intermediate 11008 --vocab 32000 \
        --heads 32 --kv-heads 32 --real-layers 0      # a 7B shape, abstract only

1. Abstract (nothing allocated): the shapes of the PPO state and frozen params come from
   `jax.eval_shape`, their shardings from `rlhf_jax.core.rl_shardings`; a device's bytes are the
   sum over arrays of `prod(sharding.shard_shape(shape)) * itemsize`.
2. Real arrays, for a smaller config: params are born sharded (`sharded_init_params`), the
   state from `jit_init_state`, and the bytes each device actually holds are summed over
   `addressable_shards`. They must equal the abstract figures for the same config.

Activations, the KV cache and XLA temporaries are not counted; neither is the all-gathered
layer that FSDP materialises transiently inside a step.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
from collections.abc import Iterable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402

from rlhf_jax import core, models, run_setup  # noqa: E402
from rlhf_jax import sharding as sh  # noqa: E402
from rlhf_jax.algorithms import PPOConfig  # noqa: E402

MESHES = {
    "8x1x1 (data)": sh.MeshConfig(data=8, fsdp=1, tensor=1),
    "1x8x1 (fsdp)": sh.MeshConfig(data=1, fsdp=8, tensor=1),
    "2x2x2": sh.MeshConfig(data=2, fsdp=2, tensor=2),
    "1x2x4": sh.MeshConfig(data=1, fsdp=2, tensor=4),
}
COMPONENTS = (
    "policy params",
    "policy AdamW",
    "value params",
    "value AdamW",
    "reference",
    "reward",
)
MiB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument(
        "--frozen-dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="storage of the reference and reward models (models.frozen_dtype); trained params "
        "and AdamW moments are always float32",
    )
    p.add_argument(
        "--real-layers", type=int, default=4, help="layers of the placed config (0: skip)"
    )
    p.add_argument("--real-hidden", type=int, default=256)
    p.add_argument("--json", default=None, help="write results to this JSON file")
    return p.parse_args(argv)


def ppo_setup(policy: models.ModelConfig) -> tuple[PPOConfig, core.RLModels]:
    reward = dataclasses.replace(policy, head="score")
    return PPOConfig(batch_size=8), core.RLModels(policy=policy, value=reward, reward=reward)


def abstract_parts(
    config: PPOConfig, ppo_models: core.RLModels, frozen_dtype: str
) -> dict[str, Any]:
    """Component name -> pytree of `ShapeDtypeStruct`."""

    def params(model_config: models.ModelConfig, dtype: str = "float32") -> Any:
        model_config = dataclasses.replace(model_config, param_dtype=dtype)
        return models.param_shapes(model_config)

    state = jax.eval_shape(
        lambda p, v: core.init_state(p, config, value_params=v),
        params(ppo_models.policy),
        params(ppo_models.value),
    )
    frozen = core.FrozenParams(
        params(ppo_models.policy, frozen_dtype), params(ppo_models.reward, frozen_dtype)
    )
    return _parts(state, frozen)


def _parts(state: Any, frozen: Any) -> dict[str, Any]:
    return dict(
        zip(
            COMPONENTS,
            (
                state.policy_params,
                state.opt_state,
                state.value_params,
                state.value_opt_state,
                frozen.ref,
                frozen.reward,
            ),
            strict=True,
        )
    )


def nbytes(shape: Iterable[int], dtype: Any) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize


def unsharded_bytes(parts: dict[str, Any]) -> dict[str, int]:
    return {
        name: sum(nbytes(x.shape, x.dtype) for x in jax.tree.leaves(tree))
        for name, tree in parts.items()
    }


def per_device_bytes(parts: dict[str, Any], shardings: dict[str, Any]) -> dict[str, int]:
    """Bytes one device holds (shardings are even, so every device holds the same)."""
    out = {}
    for name, tree in parts.items():
        leaves = jax.tree.leaves(tree)
        shard_leaves = jax.tree.leaves(shardings[name])
        assert len(leaves) == len(shard_leaves), name
        out[name] = sum(
            nbytes(s.shard_shape(x.shape), x.dtype)
            for x, s in zip(leaves, shard_leaves, strict=True)
        )
    return out


def measured_bytes(parts: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(min, max) over devices of the bytes held in `addressable_shards`."""
    out = {}
    for name, tree in parts.items():
        per_device: dict[Any, int] = {d: 0 for d in jax.devices()}
        for x in jax.tree.leaves(tree):
            for shard in x.addressable_shards:
                per_device[shard.device] += shard.data.nbytes
        out[name] = (min(per_device.values()), max(per_device.values()))
    return out


def table(title: str, columns: dict[str, dict[str, int]]) -> str:
    names = list(columns)
    width = max(14, *(len(n) + 2 for n in names))
    lines = [title, f"{'MiB per device':<16}" + "".join(f"{n:>{width}}" for n in names)]
    for comp in (*COMPONENTS, "total"):
        row = []
        for n in names:
            values = columns[n]
            v = sum(values.values()) if comp == "total" else values[comp]
            row.append(f"{v / MiB:>{width}.2f}")
        lines.append(f"{comp:<16}" + "".join(row))
    base = sum(columns[names[0]].values())
    lines.append(
        f"{'x unsharded':<16}"
        + "".join(f"{sum(columns[n].values()) / base:>{width}.3f}" for n in names)
    )
    return "\n".join(lines)


def abstract_report(
    policy: models.ModelConfig, frozen_dtype: str
) -> tuple[str, dict[str, dict[str, int]]]:
    config, ppo_models = ppo_setup(policy)
    parts = abstract_parts(config, ppo_models, frozen_dtype)
    columns = {"unsharded": unsharded_bytes(parts)}
    for name, mesh_config in MESHES.items():
        mesh = sh.make_mesh(mesh_config)
        s = core.rl_shardings(config, ppo_models, mesh)
        columns[name] = per_device_bytes(parts, _parts(s.state, s.frozen))
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(parts["policy params"]))
    title = (
        f"Llama L={policy.num_layers} D={policy.hidden_size} F={policy.intermediate_size} "
        f"H={policy.num_heads}/{policy.num_kv_heads} V={policy.vocab_size}, "
        f"{n_params / 1e6:.1f}M params per model, float32 trained params and AdamW moments, "
        f"{frozen_dtype} frozen models"
    )
    return table(title, columns), columns


def real_report(policy: models.ModelConfig, frozen_dtype: str) -> tuple[str, dict[str, Any]]:
    """Place real arrays on the FSDP mesh and compare to the abstract figures."""
    config, ppo_models = ppo_setup(policy)
    mesh = sh.make_mesh(MESHES["1x8x1 (fsdp)"])
    policy_params = models.sharded_init_params(ppo_models.policy, jax.random.key(0), mesh)
    reward_params = models.sharded_init_params(ppo_models.reward, jax.random.key(1), mesh)
    state = core.jit_init_state(config, ppo_models, mesh)(policy_params, reward_params)
    frozen = run_setup.frozen_params((policy_params, reward_params), frozen_dtype)
    parts = _parts(state, core.FrozenParams(*frozen))
    measured = measured_bytes(parts)
    s = core.rl_shardings(config, ppo_models, mesh)
    predicted = per_device_bytes(
        abstract_parts(config, ppo_models, frozen_dtype), _parts(s.state, s.frozen)
    )
    full = unsharded_bytes(parts)
    lines = [
        f"Real arrays on 1x8x1 (fsdp), Llama L={policy.num_layers} D={policy.hidden_size} "
        f"V={policy.vocab_size} (frozen models {frozen_dtype}): bytes held per device "
        "(addressable_shards)",
        f"{'component':<16}{'unsharded MiB':>15}{'min/device':>14}{'max/device':>14}"
        f"{'predicted':>12}{'fraction':>10}",
    ]
    for comp in COMPONENTS:
        lo, hi = measured[comp]
        lines.append(
            f"{comp:<16}{full[comp] / MiB:>15.3f}{lo / MiB:>14.3f}{hi / MiB:>14.3f}"
            f"{predicted[comp] / MiB:>12.3f}{hi / full[comp]:>10.3f}"
        )
        if lo != hi or hi != predicted[comp]:
            raise AssertionError(f"{comp}: measured {lo}..{hi} bytes, predicted {predicted[comp]}")
    total_hi = sum(hi for _, hi in measured.values())
    lines.append(
        f"{'total':<16}{sum(full.values()) / MiB:>15.3f}{'':>14}{total_hi / MiB:>14.3f}"
        f"{sum(predicted.values()) / MiB:>12.3f}{total_hi / sum(full.values()):>10.3f}"
    )
    return "\n".join(lines), {"measured": measured, "predicted": predicted, "unsharded": full}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    dtypes = dict(dtype="float32", param_dtype="float32")
    big = common.llama_config(
        layers=args.layers,
        hidden=args.hidden,
        intermediate=args.intermediate,
        heads=args.heads,
        kv_heads=args.kv_heads,
        vocab=args.vocab,
        **dtypes,
    )
    text, columns = abstract_report(big, args.frozen_dtype)
    print(text)
    results: dict[str, Any] = {"abstract": columns}
    if args.real_layers:
        hidden = args.real_hidden
        small = common.llama_config(
            layers=args.real_layers, hidden=hidden, intermediate=4 * hidden, heads=4, vocab=8192,
            **dtypes,
        )  # fmt: skip
        print()
        text, columns = abstract_report(small, args.frozen_dtype)
        print(text)
        print()
        text, real = real_report(small, args.frozen_dtype)
        print(text)
        results["real"] = real
    if args.json:
        common.write_json(args.json, "memory", vars(args), results)


if __name__ == "__main__":
    main()
