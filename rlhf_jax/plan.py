"""Will a run fit? Compile the trainer's programs for a TPU topology you do not have.

`rlhf-jax plan --config X.yaml --topology v5p-64 [key=value ...]` resolves the run config as
`train` does, takes every model's shape from its `config.json` (no weights, no tokenizer, no
data are read), builds the run's mesh over the topology's devices (`jax.experimental.topologies`,
which needs libtpu: `pip install "jax[tpu]==<installed jax>"`), and lowers and compiles with the
real TPU compiler every program the trainer runs, with the trainer's shardings and donation:

- `rollout`, `score` (with a reward model) and `finish` (experience + update) at the full
  response width (the largest length bucket), and with a reward model the one-jit `iteration`;
  for every algorithm (`--algorithm ppo | rloo | grpo | reinforce++`).

Per program and per chip it reports arguments, outputs, temporaries and the peak (the program's
own buffers plus the run's state that lives outside it, e.g. the reward model during the
rollout), against the chip's HBM; the model FLOPs of one iteration, counted analytically (the
compiler's cost analysis counts a loop body once, not per trip), and what that would take at
40% and 60% of the chips' peak bf16 rate.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from rlhf_jax import config as cfg
from rlhf_jax import models, sharding
from rlhf_jax.core import FrozenParams, RLConfig, RLModels, iteration_programs, jit_iteration
from rlhf_jax.models import lora
from rlhf_jax.run_setup import check_mesh, resolve_models

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation. `hbm` bytes and `peak_bf16` FLOP/s per chip; `cores_in_name`: how many
    TensorCores the `vN-<count>` names count per chip (v4 and v5p name cores, v5e/v6e chips)."""

    name: str
    hbm: int
    peak_bf16: float
    cores_in_name: int
    dims: int  # 2-D (v5e, v6e) or 3-D (v4, v5p) torus


# Per-chip HBM and peak bf16 dense FLOP/s from Google Cloud's TPU system-architecture pages
# (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e): v4 32 GiB 275 TFLOP/s; v5e 16 GiB
# 197 TFLOP/s; v5p 95 GiB 459 TFLOP/s; v6e (Trillium) 32 GiB 918 TFLOP/s.
CHIPS = {
    "v4": Chip("v4", 32 * GiB, 275e12, 2, 3),
    "v5e": Chip("v5e", 16 * GiB, 197e12, 1, 2),
    "v5p": Chip("v5p", 95 * GiB, 459e12, 2, 3),
    "v6e": Chip("v6e", 32 * GiB, 918e12, 1, 2),
}

# GPUs (HBM, dense bf16 FLOP/s without sparsity, from NVIDIA's data sheets): JAX cannot compile
# for a GPU without one, so their plans compile for as many virtual CPU devices (an estimate).
GPUS = {
    "a100": Chip("a100", 80 * 10**9, 312e12, 1, 0),
    "h100": Chip("h100", 80 * 10**9, 989e12, 1, 0),
    "h200": Chip("h200", 141 * 10**9, 989e12, 1, 0),
}

_TORUS_2D = {
    1: "1x1",
    4: "2x2",
    8: "2x4",
    16: "4x4",
    32: "4x8",
    64: "8x8",
    128: "8x16",
    256: "16x16",
}
_TORUS_3D = {
    4: "2x2x1",
    8: "2x2x2",
    16: "2x2x4",
    32: "2x4x4",
    64: "4x4x4",
    128: "4x4x8",
    256: "4x8x8",
    512: "8x8x8",
}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice: `name` as users write it (`v5p-64`), the chip, the chip count and the
    topology string `jax.experimental.topologies` takes (`v5p:2x4x4`)."""

    name: str
    chip: Chip
    chips: int
    topology: str


def parse_topology(name: str) -> Topology:
    """`v5e-16`, `v5p-64`, `v6e-64`, `v4-32` (Cloud TPU names: v4/v5p count TensorCores, two per
    chip; v5e/v6e count chips), or a topology string `v5p:2x4x4`. ValueError otherwise."""
    known = ", ".join(sorted(CHIPS))
    if ":" in name:
        gen, _, shape = name.partition(":")
        if gen not in CHIPS:
            raise ValueError(f"unknown TPU generation {gen!r} in {name!r}; known: {known}")
        try:
            chips = math.prod(int(d) for d in shape.split("x"))
        except ValueError:
            raise ValueError(f"topology {name!r}: expected e.g. v5p:2x4x4") from None
        return Topology(name, CHIPS[gen], chips, name)
    gen, _, count = name.partition("-")
    if gen not in CHIPS or not count.isdigit():
        raise ValueError(
            f"unknown topology {name!r}: write it as Cloud TPU does, e.g. v5e-16, v5p-64, v6e-64, "
            f"v4-32 (generations: {known}), or as a topology string such as v5p:2x4x4"
        )
    chip = CHIPS[gen]
    chips, rest = divmod(int(count), chip.cores_in_name)
    shapes = _TORUS_3D if chip.dims == 3 else _TORUS_2D
    if rest or chips not in shapes:
        raise ValueError(
            f"{name}: no standard {gen} slice of that size; sizes: "
            + ", ".join(f"{gen}-{n * chip.cores_in_name}" for n in shapes)
        )
    return Topology(name, chip, chips, f"{gen}:{shapes[chips]}")


def gpu_topology(count: int, kind: str) -> Topology:
    """`count` GPUs of `kind` (a100 | h100 | h200), planned on virtual CPU devices."""
    if kind not in GPUS:
        raise ValueError(f"unknown GPU type {kind!r}; known: {', '.join(sorted(GPUS))}")
    if count < 1:
        raise ValueError(f"--gpus must be >= 1, got {count}")
    return Topology(f"{count}x {kind}", GPUS[kind], count, "cpu")


def topology_devices(topology: Topology) -> list[Any]:
    """The slice's devices for ahead-of-time compilation (needs libtpu; no TPU is needed). For a
    GPU topology: `chips` CPU devices (call before JAX starts its CPU backend)."""
    if topology.topology == "cpu":
        jax.config.update("jax_num_cpu_devices", topology.chips)
        devices = jax.devices("cpu")
        if len(devices) < topology.chips:
            raise RuntimeError(
                f"JAX's CPU backend already started with {len(devices)} devices; plan GPUs in a "
                "fresh process"
            )
        return devices[: topology.chips]
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # quiets libtpu on a CPU host
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology.topology)
    except Exception as err:  # libtpu missing or too old for this generation
        raise RuntimeError(
            f"cannot build the {topology.name} topology ({err}); the TPU compiler comes with "
            f'libtpu: pip install "jax[tpu]=={jax.__version__}"'
        ) from err
    return list(desc.devices)


# ------------------------------------------------------------------------------------ FLOPs


def forward_flops_per_token(config: models.ModelConfig, context: float) -> float:
    """Model FLOPs of one token through a full forward pass: 2 per weight of every matmul (the
    embedding lookup is not a matmul; the LM or score head is), plus the attention scores and
    weighted sum over `context` keys (`4 * layers * heads * head_dim * context`)."""
    d, f, layers = config.hidden_size, config.intermediate_size, config.num_layers
    q = config.num_heads * config.head_dim
    kv = config.num_kv_heads * config.head_dim
    mlp = (3 if config.mlp == "gated" else 2) * d * f
    per_layer = d * (q + 2 * kv) + q * d + mlp
    head = d * (config.vocab_size if config.head == "lm" else config.num_labels)
    attention = 4 * layers * q * context
    return 2.0 * (layers * per_layer + head) + attention


def iteration_flops(config: RLConfig, rl_models: RLModels, prompt_len: int) -> dict[str, float]:
    """Model FLOPs of one iteration by phase (TRL's order): generation (a prefill per distinct
    prompt with `shared_prefill`, one decode step per response token over its growing context),
    the reference forward (when a KL is used), the reward and value forwards over prompt +
    response (when there are such models), and the update (`epochs` passes of forward +
    backward, 3x a forward, 2x with LoRA, through the policy and a value model)."""
    b, p, r = config.batch_size, prompt_len, config.response_length
    full = b * (p + r)  # tokens of one full pass over the batch
    mean_context = (p + r) / 2  # causal attention over a sequence of p + r tokens
    policy = forward_flops_per_token(rl_models.policy, mean_context)
    prefills = config.num_prompts if config.shared_prefill else b
    flops = {
        "generate": prefills * p * forward_flops_per_token(rl_models.policy, p / 2)
        + b * r * forward_flops_per_token(rl_models.policy, p + r / 2),
        "reference": full * policy if config.needs_ref else 0.0,
    }
    if rl_models.reward is not None:
        flops["reward"] = full * forward_flops_per_token(rl_models.reward, mean_context)
    critic = rl_models.value if config.has_critic else None
    value = 0.0 if critic is None else forward_flops_per_token(critic, mean_context)
    if config.has_critic:
        flops["value"] = full * value
    if config.recompute_old_logprobs:
        flops["old_logprobs"] = full * policy
    # Forward + backward is 3x a forward; with LoRA 2x (no weight gradients for the base; the
    # adapters' own FLOPs are rank / width of it and not counted).
    passes = lambda c: 2.0 if c is not None and c.lora is not None else 3.0  # noqa: E731
    update = passes(rl_models.policy) * policy + passes(critic) * value
    flops["update"] = config.epochs * full * update
    return flops


# ---------------------------------------------------------------------------------- compile


@dataclasses.dataclass
class ProgramMemory:
    """Per-chip bytes of one compiled program (`memory_analysis()`), and `resident`: bytes of the
    run's state that stay on the chip while it runs without being its arguments."""

    name: str
    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    code: int
    resident: int
    compile_seconds: float

    @property
    def peak(self) -> int:
        """Arguments + outputs not written over donated arguments + temporaries + code, plus the
        resident state."""
        return (
            self.arguments
            + self.outputs
            - self.aliased
            + self.temporaries
            + self.code
            + self.resident
        )


@dataclasses.dataclass
class Plan:
    """What `plan_ppo` found: per-program memory, the chip, FLOPs per iteration by phase."""

    topology: Topology
    mesh_shape: dict[str, int]
    programs: list[ProgramMemory]
    flops: dict[str, float]
    devices_per_chip: int = 1  # v4's topology has a device per TensorCore
    lora: bool = False  # the run trains LoRA adapters

    @property
    def peak(self) -> int:
        """The largest per-device peak over the programs."""
        return max(p.peak for p in self.programs)

    @property
    def device_hbm(self) -> int:
        return self.topology.chip.hbm // self.devices_per_chip

    @property
    def fits(self) -> bool:
        return self.peak <= self.device_hbm

    def seconds_at(self, mfu: float) -> float:
        chips = self.topology.chips
        return sum(self.flops.values()) / (chips * self.topology.chip.peak_bf16 * mfu)


def per_chip_bytes(tree: Any) -> int:
    """Bytes one device holds of a pytree of `ShapeDtypeStruct`s with shardings (the largest
    shard of each leaf)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


def _with_shardings(shapes: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )


def _abstract_params(config: models.ModelConfig, dtype: str | None = None) -> Any:
    shapes = models.param_shapes(config)
    return shapes if dtype is None else _cast_abstract(shapes, dtype)


def _lora_bases_as(params: Any, lora_config: Any, dtype: str) -> Any:
    """Abstract LoRA params with the frozen half (the base) in `dtype`."""
    if lora_config is None:
        return params
    trainable, base = lora.split(params, lora_config)
    return lora.join(trainable, _cast_abstract(base, dtype))


def _cast_abstract(shapes: Any, dtype: str) -> Any:
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(
            s.shape, jnp.dtype(dtype) if jnp.issubdtype(s.dtype, jnp.floating) else s.dtype
        ),
        shapes,
    )


def _compile(
    name: str, fn: Any, args: Sequence[Any], resident: int, log: Callable[[str], None], **static
) -> tuple[ProgramMemory, Any]:
    log(f"compiling {name} ...")
    start = time.perf_counter()
    compiled = fn.lower(*args, **static).compile()
    seconds = time.perf_counter() - start
    m = compiled.memory_analysis()
    memory = ProgramMemory(
        name=name,
        arguments=int(m.argument_size_in_bytes),
        outputs=int(m.output_size_in_bytes),
        aliased=int(m.alias_size_in_bytes),
        temporaries=int(m.temp_size_in_bytes),
        code=int(m.generated_code_size_in_bytes),
        resident=resident,
        compile_seconds=seconds,
    )
    log(f"  {name}: {memory.peak / GiB:.2f} GiB per chip, compiled in {seconds:.0f} s")
    return memory, compiled


def _abstract_outputs(compiled: Any, fn: Any, args: Sequence[Any], **static) -> Any:
    shapes = fn.eval_shape(*args, **static)
    return _with_shardings(shapes, compiled.output_shardings)


def _for_backend(config: models.ModelConfig, backend: str) -> models.ModelConfig:
    """`config` with `attention="auto"` resolved for `backend` (the kernel or "xla")."""
    from rlhf_jax.models import attention

    if config.attention != "auto":
        return config
    return dataclasses.replace(config, attention=attention.kernel_for(config, backend) or "xla")


def plan_run(
    run: cfg.RLRunConfig,
    devices: Sequence[Any],
    topology: Topology,
    *,
    one_jit: bool = True,
    log: Callable[[str], None] = print,
) -> Plan:
    """Compile a run's programs for `devices` (a topology's) and measure them: the trainer's
    `rollout`, `score` (with a reward model) and `finish` (experience + update) at the full
    response width (the largest length bucket), and with a reward model the one-jit `iteration`
    (`one_jit`).

    Raises `SetupError` for a mesh that does not fit the device count or a batch that does not
    divide over `data x fsdp`, before anything compiles.
    """
    algo = run.algorithm()
    rm, _ = resolve_models(run)
    if topology.topology != "cpu":  # attention="auto" takes the kernel of the target, not this host
        rm = dataclasses.replace(
            rm,
            **{
                name: None if c is None else _for_backend(c, "tpu")
                for name, c in (("policy", rm.policy), ("value", rm.value), ("reward", rm.reward))
            },
        )
    check_mesh(run, devices)
    mesh = sharding.make_mesh(run.mesh, devices)
    programs = iteration_programs(algo, rm, mesh)
    shardings = programs.shardings
    frozen_dtype = run.models.frozen_dtype
    abstract_state = programs.abstract_state
    if rm.policy.lora is not None:  # the trainer stores LoRA bases in frozen_dtype
        base_dtype = frozen_dtype or run.models.param_dtype
        abstract_state = abstract_state.replace(
            policy_params=_lora_bases_as(abstract_state.policy_params, rm.policy.lora, base_dtype),
            value_params=_lora_bases_as(abstract_state.value_params, rm.value_lora, base_dtype),
        )
    state = _with_shardings(abstract_state, shardings.state)
    ref = reward = None  # with LoRA the reference is the policy's own base
    if shardings.frozen.ref is not None:
        ref = _with_shardings(_abstract_params(rm.policy, frozen_dtype), shardings.frozen.ref)
    if rm.reward is not None:
        reward_shapes = _abstract_params(rm.reward, frozen_dtype)
        if rm.value_shares_reward_base:  # the reward base is the value model's (in the state)
            reward_shapes = {"score": reward_shapes["score"]}
        reward = _with_shardings(reward_shapes, shardings.frozen.reward)
    frozen = FrozenParams(ref=ref, reward=reward)
    prompt_len, rep = run.data.max_prompt_length, shardings.replicated
    prompts = jax.ShapeDtypeStruct((algo.num_prompts, prompt_len), jnp.int32, sharding=rep)
    mask = jax.ShapeDtypeStruct((algo.num_prompts, prompt_len), jnp.bool_, sharding=rep)
    key_shape = jax.eval_shape(lambda: jax.random.key(0))
    key = jax.ShapeDtypeStruct(key_shape.shape, key_shape.dtype, sharding=rep)
    ref_bytes, reward_bytes = per_chip_bytes(ref), per_chip_bytes(reward)
    width = algo.response_length
    # (built outside the rules context: building it runs eager ops, which a context mesh of
    # topology devices would try to place on them)
    one = jit_iteration(algo, rm, mesh) if one_jit and rm.reward is not None else None
    out = []
    with sharding.with_rules(mesh):
        args = (state, frozen, prompts, mask, key)
        memory, compiled = _compile("rollout", programs.rollout, args, reward_bytes, log)
        out.append(memory)
        roll = _abstract_outputs(compiled, programs.rollout, args)
        scores = jax.ShapeDtypeStruct((algo.batch_size,), jnp.float32, sharding=rep)
        if rm.reward is not None:
            score_args = (state, frozen, roll)
            memory, compiled = _compile(
                "score", programs.score, score_args, ref_bytes, log, width=width
            )
            out.append(memory)
            scores = _abstract_outputs(compiled, programs.score, score_args, width=width)
        finish_args = (state, roll, scores, key)
        memory, _ = _compile(
            "finish", programs.finish, finish_args, ref_bytes + reward_bytes, log, width=width
        )
        out.append(memory)
        if one is not None:
            memory, _ = _compile("iteration (one jit)", one, args, 0, log)
            out.append(memory)
    mesh_shape = dict(zip(mesh.axis_names, mesh.devices.shape, strict=True))
    flops = iteration_flops(algo, rm, prompt_len)
    per_chip = max(len(devices) // topology.chips, 1)
    return Plan(topology, mesh_shape, out, flops, per_chip, lora=rm.policy.lora is not None)


# ---------------------------------------------------------------------------------- report


def levers(plan: Plan) -> list[str]:
    """What would make a plan that does not fit fit."""
    worst = max(plan.programs, key=lambda p: p.peak)
    out = []
    if worst.temporaries > worst.arguments:
        out.append(
            f"{worst.name}'s temporaries dominate: smaller micro-batches "
            "(ppo.gradient_accumulation_steps / num_mini_batches), models.remat=full, a smaller "
            "ppo.logprob_chunk_size"
        )
    out.append("more chips on fsdp / tensor (mesh.fsdp, mesh.tensor), or a larger slice")
    out.append("models.frozen_dtype=bfloat16 (half the reference and reward models)")
    if not plan.lora:
        out.append(
            "models.lora (train adapters: no reference copy, no optimiser moments or gradients "
            "for the base models)"
        )
    return out


def format_plan(plan: Plan) -> str:
    chip = plan.topology.chip
    mesh = " x ".join(f"{k}={v}" for k, v in plan.mesh_shape.items())
    where = (
        "compiled for virtual CPU devices: the byte counts are the CPU compiler's, an estimate of "
        "the GPU's"
        if plan.topology.topology == "cpu"
        else plan.topology.topology
    )
    lines = [
        f"{plan.topology.name} ({where}; {plan.topology.chips} {chip.name} chips of "
        f"{chip.hbm / GiB:.0f} GiB HBM), mesh {mesh}",
        f"{'program':<26}{'args':>9}{'outputs':>9}{'aliased':>9}{'temps':>9}{'resident':>9}"
        f"{'peak':>9}{'compile':>9}   (GiB per chip)",
    ]
    for p in plan.programs:
        lines.append(
            f"{p.name:<26}{p.arguments / GiB:>9.2f}{p.outputs / GiB:>9.2f}{p.aliased / GiB:>9.2f}"
            f"{p.temporaries / GiB:>9.2f}{p.resident / GiB:>9.2f}{p.peak / GiB:>9.2f}"
            f"{p.compile_seconds:>8.0f}s"
        )
    if plan.devices_per_chip > 1:
        lines.append(f"({plan.devices_per_chip} devices per chip: figures and HBM per device)")
    total = sum(plan.flops.values())
    phases = ", ".join(f"{k} {v / total:.0%}" for k, v in plan.flops.items())
    lines.append(
        f"model FLOPs per iteration: {total:.3g} ({phases}); at 40% MFU {plan.seconds_at(0.4):.1f}"
        f" s, at 60% {plan.seconds_at(0.6):.1f} s (decoding is memory-bound: expect it slower)"
    )
    peak, hbm = plan.peak / GiB, plan.device_hbm / GiB
    if plan.fits:
        lines.append(f"fits: peak {peak:.2f} of {hbm:.0f} GiB per chip ({1 - peak / hbm:.0%} free)")
    else:
        lines.append(f"does not fit (need {peak:.2f} GiB, have {hbm:.0f}); levers:")
        lines.extend(f"  - {lever}" for lever in levers(plan))
    return "\n".join(lines)


def main(
    config_path: str,
    topology_name: str | None,
    overrides: Sequence[str],
    *,
    one_jit: bool = True,
    gpus: int | None = None,
    gpu_type: str = "h100",
    json_path: str | None = None,
    algorithm: str = "ppo",
) -> int:
    """`rlhf-jax plan`: 0 when every program fits, 1 when one does not. `algorithm`: ppo, or a
    critic-free one (rloo, grpo, reinforce++), whose config classes `train` uses."""
    if (topology_name is None) == (gpus is None):
        raise ValueError("give exactly one of --topology (a TPU slice) and --gpus N")
    if gpus is not None:
        topology = gpu_topology(gpus, gpu_type)
    else:
        topology = parse_topology(topology_name)
    known = cfg.algorithms()
    if algorithm not in known or algorithm in ("sft", "rm"):
        rl = sorted(k for k in known if k not in ("sft", "rm"))
        raise ValueError(f"--algorithm {algorithm!r}: plan knows {', '.join(rl)}")
    run = cfg.load_config(known[algorithm].config_class(), Path(config_path), list(overrides))
    devices = topology_devices(topology)
    if len(devices) % topology.chips:
        raise RuntimeError(f"{topology.topology} gave {len(devices)} devices for {topology.chips}")
    plan = plan_run(run, devices, topology, one_jit=one_jit)
    print(format_plan(plan))
    if json_path:
        Path(json_path).write_text(json.dumps(plan_dict(plan), indent=2) + "\n")
    return 0 if plan.fits else 1


def plan_dict(plan: Plan) -> dict[str, Any]:
    """The plan as JSON-ready data (bytes per device, seconds, FLOPs)."""
    return {
        "topology": dataclasses.asdict(plan.topology),
        "mesh": plan.mesh_shape,
        "device_hbm": plan.device_hbm,
        "programs": [{**dataclasses.asdict(p), "peak": p.peak} for p in plan.programs],
        "peak": plan.peak,
        "fits": plan.fits,
        "flops": plan.flops,
        "seconds_at_40_60_mfu": [plan.seconds_at(0.4), plan.seconds_at(0.6)],
    }


__all__ = [
    "CHIPS",
    "Chip",
    "Plan",
    "ProgramMemory",
    "Topology",
    "format_plan",
    "forward_flops_per_token",
    "gpu_topology",
    "parse_topology",
    "iteration_flops",
    "plan_run",
    "topology_devices",
]
