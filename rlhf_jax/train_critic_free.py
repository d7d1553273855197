"""`rlhf-jax train rloo | grpo | reinforce++`: the critic-free algorithms as runs.

Same configs, prompt data, device mesh, Orbax checkpoints (exact resume of state, PRNG key and
data position), `stop_after`, SIGINT/SIGTERM handling (finish the iteration, save, exit) and
logging as `train ppo`; no value model is built. Rewards come from a reward
model (`models.reward`), a Python function (`models.reward_function = "module:function"`), or
both (the function's reward plus the model's score). The policy is exported in HF format to
`run_dir/policy` at the end.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from rlhf_jax import checkpoint as ckpt
from rlhf_jax import config as cfg
from rlhf_jax import critic_free as cf
from rlhf_jax import data, sharding
from rlhf_jax import reward_functions as rf
from rlhf_jax.host import release_host_memory
from rlhf_jax.logging import METRICS_FILE, IterationClock, RunLogger, plot_run
from rlhf_jax.models import lora
from rlhf_jax.ppo import check_finite
from rlhf_jax.rewards import check_missing_stop_penalty
from rlhf_jax.trainer import (
    SetupError,
    StopRequest,
    TrainResult,
    checkpoint_due,
    enable_compilation_cache,
    fetch_metrics,
    frozen_params,
    gather_to_main,
    load_params,
    local_rows,
    lora_config,
    open_checkpointer,
    read_model_config,
    resolve_model_path,
    score_rows,
    with_adapters,
)


class _Dispatched(NamedTuple):
    """An iteration whose step has been dispatched: its device metrics (and host ones) and its
    clock."""

    iteration: int
    out: dict[str, Any]
    clock: IterationClock


def _score_own_rows(
    score_fn: Callable[..., tuple[np.ndarray, dict[str, float]]],
    mesh: jax.sharding.Mesh,
    algo: cf.CriticFreeConfig,
    roll: cf.GroupRollout,
    prompt_texts: Sequence[str],
    columns: Mapping[str, Sequence[Any]],
) -> tuple[np.ndarray, dict[str, float]]:
    """`score_fn` (`reward_functions.make_score_fn`) on this process's rows of the sharded
    rollout only: their tokens, masks and reward-model scores are read from its own shards, and
    the scores of all processes gathered (`trainer.score_rows`). Where a process's rows would
    split a group (`num_prompts` not divisible by the process count) every process scores the
    whole batch instead."""
    k, batch = algo.group_size, algo.batch_size
    rows = sharding.local_batch_slice(mesh, batch)
    if rows.start % k or rows.stop % k:
        rows = slice(0, batch)
    prompts = slice(rows.start // k, rows.stop // k)

    def score() -> tuple[np.ndarray, dict[str, float]]:
        gen = roll.generation
        mine = roll._replace(
            generation=gen._replace(
                tokens=local_rows(gen.tokens, rows), mask=local_rows(gen.mask, rows)
            ),
            model_scores=None if roll.model_scores is None else local_rows(roll.model_scores, rows),
        )
        return score_fn(
            mine, list(prompt_texts)[prompts], {c: list(v)[prompts] for c, v in columns.items()}
        )

    return score_rows(score, rows, batch)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _CriticFreeRun:
    """Fields shared by the critic-free run configs (see `PPORunConfig` for their meaning).
    `models.value` and `models.shared_value_head` are ignored: these algorithms have no value
    function."""

    run_dir: str
    seed: int = 0
    stop_after: int | None = None
    compilation_cache: str | None = None
    models: cfg.ModelsConfig
    tokenizer: cfg.TokenizerConfig = dataclasses.field(default_factory=cfg.TokenizerConfig)
    data: cfg.DataConfig
    logging: cfg.LoggingConfig = dataclasses.field(default_factory=cfg.LoggingConfig)
    checkpoint: cfg.CheckpointConfig = dataclasses.field(default_factory=cfg.CheckpointConfig)
    mesh: sharding.MeshConfig = dataclasses.field(default_factory=sharding.MeshConfig)

    def __post_init__(self) -> None:
        if self.stop_after is not None and self.stop_after < 1:
            raise ValueError(f"stop_after must be >= 1 or null, got {self.stop_after}")

    def algorithm(self) -> cf.CriticFreeConfig:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLOORunConfig(_CriticFreeRun):
    """`rlhf-jax train rloo`; `rloo` holds `critic_free.RLOOConfig`."""

    rloo: cf.RLOOConfig

    def algorithm(self) -> cf.CriticFreeConfig:
        return self.rloo


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPORunConfig(_CriticFreeRun):
    """`rlhf-jax train grpo`; `grpo` holds `critic_free.GRPOConfig`."""

    grpo: cf.GRPOConfig

    def algorithm(self) -> cf.CriticFreeConfig:
        return self.grpo


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReinforcePPRunConfig(_CriticFreeRun):
    """`rlhf-jax train reinforce++`; `reinforce` holds `critic_free.ReinforcePPConfig`."""

    reinforce: cf.ReinforcePPConfig

    def algorithm(self) -> cf.CriticFreeConfig:
        return self.reinforce


def train_critic_free(config: _CriticFreeRun, *, resume: bool = False) -> TrainResult:
    """Runs (or resumes) RLOO, GRPO or REINFORCE++ as configured.

    Returns a `TrainResult` whose status is "finished" (the policy is exported to
    `run_dir/policy`), "stopped" (`stop_after`) or "interrupted" (SIGINT/SIGTERM: the current
    iteration is finished and saved). Raises SetupError / DataError / ConfigError before any
    compute, `ppo.NonFiniteError` on NaN/inf (nothing of that iteration is saved) and
    `RewardFunctionError` from reward functions.
    """
    mc = config.models
    policy_path = resolve_model_path(mc.policy, "models.policy")
    tokenizer = data.load_tokenizer(config.tokenizer, str(policy_path))
    policy_config = read_model_config(policy_path, "models.policy", head="lm", models_config=mc)
    reward_config = reward_path = None
    if mc.reward is not None:
        reward_path = resolve_model_path(mc.reward, "models.reward")
        reward_config = read_model_config(
            reward_path, "models.reward", head="score", models_config=mc
        )
    for key, model_config in (("models.policy", policy_config), ("models.reward", reward_config)):
        if model_config is not None and len(tokenizer) > model_config.vocab_size:
            raise SetupError(
                f"{key}: the tokenizer has {len(tokenizer)} tokens but the model's vocabulary is "
                f"{model_config.vocab_size}; use the model's own tokenizer (tokenizer.path)"
            )
    policy_lora = lora_config(mc, policy_config)
    if policy_lora is not None:
        policy_config = dataclasses.replace(policy_config, lora=policy_lora)
    stops = (*config.algorithm().stop_token_ids, *data.stop_token_ids(tokenizer, config.tokenizer))
    try:
        algo = dataclasses.replace(
            config.algorithm(),
            pad_token_id=int(tokenizer.pad_token_id),
            stop_token_ids=tuple(dict.fromkeys(stops)),
        )
        check_missing_stop_penalty(algo.missing_eos_penalty, algo.stop_token_ids)
    except ValueError as err:
        raise SetupError(f"algorithm: {err}") from err
    dataset = data.load_prompts(config.data, tokenizer, extra_columns=config.data.reward_columns)
    try:
        mesh = sharding.make_mesh(config.mesh, jax.devices())
    except ValueError as err:
        raise SetupError(f"mesh: {err}") from err
    run_dir = Path(config.run_dir).absolute()
    checkpointer = open_checkpointer(run_dir, config.checkpoint, resume)
    latest = checkpointer.latest_step()

    # Params load shard by shard onto the mesh; the state is born with its shardings.
    # With LoRA the policy's base is loaded straight into frozen_dtype (it is never trained).
    base_dtype = (mc.frozen_dtype or mc.param_dtype) if policy_lora is not None else None
    policy = load_params(
        policy_path,
        dataclasses.replace(policy_config, param_dtype=base_dtype or policy_config.param_dtype),
        mesh,
        mc.allow_pickle,
    )
    if policy_lora is not None:
        lora_key = jax.random.fold_in(jax.random.key(config.seed), 0x10A)
        policy = with_adapters(policy, policy_config, mesh, lora_key, mc.lora_adapter)
    reward = None
    if reward_path is not None:
        reward = load_params(reward_path, reward_config, mesh, mc.allow_pickle)
    cf_models = cf.CriticFreeModels(policy=policy_config, reward=reward_config)
    shardings = cf.critic_free_shardings(algo, cf_models, mesh)
    init = jax.jit(lambda p: cf.init_state(p, algo, cf_models), out_shardings=shardings.state)
    # Replicated over the mesh (every process holds it): a single-device key cannot be saved in
    # a multi-process checkpoint.
    key = jax.jit(lambda: jax.random.key(config.seed), out_shardings=shardings.replicated)()
    position = data.DataPosition()
    # A LoRA checkpoint holds the trainable half of the policy (adapters, trained heads) only.
    policy_base = lora.split(policy, policy_lora)[1]

    def saved(state: cf.CriticFreeState) -> cf.CriticFreeState:
        return state.replace(policy_params=lora.split(state.policy_params, policy_lora)[0])

    if latest is not None:  # restored straight into its shardings: no fresh state is built
        abstract = {
            "state": saved(
                jax.tree.map(
                    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                    init.eval_shape(policy),
                    shardings.state,
                )
            ),
            "rng": {"key": ckpt.abstract_like(jax.random.key_data(key))},
        }
        restored, meta = checkpointer.restore(latest, abstract)
        state, key = restored["state"], jax.random.wrap_key_data(restored["rng"]["key"])
        state = state.replace(policy_params=lora.join(state.policy_params, policy_base))
        position = data.DataPosition(*meta["data_position"])
    else:
        state = init(policy)
    del policy_base
    needs_ref = algo.core().needs_ref and policy_lora is None  # LoRA: the state's own base
    frozen = cf.CriticFreeFrozen(
        ref=frozen_params(policy, mc.frozen_dtype) if needs_ref else None,
        reward=frozen_params(reward, mc.frozen_dtype),
    )
    del policy, reward

    if mc.reward_function is not None:
        terms = rf.reward_terms([mc.reward_function])
        decode = functools.partial(tokenizer.decode, skip_special_tokens=True)
        rep = shardings.replicated
        score_fn = rf.make_score_fn(terms, decode, algo.group_size)
        step = cf.make_host_iteration(
            algo,
            cf_models,
            functools.partial(_score_own_rows, score_fn, mesh, algo),
            rollout_jit_kwargs=dict(
                in_shardings=(shardings.state, shardings.frozen, rep, rep, rep)
            ),
            update_jit_kwargs=dict(out_shardings=(shardings.state, rep)),
        )
    else:
        step = cf.jit_iteration(algo, cf_models, mesh)
    main = sharding.is_main_process()
    if config.compilation_cache:
        enable_compilation_cache(config.compilation_cache)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save_config(config, run_dir / "config.yaml")
    start, total = int(state.iteration), algo.total_iterations
    end = min(total, config.stop_after or total)
    logger = RunLogger(
        run_dir,
        config.logging,
        total_iterations=total,
        start_iteration=start,
        run_config=cfg.to_dict(config),
        enabled=main,
    )
    logger.message(
        f"{len(dataset)} prompts x {algo.group_size} completions per prompt"
        + (f"; resumed at iteration {start}" if latest is not None else "")
    )
    metrics: dict[str, float] = {}
    status = "finished" if end == total else "stopped"
    iteration = start

    def log(done: _Dispatched) -> dict[str, float]:
        """Fetches, checks and logs a dispatched iteration's metrics."""
        metrics = fetch_metrics(done.out)
        check_finite(metrics, done.iteration)
        tokens = metrics.get("response/length_mean", 0.0) * algo.batch_size
        logger.log(done.iteration, metrics, timings=done.clock.timings(tokens))
        return metrics

    # An iteration's metrics are fetched and logged after the next iteration has been dispatched
    # (the device never waits for the host), except where the iteration is saved: the next
    # iteration donates the state, so a checkpoint (scheduled, or on SIGINT/SIGTERM) is written
    # first, as are the metrics it depends on (nothing non-finite is saved).
    pending: _Dispatched | None = None
    try:
        with StopRequest() as stop:
            while iteration < end:
                if pending is not None:
                    pending.clock.stop()
                clock = IterationClock()
                rows, position = data.batch_indices(
                    len(dataset),
                    algo.num_prompts,
                    position,
                    seed=config.seed,
                    shuffle=config.data.shuffle,
                )
                key, step_key = jax.random.split(key)
                batch = (dataset.tokens[rows], dataset.mask[rows])
                args = (state, frozen, *sharding.place_replicated(batch, mesh), step_key)
                with sharding.with_rules(mesh):
                    if mc.reward_function is not None:
                        columns = {k: [v[i] for i in rows] for k, v in dataset.columns.items()}
                        state, out = step(*args, [dataset.texts[i] for i in rows], columns)
                    else:
                        state, out = step(*args)
                iteration += 1
                if iteration == start + 1:  # compiled now
                    release_host_memory()
                if pending is not None:
                    metrics = log(pending)
                    pending = None
                current = _Dispatched(iteration, out, clock)
                stopping = stop.requested()  # once: all processes must see the same answer
                if not (stopping or checkpoint_due(iteration, end, config.checkpoint.every)):
                    pending = current
                    continue
                metrics = log(current)
                checkpointer.save(
                    iteration,
                    {"state": saved(state), "rng": {"key": jax.random.key_data(key)}},
                    {"data_position": list(position)},
                )
                if stopping:
                    status = "interrupted"
                    logger.message(stop.stopped_message(iteration))
                    break
            if pending is not None:  # (the last iteration is always saved, so logged above)
                metrics = log(pending)
        checkpointer.wait()
        if status == "finished":
            policy_params = gather_to_main(state.policy_params)  # every process takes part
            if main:
                out = run_dir / "policy"
                ckpt.save_model(policy_params, policy_config, out, tokenizer=tokenizer)
                message = f"exported the policy to {out}"
                if policy_lora is not None:  # merged above; the adapter alone for peft too
                    ckpt.save_model(
                        policy_params,
                        policy_config,
                        run_dir / "policy_adapter",
                        tokenizer=tokenizer,
                        lora_mode="adapter",
                        base_path=str(policy_path),
                    )
                    message += f" (adapters merged) and its peft adapter to {out}_adapter"
                logger.message(message)
    finally:
        checkpointer.close()
        logger.close()
    if main and config.logging.plot and (run_dir / METRICS_FILE).exists():
        plot_run(run_dir)
    last = checkpointer.latest_step()
    return TrainResult(
        run_dir,
        iteration,
        status,
        metrics,
        None if last is None else checkpointer.directory / str(last),
    )


def _algorithm(name: str, config: type, help: str) -> cfg.Algorithm:
    return cfg.Algorithm(name=name, config=config, run=train_critic_free, help=help)


RLOO = _algorithm("rloo", RLOORunConfig, "RLOO: leave-one-out baseline over k completions")
GRPO = _algorithm("grpo", GRPORunConfig, "GRPO: group-normalised advantages, KL loss term")
REINFORCE_PP = _algorithm(
    "reinforce++", ReinforcePPRunConfig, "REINFORCE++: globally whitened discounted returns"
)
