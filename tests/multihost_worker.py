"""One process of a multi-process JAX run on localhost CPUs, started by the tests.

Usage (one command per process, same port)::

    python tests/multihost_worker.py --task reduce --coordinator localhost:PORT \
        --num-processes 2 --process-id I --local-devices 2 --out result_I.npz

Each process gets ``--local-devices`` virtual CPU devices and talks to the others through gloo
collectives. A *task* is a function ``(args) -> dict[str, np.ndarray] | None`` registered in
``TASKS``; a returned dict is written with ``np.savez`` to ``--out`` (``reduce``: every process
writes, so the test can check that all agree; ``ppo``: only process 0). Tasks build their inputs
with deterministic helpers (like :func:`reduce_inputs`, :func:`ppo_run`) that the test also
imports to compute the single-process reference. Tests start the processes with :func:`launch`.

Exit codes: 0 ok, 3 gloo CPU collectives unavailable in this jaxlib, anything else an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

EXIT_NO_GLOO = 3
Result = dict[str, np.ndarray]
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
# PPO: two iterations of the whole jitted PPO step on a (data=2, fsdp=2, tensor=2) mesh
# --------------------------------------------------------------------------------------------

PPO_MESH_SIZES = {"data": 2, "fsdp": 2, "tensor": 2}
PPO_LOCAL_DEVICES = 4  # per process: 2 processes hold the 8 devices of the mesh
PPO_ITERATIONS = 2


def ppo_problem(shared_value_head: bool = False) -> dict[str, Any]:
    """A tiny deterministic PPO problem: Llama policy/value/reward configs with heads, kv heads,
    vocabulary and hidden sizes divisible by every test mesh, a `PPOConfig` whose batch (16)
    divides by data*fsdp <= 8, and left-padded prompts. `shared_value_head`: the value head on
    the policy trunk (`RLModels(value=None)`) instead of a value model. The models are under the
    key "ppo_models" (an `RLModels`)."""
    import rlhf_jax as rj
    from rlhf_jax import models

    policy = models.ModelConfig(
        family="llama",
        vocab_size=64,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=4,
        head_dim=8,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    reward = dataclasses.replace(policy, head="score")
    config = rj.PPOConfig(
        batch_size=16,
        response_length=6,
        temperature=1.0,
        stop_token_ids=(2,),
        num_ppo_epochs=2,
        num_mini_batches=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        value_learning_rate=1e-3,
        total_iterations=10,
        kl_target=0.5,
        kl_horizon=100.0,
        decode_chunks=2,  # the rollout's cache grows once, sharded
    )
    rng = np.random.default_rng(7)
    prompt_len = 5
    real = rng.integers(2, prompt_len + 1, size=config.batch_size)
    mask = np.arange(prompt_len)[None, :] >= (prompt_len - real)[:, None]
    tokens = rng.integers(3, policy.vocab_size, size=(config.batch_size, prompt_len))
    return {
        "config": config,
        "ppo_models": rj.RLModels(
            policy=policy, value=None if shared_value_head else reward, reward=reward
        ),
        "prompts": np.where(mask, tokens, 0).astype(np.int32),
        "prompt_mask": mask,
    }


def ppo_scale_reward(reward_params: Any) -> Any:
    """Random-init scores are ~0.05; scaling the score head spreads them over O(1)."""
    import jax

    return jax.jit(
        lambda p: {**p, "score": {"kernel": p["score"]["kernel"] * 30.0}},
        donate_argnums=0,
    )(reward_params)


def ppo_iteration_key(i: int) -> Any:
    """PRNG key of PPO iteration `i` (0-based)."""
    import jax

    return jax.random.key(100 + i)


def ppo_setup(mesh: Any, shared_value_head: bool = False) -> dict[str, Any]:
    """Sharded params (born sharded, same seeds in every process), the initial state and the
    prompt batch replicated on `mesh` (every process passes the whole batch: the iteration splits
    the rows over the batch axes itself); `rows` are the rows this process's devices hold. The
    value model is initialised from the reward model; a shared value head from a random
    (non-zero) kernel."""
    import jax

    import rlhf_jax as rj
    from rlhf_jax import models
    from rlhf_jax import sharding as sh

    problem = ppo_problem(shared_value_head)
    config, ppo_models = problem["config"], problem["ppo_models"]
    policy = models.sharded_init_params(ppo_models.policy, jax.random.key(0), mesh)
    reward = ppo_scale_reward(
        models.sharded_init_params(ppo_models.reward, jax.random.key(1), mesh)
    )
    value = reward
    if shared_value_head:
        shape = (ppo_models.policy.hidden_size, 1)
        value = jax.jit(
            lambda k: {"score": {"kernel": 0.1 * jax.random.normal(k, shape)}},
            out_shardings=rj.rl_shardings(config, ppo_models, mesh).state.value_params,
        )(jax.random.key(5))
    rows = sh.local_batch_slice(mesh, config.batch_size)
    return {
        "state": rj.jit_init_state(config, ppo_models, mesh)(policy, value),
        "frozen": rj.FrozenParams(ref=policy, reward=reward),
        "batch": sh.place_replicated((problem["prompts"], problem["prompt_mask"]), mesh),
        "rows": rows,
    }


def ppo_summaries(state: Any, mesh: Any) -> dict[str, np.ndarray]:
    """Global reductions of a PPO state (computed sharded, returned replicated)."""
    import jax
    import jax.numpy as jnp

    from rlhf_jax import sharding as sh

    sums = jax.jit(
        lambda s: {
            "policy_sq_sum": sum(jnp.sum(x**2) for x in jax.tree.leaves(s.policy_params)),
            "value_sq_sum": sum(jnp.sum(x**2) for x in jax.tree.leaves(s.value_params)),
            "opt_state_sum": sum(jnp.sum(x) for x in jax.tree.leaves(s.opt_state)),
        },
        out_shardings=sh.replicated(mesh),
    )(state)
    return {k: np.asarray(v.addressable_data(0)) for k, v in sums.items()}


def ppo_run(mesh: Any, shared_value_head: bool = False) -> dict[str, np.ndarray]:
    """`PPO_ITERATIONS` sharded PPO iterations on `mesh`; every process of a multi-process run
    calls it with the whole (replicated) prompt batch. Returns the metrics of every iteration
    (`"{i}/{name}"`) and global reductions of the final state (`ppo_summaries`)."""
    import rlhf_jax as rj

    problem = ppo_problem(shared_value_head)
    setup = ppo_setup(mesh, shared_value_head)
    iteration = rj.jit_iteration(problem["config"], problem["ppo_models"], mesh)
    state, out = setup["state"], {}
    for i in range(PPO_ITERATIONS):
        state, metrics = iteration(state, setup["frozen"], *setup["batch"], ppo_iteration_key(i))
        out |= {f"{i}/{k}": np.asarray(v.addressable_data(0)) for k, v in metrics.items()}
    out |= ppo_summaries(state, mesh)
    out["local_rows"] = np.asarray([setup["rows"].start, setup["rows"].stop])
    out["prompts_spec"] = np.asarray(str(setup["batch"][0].sharding.spec))
    q_kernel = state.policy_params["layers"]["attn"]["q"]["kernel"]
    out["q_spec"] = np.asarray(str(q_kernel.sharding.spec))
    return out


def grpo_problem() -> dict[str, Any]:
    """GRPO (reward model, KL term) on `ppo_problem`'s models and first 4 prompts: 4 prompts x 4
    completions, so the prompts (replicated) do not divide the 8-device mesh but the rows do. The
    models are under the key "cf_models" (an `RLModels`)."""
    import rlhf_jax as rj

    problem = ppo_problem()
    models_ = problem["ppo_models"]
    config = rj.GRPOConfig(
        num_prompts=4,
        num_generations=4,
        response_length=6,
        temperature=1.0,
        stop_token_ids=(2,),
        num_iterations=2,
        num_mini_batches=2,
        beta=0.04,
        learning_rate=1e-3,
    )
    return {
        "config": config,
        "cf_models": rj.RLModels(policy=models_.policy, reward=models_.reward),
        "prompts": problem["prompts"][:4],
        "prompt_mask": problem["prompt_mask"][:4],
    }


def grpo_run(mesh: Any) -> dict[str, np.ndarray]:
    """Two GRPO iterations on `mesh` (params born sharded, prompts replicated); every process of
    a multi-process run calls it. Returns the metrics (`"{i}/{name}"`) and the global sum of
    squares of the final policy."""
    import jax
    import jax.numpy as jnp

    import rlhf_jax as rj
    from rlhf_jax import models
    from rlhf_jax import sharding as sh

    problem = grpo_problem()
    config, rl_models = problem["config"], problem["cf_models"]
    policy = models.sharded_init_params(rl_models.policy, jax.random.key(0), mesh)
    reward = ppo_scale_reward(models.sharded_init_params(rl_models.reward, jax.random.key(1), mesh))
    shardings = rj.rl_shardings(config, rl_models, mesh)
    init = jax.jit(lambda p: rj.init_state(p, config, rl_models), out_shardings=shardings.state)
    state = init(policy)
    frozen = rj.FrozenParams(ref=policy, reward=reward)
    step = rj.jit_iteration(config, rl_models, mesh)
    out = {}
    for i in range(2):
        batch = sh.place_replicated(
            (problem["prompts"], problem["prompt_mask"], ppo_iteration_key(i)), mesh
        )
        state, metrics = step(state, frozen, *batch)
        out |= {f"{i}/{k}": np.asarray(v.addressable_data(0)) for k, v in metrics.items()}
    sq = jax.jit(
        lambda p: sum(jnp.sum(x**2) for x in jax.tree.leaves(p)),
        out_shardings=sh.replicated(mesh),
    )(state.policy_params)
    out["policy_sq_sum"] = np.asarray(sq.addressable_data(0))
    return out


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


def task_ppo(
    args: argparse.Namespace, shared_value_head: bool = False
) -> dict[str, np.ndarray] | None:
    import jax

    from rlhf_jax import sharding as sh

    mesh = sh.make_mesh(sh.MeshConfig(**PPO_MESH_SIZES))
    out = ppo_run(mesh, shared_value_head)
    out["process_count"] = np.asarray(jax.process_count())
    out["global_devices"] = np.asarray(jax.device_count())
    return out if sh.is_main_process() else None


def task_grpo(args: argparse.Namespace) -> dict[str, np.ndarray] | None:
    import jax

    from rlhf_jax import sharding as sh

    out = grpo_run(sh.make_mesh(sh.MeshConfig(**PPO_MESH_SIZES)))
    out["process_count"] = np.asarray(jax.process_count())
    return out if sh.is_main_process() else None


LOAD_CHECKPOINT = "load_checkpoint"  # the HF checkpoint the test writes into the output folder


def task_load(args: argparse.Namespace) -> dict[str, np.ndarray]:
    """Every process loads the same checkpoint lazily onto a mesh whose layer axis is split over
    fsdp; returns the tensors it read, the layers its devices hold, and whether its shards equal
    the eager conversion."""
    import jax

    from rlhf_jax import models
    from rlhf_jax import sharding as sh
    from rlhf_jax.models.io import StoredTensor

    path = args.out.parent / LOAD_CHECKPOINT
    reads = []
    read = StoredTensor.__array__

    def recording(self: Any, *a: Any, **k: Any) -> np.ndarray:
        reads.append(self.name)
        return read(self, *a, **k)

    StoredTensor.__array__ = recording
    mesh = sh.make_mesh(sh.MeshConfig(data=1, fsdp=-1, tensor=1))
    rules = sh.make_rules({"layers": "fsdp", "embed": None})
    params, config = models.load(path, mesh=mesh, rules=rules)
    StoredTensor.__array__ = read
    want = models.hf_to_params(models.read_weights(path), config)
    equal = all(
        np.array_equal(np.asarray(shard.data), w[shard.index])
        for x, w in zip(jax.tree.leaves(params), jax.tree.leaves(want), strict=True)
        for shard in x.addressable_shards
    )
    up = params["layers"]["mlp"]["up"]["kernel"]
    held = sorted({i for s in up.addressable_shards for i in range(up.shape[0])[s.index[0]]})
    return {"read": np.asarray(reads), "held_layers": np.asarray(held), "equal": np.asarray(equal)}


def counting_length_reward(completions: list[str], **kwargs: Any) -> list[float]:
    """`reward_functions.length_reward`, appending how many rows this process scored to
    ``$RLHF_COUNT_DIR/scored_<process index>.txt`` (one line per call)."""
    import jax

    from rlhf_jax.reward_functions import length_reward

    out = length_reward(completions=completions, **kwargs)
    directory = os.environ.get("RLHF_COUNT_DIR")
    if directory:
        with open(Path(directory) / f"scored_{jax.process_index()}.txt", "a") as f:
            f.write(f"{len(completions)}\n")
    return out


def task_train_cli(args: argparse.Namespace) -> dict[str, np.ndarray]:
    """`rlhf-jax train ...` with the argv the test wrote to ``train_cli.json`` beside ``--out``;
    every process writes its exit status."""
    import json

    from rlhf_jax import cli

    argv = json.loads((args.out.parent / "train_cli.json").read_text())
    return {"rc": np.array(cli.main(argv))}


TASKS: dict[str, Callable[[argparse.Namespace], dict[str, np.ndarray] | None]] = {
    "load": task_load,
    "reduce": task_reduce,
    "ppo": task_ppo,
    "ppo_shared": functools.partial(task_ppo, shared_value_head=True),
    "grpo": task_grpo,
    "train_cli": task_train_cli,
}


# --------------------------------------------------------------------------------------------
# Launching from a test
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Workers:
    """Running worker processes started by :func:`launch`."""

    procs: list[subprocess.Popen]
    outs: list[Path]
    logs: list[Any]
    _result: tuple[list[int] | None, list[Result | None], str] | None = None

    def wait(self, timeout: float) -> tuple[list[int] | None, list[Result | None], str]:
        """Wait for all processes (killing them after ``timeout`` seconds in total). Returns the
        exit codes (``None`` on timeout), each process's result (``None`` where it wrote no
        file) and the tail of every log. Calling it again returns the same answer."""
        if self._result is not None:
            return self._result
        try:
            codes: list[int] | None = [p.wait(timeout=timeout) for p in self.procs]
        except subprocess.TimeoutExpired:
            codes = None
        finally:
            self.kill()
        texts = []
        for log in self.logs:
            log.seek(0)
            texts.append(log.read())
            log.close()
        report = "\n".join(f"--- process {i} ---\n{t[-3000:]}" for i, t in enumerate(texts))
        results = [dict(np.load(o)) if o.exists() else None for o in self.outs]
        self._result = (codes, results, report)
        return self._result

    def kill(self) -> None:
        """Kill the processes still running (these workers only)."""
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def wait_or_fail(workers: Workers, timeout: float) -> list[Result | None]:
    """:meth:`Workers.wait`, then fail the calling test unless every process exited 0 (skip it
    when this jaxlib has no gloo CPU collectives). Returns the per-process results."""
    import pytest

    codes, results, report = workers.wait(timeout)
    if codes is None:
        pytest.fail(f"multi-process workers timed out after {timeout}s\n{report}")
    if any(c == EXIT_NO_GLOO for c in codes):
        pytest.skip(f"gloo CPU collectives are unavailable in this jaxlib:\n{report}")
    assert codes == [0] * len(codes), f"worker exit codes {codes}\n{report}"
    return results


def launch(task: str, out_dir: Path, num_processes: int = 2, local_devices: int = 2) -> Workers:
    """Start ``num_processes`` copies of this script running ``task`` on localhost (one free
    port, gloo collectives); results go to ``out_dir/{task}_{i}.npz``. The caller may compute
    its reference meanwhile, then calls :meth:`Workers.wait`."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    procs, outs, logs = [], [], []
    for pid in range(num_processes):
        out = out_dir / f"{task}_{pid}.npz"
        log = open(out_dir / f"{task}_{pid}.log", "w+")  # closed in Workers.wait
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            f"--task={task}",
            f"--coordinator=localhost:{port}",
            f"--num-processes={num_processes}",
            f"--process-id={pid}",
            f"--local-devices={local_devices}",
            f"--out={out}",
        ]
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        outs.append(out)
        logs.append(log)
    return Workers(procs, outs, logs)


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
    # As in conftest.py: LLVM -O0 halves the compile time of the tiny test programs.
    os.environ["XLA_FLAGS"] = (
        f"--xla_force_host_platform_device_count={args.local_devices} "
        "--xla_backend_optimization_level=0"
    )
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
    if result is not None:
        np.savez(args.out, **result)
    jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(1)
