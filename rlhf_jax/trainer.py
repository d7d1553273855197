"""The one RL training loop: `rlhf-jax train ppo | rloo | grpo | reinforce++` as `train(config)`.

Each iteration takes the next `num_prompts` prompts of the dataset and runs the core's jitted
phases on a device mesh (`core.iteration_programs`): rollout -> scores -> update, with scoring and
the update cut to the batch's length bucket. The scores come from the reward model (on device) or
from a Python reward function on the host (`models.reward_function`: each process scores its own
rows).

Everything that can be checked without compute is checked first (`prepare`: paths, heads,
tokenizer/model vocabularies, the mesh against the batch, the dataset). The train state, the PRNG
key and the data positions are checkpointed with Orbax (with LoRA only the adapters and trained
heads: the bases are re-read from the model paths); `resume=True` continues from the newest
complete checkpoint and reproduces an uninterrupted run exactly. Non-finite scores, losses or
gradients stop the run before anything of that iteration is saved; SIGINT/SIGTERM finish the
current iteration, save a checkpoint and return. A finished run exports the policy (HF format) to
`run_dir/policy` (and with LoRA its peft adapter to `run_dir/policy_adapter`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from rlhf_jax import checkpoint as ckpt
from rlhf_jax import config as cfg
from rlhf_jax import data, models, sharding
from rlhf_jax import logging as run_logging
from rlhf_jax import reward_functions as rf
from rlhf_jax.core import (
    FrozenParams,
    IterationPrograms,
    PtxBatch,
    RLConfig,
    RLModels,
    RLState,
    check_finite,
    iteration_programs,
    score_and_finish,
)
from rlhf_jax.host import (
    fetch_metrics,
    gather_to_main,
    local_rows,
    release_host_memory,
    score_rows,
    to_host,
)
from rlhf_jax.rewards import check_missing_stop_penalty
from rlhf_jax.run_setup import (
    SetupError,
    StopRequest,
    TrainResult,
    check_mesh,
    checkpoint_due,
    enable_compilation_cache,
    frozen_params,
    load_params,
    model_paths,
    open_checkpointer,
    ptx_rows,
    resolve_models,
    with_adapters,
)

Params = Any


# -------------------------------------------------------------------------------------- setup


@dataclasses.dataclass
class RunSetup:
    """What `prepare` checked and loaded (no compute yet)."""

    config: cfg.RLRunConfig
    algo: RLConfig  # the algorithm's config with the tokenizer's pad and stop tokens
    rl_models: RLModels
    run_dir: Path
    tokenizer: Any
    dataset: data.PromptDataset
    paths: dict[str, Path]
    devices: list[Any]
    checkpointer: ckpt.Checkpointer
    resume_step: int | None
    reward_terms: list[rf.RewardTerm]
    ptx_dataset: data.TextDataset | None = None


def prepare(
    config: cfg.RLRunConfig, *, resume: bool = False, devices: Sequence[Any] | None = None
) -> RunSetup:
    """Every check that needs no compute: paths, tokenizer, model configs and vocabularies, the
    mesh, the dataset, the run directory's checkpoints. Raises SetupError/DataError."""
    mc, section = config.models, config.section
    algo = config.algorithm()
    paths = model_paths(config)
    tokenizer = data.load_tokenizer(config.tokenizer, str(paths["policy"]))
    rl_models, paths = resolve_models(config, tokenizer, paths)
    pad_id = int(tokenizer.pad_token_id)
    if algo.pad_token_id not in (0, pad_id):
        raise SetupError(
            f"{section}.pad_token_id={algo.pad_token_id} differs from the tokenizer's pad token "
            f"id {pad_id}; leave {section}.pad_token_id unset (it is taken from the tokenizer)"
        )
    stops = (*algo.stop_token_ids, *data.stop_token_ids(tokenizer, config.tokenizer))
    try:
        algo = dataclasses.replace(
            algo, pad_token_id=pad_id, stop_token_ids=tuple(dict.fromkeys(stops))
        )
        check_missing_stop_penalty(algo.missing_eos_penalty, algo.stop_token_ids)
    except ValueError as err:
        raise SetupError(f"{section}: {err}") from err
    devices = list(devices) if devices is not None else jax.devices()
    check_mesh(config, devices)
    dataset = data.load_prompts(config.data, tokenizer, extra_columns=config.data.reward_columns)
    ptx_dataset = None
    if config.ptx_data is not None:
        ptx_dataset = data.load_texts(config.ptx_data, tokenizer)
    terms = rf.reward_terms([mc.reward_function]) if mc.reward_function is not None else []
    run_dir = Path(config.run_dir).absolute()
    checkpointer = open_checkpointer(run_dir, config.checkpoint, resume)
    return RunSetup(
        config=config,
        algo=algo,
        rl_models=rl_models,
        run_dir=run_dir,
        tokenizer=tokenizer,
        dataset=dataset,
        paths=paths,
        devices=devices,
        checkpointer=checkpointer,
        resume_step=checkpointer.latest_step() if resume else None,
        reward_terms=terms,
        ptx_dataset=ptx_dataset,
    )


def train(
    config: cfg.RLRunConfig, *, resume: bool = False, devices: Sequence[Any] | None = None
) -> TrainResult:
    """Runs (or resumes) the configured algorithm.

    Args:
      config: the run config (`config.PPORunConfig`, `RLOORunConfig`, `GRPORunConfig`,
        `ReinforcePPRunConfig`).
      resume: continue from the newest complete checkpoint in `config.run_dir` (start fresh if
        there is none). Without it, a run directory with checkpoints is an error.
      devices: the devices of the mesh (default: all).
    Returns:
      A `TrainResult`.
    Raises:
      SetupError, data.DataError, config.ConfigError: before any compute.
      core.NonFiniteError: an iteration produced NaN/inf (nothing of it was saved).
      reward_functions.RewardFunctionError: the reward function failed or returned NaN/inf.
    """
    setup = prepare(config, resume=resume, devices=devices)
    try:
        return _train(setup)
    finally:
        setup.checkpointer.close()


# --------------------------------------------------------------------------------- the models


class _Loaded(NamedTuple):
    state: RLState
    frozen: FrozenParams
    key: jax.Array
    positions: tuple[data.DataPosition, data.DataPosition]


def _load(setup: RunSetup, programs: IterationPrograms, mesh) -> _Loaded:
    """Loads the models shard by shard onto the mesh and builds (or restores) the state."""
    mc, rm, algo = setup.config.models, setup.rl_models, setup.algo
    # With LoRA the bases are loaded straight into frozen_dtype: only adapters train.
    use_lora = rm.policy.lora is not None
    base_dtype = (mc.frozen_dtype or mc.param_dtype) if use_lora else None

    def load(name: str, model_config: models.ModelConfig) -> Params:
        if base_dtype is not None:
            model_config = dataclasses.replace(model_config, param_dtype=base_dtype)
        return load_params(setup.paths[name], model_config, mesh, mc.allow_pickle)

    policy = load("policy", rm.policy)
    reward = load("reward", rm.reward) if "reward" in setup.paths else None
    value = None
    if algo.has_critic:
        if rm.shared_value_head:
            shardings = programs.shardings.state.value_params
            value = jax.device_put(models.value_head_init(rm.policy), shardings)
        elif "value" in setup.paths:
            value = load("value", rm.value)
        elif reward is not None:
            value = reward  # the state copies it (models.value_from_reward semantics)
        else:  # the policy's trunk + a zero score head, built where the shards lie
            value_config = dataclasses.replace(rm.value, lora=None)
            value = jax.jit(
                lambda p: models.value_from_policy(p, rm.policy)[0],
                out_shardings=models.param_shardings(value_config, mesh),
            )(policy)
    key = jax.jit(
        lambda: jax.random.key(setup.config.seed), out_shardings=programs.shardings.replicated
    )()  # replicated: a single-device key cannot be saved in a multi-process checkpoint
    if use_lora:
        lora_keys = jax.random.split(jax.random.fold_in(jax.random.key(setup.config.seed), 0x10A))
        policy = with_adapters(policy, rm.policy, mesh, lora_keys[0], mc.lora_adapter)
        if rm.value_lora is not None:
            value = with_adapters(value, rm.value, mesh, lora_keys[1])
    positions = (data.DataPosition(), data.DataPosition())
    if setup.resume_step is not None:
        state, key, positions = _restore(setup, programs, key, policy, value)
    else:
        state = programs.init(policy, value) if algo.has_critic else programs.init(policy)
    # From here `policy` is only the frozen reference (the state owns the trained copy); with
    # LoRA the reference is the state's own base, adapters off.
    ref = None if use_lora or not algo.needs_ref else frozen_params(policy, mc.frozen_dtype)
    if reward is not None and rm.value_shares_reward_base:  # the value base is the reward's
        reward = {"score": reward["score"]}
    frozen = FrozenParams(ref=ref, reward=frozen_params(reward, mc.frozen_dtype))
    return _Loaded(state, frozen, key, positions)


# ----------------------------------------------------------------------------------- the loop


class _Dispatched(NamedTuple):
    """An iteration whose update has been dispatched but not yet logged."""

    iteration: int
    device_metrics: dict[str, jax.Array]
    host_metrics: dict[str, float]  # the length bucket and the reward function's metrics
    clock: run_logging.IterationClock
    rows: np.ndarray  # the batch's dataset rows (one per prompt)
    generation: Any  # the rollout's sampled tokens (its log-probs and values are not kept)
    scores: Any
    key: jax.Array  # the run's key after this iteration's split
    positions: tuple[data.DataPosition, data.DataPosition]  # after this iteration


class _Batch(NamedTuple):
    rows: np.ndarray
    prompts: Any
    mask: Any
    ptx: PtxBatch | None
    positions: tuple[data.DataPosition, data.DataPosition]


def _next_batch(setup: RunSetup, mesh, positions) -> _Batch:
    """The next prompts (replicated over the mesh) and PPO-ptx rows (split like the batch)."""
    config, ds, ptx_ds = setup.config, setup.dataset, setup.ptx_dataset
    position, ptx_position = positions
    rows, position = data.batch_indices(
        len(ds), setup.algo.num_prompts, position, seed=config.seed, shuffle=config.data.shuffle
    )
    prompts, mask = sharding.place_replicated((ds.tokens[rows], ds.mask[rows]), mesh)
    ptx = None
    if ptx_ds is not None:
        size = ptx_rows(config)
        ptx_batch_rows, ptx_position = data.batch_indices(
            len(ptx_ds), size, ptx_position, seed=config.seed + 1, shuffle=config.ptx_data.shuffle
        )
        local = sharding.local_batch_slice(mesh, size)
        tokens, ptx_mask = ptx_ds.tokens[ptx_batch_rows], ptx_ds.mask[ptx_batch_rows]
        ptx = PtxBatch(*sharding.place_batch((tokens[local], ptx_mask[local]), mesh))
    return _Batch(rows, prompts, mask, ptx, (position, ptx_position))


def _describe_data(setup: RunSetup, logger: run_logging.RunLogger, start: int) -> None:
    config, ds, ptx_ds, algo = setup.config, setup.dataset, setup.ptx_dataset, setup.algo
    logger.message(
        f"{len(ds)} prompts of {config.data.path}"
        + (f" x {algo.group_size} completions per prompt" if algo.group_size > 1 else "")
        + (f" ({ds.num_truncated} truncated from the left)" if ds.num_truncated else "")
        + (f" ({ds.num_dropped} longer than max_prompt_length dropped)" if ds.num_dropped else "")
        + (f"; resumed at iteration {start}" if setup.resume_step is not None else "")
    )
    if ptx_ds is not None:
        logger.message(
            f"PPO-ptx: {len(ptx_ds)} texts of {config.ptx_data.path}, {ptx_rows(config)} per "
            "iteration"
            + (f" ({ptx_ds.num_truncated} cut to max_length)" if ptx_ds.num_truncated else "")
            + (f" ({ptx_ds.num_dropped} under 2 tokens dropped)" if ptx_ds.num_dropped else "")
        )


class _Hooks:
    """What the loop does around the computation, once an iteration's update is dispatched:
    fetch, check and log its metrics, write its sample table, save its checkpoint when due or
    on a signal (`after_iteration`), export the policy when the run finishes (`finish`)."""

    def __init__(self, setup: RunSetup, logger: run_logging.RunLogger, stop, end: int) -> None:
        self.setup, self.logger, self.stop, self.end = setup, logger, stop, end

    def after_iteration(self, done: _Dispatched, state: RLState) -> tuple[dict[str, float], bool]:
        """Returns the iteration's metrics and whether to stop (a signal, seen by every
        process). `state` is still that iteration's: only the next update donates it."""
        setup, config, logger = self.setup, self.setup.config, self.logger
        metrics = fetch_metrics(done.device_metrics)
        metrics.update(done.host_metrics)
        check_finite(metrics, done.iteration)
        tokens = float(metrics.get("response/length_mean", 0.0)) * setup.algo.batch_size
        logger.log(done.iteration, metrics, timings=done.clock.timings(tokens))
        every = config.logging.sample_every
        if every and (done.iteration % every == 0 or done.iteration == self.end):
            rows = _sample_rows(setup, done.rows, done.generation, done.scores)
            logger.samples(done.iteration, rows)
        stopping = self.stop.requested()  # once: all processes must see the same answer
        if stopping or checkpoint_due(done.iteration, self.end, config.checkpoint.every):
            _save(setup, state, done.key, done.positions, done.iteration)
        if stopping:
            logger.message(self.stop.stopped_message(done.iteration))
        return metrics, stopping

    def finish(self, state: RLState, status: str) -> None:
        self.setup.checkpointer.wait()
        if status == "finished":
            _export(self.setup, state, self.logger)


def _start(setup: RunSetup):
    """The run directory, the mesh, the programs, the models and state, and the logger."""
    config, run_dir = setup.config, setup.run_dir
    if config.compilation_cache:
        enable_compilation_cache(config.compilation_cache)
    changed = _changed_since_last_run(config, run_dir) if setup.resume_step is not None else []
    if sharding.is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save_config(config, run_dir / "config.yaml")
        setup.tokenizer.save_pretrained(str(run_dir / ckpt.TOKENIZER_DIR))
    mesh = sharding.make_mesh(config.mesh, setup.devices)
    programs = iteration_programs(setup.algo, setup.rl_models, mesh)
    with sharding.with_rules(mesh):
        loaded = _load(setup, programs, mesh)
    start = int(loaded.state.iteration)
    logger = run_logging.RunLogger(
        run_dir,
        config.logging,
        total_iterations=setup.algo.total_iterations,
        start_iteration=start,
        run_config=cfg.to_dict(config),
        enabled=sharding.is_main_process(),
    )
    _describe_data(setup, logger, start)
    if changed:
        logger.message(
            "warning: resuming with a config that differs from the run's in "
            + ", ".join(changed)
            + "; the continuation will not match an uninterrupted run"
        )
    return mesh, programs, loaded, logger


def _train(setup: RunSetup) -> TrainResult:
    config, algo = setup.config, setup.algo
    mesh, programs, loaded, logger = _start(setup)
    state, frozen, key, positions = loaded
    start = iteration = int(state.iteration)
    end = min(algo.total_iterations, config.stop_after or algo.total_iterations)
    status = "finished" if end == algo.total_iterations else "stopped"
    metrics: dict[str, float] = {}
    try:
        with StopRequest() as stop:
            hooks = _Hooks(setup, logger, stop, end)
            # An iteration is logged (and saved) after the next iteration's rollout has been
            # dispatched, so the device generates while the host fetches the metrics, writes
            # samples and checkpoints and prepares the batch. The rollout does not donate the
            # state; the update, which does, needs the host (the response-length bucket, and a
            # host reward function's scores) and so comes after.
            pending: _Dispatched | None = None
            while iteration < end:
                if pending is not None:
                    pending.clock.stop()
                clock = run_logging.IterationClock()
                batch = _next_batch(setup, mesh, positions)
                key, iteration_key = jax.random.split(key)
                rollout_key, update_key = jax.random.split(iteration_key)
                roll = programs.rollout(state, frozen, batch.prompts, batch.mask, rollout_key)
                if pending is not None:
                    metrics, stopping = hooks.after_iteration(pending, state)
                    pending = None
                    if stopping:
                        status = "interrupted"
                        break
                host_score = None
                if setup.reward_terms:  # this process's rows, plus the model's scores if any
                    host_score = functools.partial(
                        _host_scores, setup, rows=batch.rows, iteration=iteration + 1, mesh=mesh
                    )
                state, device_metrics, host_metrics, scores = score_and_finish(
                    programs, algo, setup.rl_models, state, frozen, roll, update_key,
                    host_score=host_score, ptx=batch.ptx,
                )  # fmt: skip
                iteration += 1
                if iteration == start + 1:  # the programs are compiled now
                    release_host_memory()
                positions = batch.positions
                pending = _Dispatched(
                    iteration, device_metrics, host_metrics, clock, batch.rows, roll.generation,
                    scores, key, positions,
                )  # fmt: skip
            if pending is not None:  # the last iteration
                metrics, stopping = hooks.after_iteration(pending, state)
                status = "interrupted" if stopping else status
            hooks.finish(state, status)
    finally:
        setup.checkpointer.wait()
        logger.close()
    run_dir = setup.run_dir
    if sharding.is_main_process() and config.logging.plot:
        if (run_dir / run_logging.METRICS_FILE).exists():
            run_logging.plot_run(run_dir)
    latest = setup.checkpointer.latest_step()
    checkpoint = None if latest is None else setup.checkpointer.directory / str(latest)
    return TrainResult(run_dir, iteration, status, metrics, checkpoint)


_RESUME_FREE = ("run_dir", "stop_after", "compilation_cache", "logging.", "checkpoint.")


def _changed_since_last_run(config: cfg.RLRunConfig, run_dir: Path) -> list[str]:
    """Keys (other than logging/checkpointing/stop_after) that differ from the config the run
    was started with."""
    saved = run_dir / "config.yaml"
    if not saved.exists():
        return []
    try:
        previous = cfg.load_config(type(config), saved)
    except cfg.ConfigError:
        return ["<unreadable config.yaml>"]
    return cfg.diff_configs(previous, config, ignore=_RESUME_FREE)


def _host_scores(
    setup: RunSetup, roll, *, rows: np.ndarray, iteration: int, mesh
) -> tuple[np.ndarray, dict[str, float]]:
    """The reward function on this process's rows (of the global batch; their tokens,
    masks and reward-model scores read from its own shards; `score_rows` gathers every
    process's): float32 `[B]` scores (plus the reward model's where there is one) and the
    reward function's metrics. Completion `i` answers prompt `rows[i // group_size]`."""
    k = setup.algo.group_size
    local = slice(0, setup.algo.batch_size)
    if jax.process_count() > 1:
        local = sharding.local_batch_slice(mesh, setup.algo.batch_size)

    def score() -> tuple[np.ndarray, dict[str, float]]:
        gen = roll.generation
        tokens = local_rows(gen.tokens, local)
        response_mask = local_rows(gen.mask, local).astype(bool)
        ds, tok = setup.dataset, setup.tokenizer
        start, stop, _ = local.indices(len(rows) * k)
        mine = [rows[i // k] for i in range(start, stop)]
        prompt_tokens = [ds.tokens[r][ds.mask[r]].tolist() for r in mine]
        completion_tokens = [t[m].tolist() for t, m in zip(tokens, response_mask)]
        columns = {name: [ds.columns[name][r] for r in mine] for name in ds.columns}
        columns.update(prompt_ids=prompt_tokens, completion_ids=completion_tokens)
        try:
            return rf.compute_rewards(
                setup.reward_terms,
                [ds.texts[r] for r in mine],
                tok.batch_decode(completion_tokens, skip_special_tokens=True),
                columns=columns,
                model_scores=(
                    None if roll.model_scores is None else local_rows(roll.model_scores, local)
                ),
            )
        except ValueError as err:
            raise type(err)(f"iteration {iteration}: {err}") from err

    return score_rows(score, local, setup.algo.batch_size)


def _sample_rows(
    setup: RunSetup, rows: np.ndarray, generation: Any, scores: Any
) -> list[dict[str, Any]]:
    n, k = setup.config.logging.num_samples, setup.algo.group_size
    tokens, mask = to_host((generation.tokens, generation.mask))  # not the log-probs
    responses, mask = np.asarray(tokens)[:n], np.asarray(mask, bool)[:n]
    texts = setup.tokenizer.batch_decode(
        [r[m].tolist() for r, m in zip(responses, mask)], skip_special_tokens=True
    )
    scores = np.asarray(to_host(scores))[:n]
    return [
        {"prompt": setup.dataset.texts[rows[i // k]], "completion": t, "score": float(s)}
        for i, (t, s) in enumerate(zip(texts, scores))
    ]


def _export(setup: RunSetup, state: RLState, logger: run_logging.RunLogger) -> None:
    """The finished run's policy in HF format to `run_dir/policy` (with LoRA, merged, and the
    peft adapter alone to `run_dir/policy_adapter`). Every process takes part in the gather."""
    policy_params = gather_to_main(state.policy_params)
    if not sharding.is_main_process():
        return
    config, out = setup.rl_models.policy, setup.run_dir / "policy"
    ckpt.save_model(policy_params, config, out, tokenizer=setup.tokenizer)
    message = f"exported the policy to {out}"
    if config.lora is not None:
        ckpt.save_model(
            policy_params,
            config,
            setup.run_dir / "policy_adapter",
            tokenizer=setup.tokenizer,
            lora_mode="adapter",
            base_path=str(setup.paths["policy"]),
        )
        message += f" (adapters merged) and its peft adapter to {out}_adapter"
    logger.message(message)


# ------------------------------------------------------------------------------- checkpoints


def _save(setup: RunSetup, state: RLState, key: jax.Array, positions, iteration: int) -> None:
    """`positions`: the `DataPosition`s of the prompts and of the PPO-ptx texts."""
    position, ptx_position = positions
    rm = setup.rl_models
    saved_models = {"policy": ckpt.model_config_to_dict(rm.policy)}
    if setup.algo.has_critic:
        saved_models["value"] = ckpt.model_config_to_dict(rm.value_head)
    meta = {
        "algorithm": setup.config.section,
        "data_position": [int(position.epoch), int(position.index)],
        "ptx_data_position": [int(ptx_position.epoch), int(ptx_position.index)],
        "num_ptx_texts": len(setup.ptx_dataset) if setup.ptx_dataset is not None else 0,
        "rng_impl": str(jax.random.key_impl(key)),
        "models": saved_models,
        "shared_value_head": setup.algo.has_critic and rm.shared_value_head,
        "num_prompts": len(setup.dataset),
        "sources": {name: str(path) for name, path in setup.paths.items()},
    }
    ckpt.save_rl_state(setup.checkpointer, iteration, state, key, rm, meta)


def _restore(
    setup: RunSetup, programs: IterationPrograms, key: jax.Array, policy: Params, value: Params
):
    """The checkpointed state, key and data positions (see `checkpoint.restore_rl_state`),
    checked against the run's data."""
    state, key, meta = ckpt.restore_rl_state(
        setup.checkpointer,
        setup.resume_step,
        programs.abstract_state,
        programs.shardings.state,
        key,
        (policy, value),
        setup.rl_models,
    )
    if meta.get("num_prompts") != len(setup.dataset):
        raise SetupError(
            f"the checkpoint was written with {meta.get('num_prompts')} prompts but the dataset "
            f"now has {len(setup.dataset)}; resume with the same data section"
        )
    num_ptx = len(setup.ptx_dataset) if setup.ptx_dataset is not None else 0
    if meta.get("num_ptx_texts", 0) != num_ptx:
        raise SetupError(
            f"the checkpoint was written with {meta.get('num_ptx_texts', 0)} PPO-ptx texts but "
            f"ptx_data now has {num_ptx}; resume with the same ptx_data section"
        )
    positions = (
        data.DataPosition(*meta["data_position"]),
        data.DataPosition(*meta.get("ptx_data_position", (0, 0))),
    )
    return state, key, positions
