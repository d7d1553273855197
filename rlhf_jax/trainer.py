"""The PPO training loop: `rlhf-jax train ppo` as a function, `train_ppo(config)`.

Each iteration takes the next batch of prompts from the dataset and runs the pure functions of
`rlhf_jax.ppo` on a device mesh, as three jitted pieces that together compute exactly
`ppo.ppo_iteration`: `ppo.rollout` (generate; reference log-probs; values) -> scores ->
`ppo.build_experience` + `ppo.finish_iteration` (rewards, GAE, the PPO update). The scores come
from the reward model (`ppo.reward_scores`, jitted, on device) or from a host reward function
(`models.reward_function`): the rollout is decoded and
`scores = reward_fn(prompts, completions, prompt_tokens, completion_tokens)`. Both kinds of
reward share the compiled rollout and update, and the rollout is at hand for sample tables.

Everything that can be checked without compute is checked first (paths, heads, tokenizer/model
vocabularies, the mesh against the batch size, the dataset). The train state (policy and value
params, both optimiser states, the KL controller, the counters), the PRNG key and the data
position are checkpointed with Orbax; `resume=True` continues from the newest complete checkpoint
and reproduces an uninterrupted run exactly. Non-finite rewards, losses or gradients stop the run
before anything of that iteration is saved. SIGINT/SIGTERM finish the current iteration, save a
checkpoint and return.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import checkpoint as ckpt
from rlhf_jax import config as cfg
from rlhf_jax import data, models, ppo, sampling, sharding
from rlhf_jax import logging as run_logging
from rlhf_jax.host import release_host_memory
from rlhf_jax.models import lora
from rlhf_jax.models.lora import LoRAConfig
from rlhf_jax.rewards import check_missing_stop_penalty
from rlhf_jax.sampling import SamplingConfig

Params = Any
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class SetupError(ValueError):
    """The run cannot start (found before any compute); the message says how to fix it."""


class TrainResult(NamedTuple):
    """What `train_ppo` returns.

    Attributes:
      run_dir: the run directory.
      iteration: iterations completed.
      status: "finished" (reached `ppo.total_iterations`), "stopped" (reached `stop_after`) or
        "interrupted" (SIGINT/SIGTERM; a checkpoint was saved).
      metrics: the last iteration's metrics (empty if none ran).
      checkpoint: the newest checkpoint directory, if any.
    """

    run_dir: Path
    iteration: int
    status: str
    metrics: dict[str, float]
    checkpoint: Path | None


# ---------------------------------------------------------------------------- reward functions


class RewardHook(Protocol):
    """A host reward: decoded prompts and completions (and their token ids, without padding;
    completions include the stop token) -> one float per completion, plus metrics to log.
    `columns` are the dataset's `data.reward_columns` for the batch."""

    def __call__(
        self,
        prompts: list[str],
        completions: list[str],
        prompt_tokens: list[list[int]],
        completion_tokens: list[list[int]],
        columns: Mapping[str, list[Any]],
    ) -> tuple[np.ndarray, dict[str, float]]: ...


def reward_hook(spec: str) -> RewardHook:
    """A `RewardHook` around the `"module:function"` reward function, called TRL-style with
    keyword arguments `prompts`, `completions`, `prompt_ids`, `completion_ids` and the dataset
    columns (see `rlhf_jax.reward_functions`). Raises `RewardFunctionError` when the function
    cannot be imported."""
    from rlhf_jax import reward_functions

    terms = reward_functions.reward_terms([spec])

    def hook(prompts, completions, prompt_tokens, completion_tokens, columns):
        return reward_functions.compute_rewards(
            terms,
            prompts,
            completions,
            columns={"prompt_ids": prompt_tokens, "completion_ids": completion_tokens, **columns},
        )

    return hook


# ------------------------------------------------------------------------------------- models


def resolve_model_path(path: str, key: str) -> Path:
    """A local HF model directory for `path`; hub ids are downloaded when the network allows.

    Raises:
      SetupError: naming the config key, with the fix.
    """
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise SetupError(
                f"{key}={path!r} is not a Hugging Face model directory (no config.json); point it "
                "at the directory holding config.json and the *.safetensors weights"
            )
        return local
    if _HUB_ID.match(path):
        try:
            from huggingface_hub import snapshot_download

            return Path(
                snapshot_download(
                    path,
                    allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],
                )
            )
        except Exception as err:
            raise SetupError(
                f"{key}={path!r} is not a local directory and could not be downloaded from the "
                f"hub ({type(err).__name__}: {err}). Download it where the network allows "
                f"(`huggingface-cli download {path} --local-dir DIR`) and set {key}=DIR"
            ) from err
    raise SetupError(f"{key}={path!r} does not exist; set it to a local model directory")


def read_model_config(
    path: Path, key: str, *, head: str, models_config: cfg.ModelsConfig
) -> models.ModelConfig:
    """The `ModelConfig` of the checkpoint at `path` (config.json only; no weights are read),
    with the run's dtypes, remat and scan_layers, checked to have the expected `head`."""
    import transformers

    try:
        hf_config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
        config = models.config_from_hf(hf_config)
    except Exception as err:
        raise SetupError(f"{key}={str(path)!r}: cannot read its config.json ({err})") from err
    if head == "lm" and config.head != "lm":
        raise SetupError(
            f"{key}={str(path)!r} is a {config.head!r}-head model; the policy must be a causal LM"
        )
    if head == "score" and (config.head != "score" or config.num_labels != 1):
        raise SetupError(
            f"{key}={str(path)!r} must be a sequence classifier with one label (a reward or value "
            f"model, *ForSequenceClassification with num_labels=1); got head={config.head!r}, "
            f"num_labels={config.num_labels}"
        )
    return dataclasses.replace(
        config,
        dtype=models_config.dtype,
        param_dtype=models_config.param_dtype,
        remat=models_config.remat,
        attention=models_config.attention,
        scan_layers=models_config.scan_layers,
    )


def value_from_policy(params: Params, config: models.ModelConfig) -> tuple[Params, Any]:
    """A value model from a policy: the same trunk, no LM head, a zero-initialised score head
    (values start at 0)."""
    trunk = {k: v for k, v in params.items() if k != "lm_head"}
    dtype = config.params_dtype
    kernel = jnp.zeros((config.hidden_size, 1), dtype)
    return {**trunk, "score": {"kernel": kernel}}, dataclasses.replace(
        config, head="score", num_labels=1
    )


def lora_config(mc: cfg.ModelsConfig, policy: models.ModelConfig) -> LoRAConfig | None:
    """The run's LoRA: `models.lora`, or that of the peft adapter `models.lora_adapter` (checked
    to fit the policy), or None."""
    if mc.lora_adapter is None:
        return mc.lora
    try:
        _, config = lora.load_peft(mc.lora_adapter, policy)
    except (ValueError, OSError) as err:
        raise SetupError(f"models.lora_adapter={mc.lora_adapter!r}: {err}") from err
    return config.lora


def value_lora(policy_lora: LoRAConfig | None) -> LoRAConfig | None:
    """A LoRA value model's adapters: the policy's rank and targets, and its score head trained
    whole (it is new: zero, or the reward model's)."""
    if policy_lora is None:
        return None
    return dataclasses.replace(policy_lora, train_modules=("score",))


def with_adapters(
    base: Params,
    config: models.ModelConfig,
    mesh,
    key: jax.Array,
    adapter_path: str | None = None,
) -> Params:
    """`base` (a loaded model, any dtype) with `config.lora`'s adapters attached: fresh (peft's
    init) or read from the peft directory `adapter_path`, float32 and placed by the model's
    shardings; the modules in `train_modules` become float32 (they are trained)."""
    shardings = models.param_shardings(config, mesh)
    base_config = dataclasses.replace(config, lora=None)
    if adapter_path is not None:
        adapters, _ = lora.load_peft(adapter_path, base_config)
        adapters = jax.device_put(adapters, lora.split(shardings, config.lora)[0])
    else:
        adapters = jax.jit(
            lambda k: lora.adapters_only(models.init_params(config, k)),
            out_shardings=lora.adapters_only(shardings),
        )(key)
    trainable, frozen = lora.split(lora.join(adapters, base), config.lora)
    return lora.join(jax.tree.map(lambda x: x.astype(jnp.float32), trainable), frozen)


def frozen_params(params: Params | None, dtype: str | None) -> Params | None:
    """`params` (a frozen reference or reward model) stored in `dtype` (`models.frozen_dtype`;
    None: unchanged). Floating leaves are cast where they lie, keeping their shardings."""
    if params is None or dtype is None:
        return params
    target = jnp.dtype(dtype)
    return jax.tree.map(
        lambda x: x.astype(target) if jnp.issubdtype(x.dtype, jnp.floating) else x, params
    )


def load_params(path: Path, config: models.ModelConfig, mesh, allow_pickle: bool) -> Params:
    """Weights of `path` in `config.param_dtype`, loaded shard by shard onto the mesh."""
    params, _ = models.load(path, dtype=config.param_dtype, allow_pickle=allow_pickle, mesh=mesh)
    return params


# ----------------------------------------------------------------------------------- programs


class IterationPrograms(NamedTuple):
    """The trainer's jitted PPO programs (`iteration_programs`) and its state's layout."""

    state_shardings: ppo.PPOState
    abstract_state: ppo.PPOState
    init: Callable[..., ppo.PPOState]
    rollout: Callable[..., ppo.Rollout]
    score: Callable[..., jax.Array]
    finish: Callable[..., tuple[ppo.PPOState, dict[str, jax.Array]]]


@functools.cache
def iteration_programs(
    ppo_config: ppo.PPOConfig, ppo_models: ppo.PPOModels, mesh
) -> IterationPrograms:
    """The jitted pieces of an iteration (cached: runs with the same configs and mesh share
    them, whatever their reward). Together they compute exactly `ppo.ppo_iteration`:

        rollout_key, update_key = split(key)
        roll = rollout(state, ref, prompts, mask, rollout_key)        # ppo.rollout
        width = ppo.bucket_width(roll's sequence lengths)            # on the host
        scores = score(state, reward, roll, width)  or  a host reward function
                                            # ppo.reward_params + ppo.reward_scores
        state, metrics = finish(state, roll, scores, update_key, width=width)
                                            # build_experience + finish_iteration

    `score` and `finish` run on the response columns cut to `width` (`ppo.slice_rollout`; only
    padding is cut), compiled once per length bucket they meet.
    """
    shardings = ppo.ppo_shardings(ppo_config, ppo_models, mesh)
    state_sh, rep = shardings.state, shardings.replicated
    init_fn = lambda p, v: ppo.init_state(p, v, ppo_config, ppo_models)
    abstract = jax.eval_shape(
        init_fn,
        jax.eval_shape(models.init_params, ppo_models.policy, jax.random.key(0)),
        ppo.abstract_value_params(ppo_models),
    )
    kwargs = dict(config=ppo_config, ppo_models=ppo_models)

    def rollout(state, ref, prompts, mask, key):
        frozen = ppo.FrozenParams(ref=ref, reward=None)
        return ppo.rollout(state, frozen, prompts, mask, key, **kwargs)

    def score(state, reward, roll, width):
        gen = ppo.slice_rollout(roll, width).generation
        params = ppo.reward_params(state, ppo.FrozenParams(None, reward), ppo_models)
        return ppo.reward_scores(
            params, ppo_models.reward, roll.prompts, roll.prompt_mask, gen.tokens, gen.mask
        )

    def finish(state, roll, scores, key, ptx=None, *, width):
        roll = ppo.slice_rollout(roll, width)
        exp, exp_metrics = ppo.build_experience(roll, scores, state.kl.kl_coef, config=ppo_config)
        state, metrics = ppo.finish_iteration(state, exp, exp_metrics, key, ptx=ptx, **kwargs)
        mask = roll.generation.mask
        metrics["perf/padded_fraction"] = 1.0 - jnp.mean(mask.astype(jnp.float32))
        return state, metrics

    return IterationPrograms(
        state_sh,
        abstract,
        jax.jit(init_fn, out_shardings=state_sh),
        jax.jit(rollout),
        jax.jit(score, static_argnames="width"),
        jax.jit(
            finish, out_shardings=(state_sh, rep), donate_argnums=(0,), static_argnames="width"
        ),
    )


def to_host(tree: Any) -> Any:
    """Numpy copies of (possibly sharded, multi-process) arrays: the global values."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


def local_rows(x: jax.Array, rows: slice) -> np.ndarray:
    """Rows `rows` of `x`, an array whose leading axis is split over the mesh: this process's own
    rows (`sharding.local_batch_slice`) are read from its own shards (no collective; none of the
    other processes' rows cross the network); all rows (every process passing `slice(None)`)
    are gathered (`to_host`). ValueError for other rows of a multi-process array."""
    n = x.shape[0]
    start, stop, _ = rows.indices(n)
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))[start:stop]
    if (start, stop) == (0, n):
        return np.asarray(to_host(x))
    out: np.ndarray | None = None
    covered = np.zeros(stop - start, bool)
    for shard in x.addressable_shards:
        lo, hi, _ = (shard.index[0] if shard.index else slice(None)).indices(n)
        a, b = max(lo, start), min(hi, stop)
        if a >= b or covered[a - start : b - start].all():
            continue
        data_ = np.asarray(shard.data)
        if out is None:
            out = np.empty((stop - start, *x.shape[1:]), data_.dtype)
        out[a - start : b - start] = data_[a - lo : b - lo]
        covered[a - start : b - start] = True
    if out is None or not covered.all():
        raise ValueError(
            f"rows {start}:{stop} of a batch of {n} are not all on this process's devices; pass "
            "the process's own rows (sharding.local_batch_slice) or all of them"
        )
    return out


def score_rows(
    score: Callable[[], tuple[Any, Mapping[str, float]]], rows: slice, batch_size: int
) -> tuple[np.ndarray, dict[str, float]]:
    """Host reward scores of a global batch of `batch_size` rows, each process scoring only
    `rows` (its own, `sharding.local_batch_slice`; or every row, then no process needs the
    others'). `score() -> (scores of rows, metrics)` runs here; the scores of all processes are
    gathered (a float per row) in row order and each metric (a mean over rows; every process
    scores as many) is averaged over the processes. Returns float32 `[batch_size]` scores and the
    metrics, the same on every process. An exception in any process's `score` is raised in every
    process (the failing one re-raises its own), so none waits forever in a later collective."""
    start, stop, _ = rows.indices(batch_size)
    error: BaseException | None = None
    try:
        out, metrics = score()
        scores = np.asarray(out, np.float32).reshape(-1)
        metrics = {k: float(v) for k, v in metrics.items()}
        if scores.shape != (stop - start,):
            raise ValueError(f"expected {stop - start} scores, got shape {list(scores.shape)}")
    except Exception as err:  # re-raised below, after every process has heard of it
        error, scores, metrics = err, np.zeros(stop - start, np.float32), {}
    if jax.process_count() == 1 or (start, stop) == (0, batch_size):
        if error is not None:
            raise error
        return scores, metrics
    from jax.experimental import multihost_utils

    failed = np.asarray(multihost_utils.process_allgather(np.array(error is not None)))
    if failed.any():
        if error is not None:
            raise error
        bad = ", ".join(str(int(i)) for i in np.flatnonzero(failed))
        raise RuntimeError(f"the reward function failed in process {bad}; see its output")
    keys = sorted(metrics)
    gathered = multihost_utils.process_allgather(
        {
            "start": np.array(start),
            "scores": scores,
            "metrics": np.array([metrics[k] for k in keys], np.float64),
        }
    )
    order = np.argsort(np.asarray(gathered["start"]))
    all_scores = np.concatenate([np.asarray(gathered["scores"])[i] for i in order])
    if all_scores.shape != (batch_size,):
        raise RuntimeError(
            f"the processes scored {all_scores.shape[0]} rows of a batch of {batch_size}"
        )
    means = np.asarray(gathered["metrics"]).mean(axis=0)
    return all_scores, {k: float(v) for k, v in zip(keys, means)}


def gather_to_main(tree: Any) -> Any:
    """The global values of a (possibly sharded, multi-process) pytree as NumPy on process 0
    (e.g. to export it) and None on the others. Leaf by leaf: a process other than 0 holds one
    gathered leaf at a time beyond its shards, and drops it."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    main = sharding.is_main_process()
    leaves, treedef = jax.tree.flatten(tree)
    out = []
    for leaf in leaves:
        full = multihost_utils.process_allgather(leaf, tiled=True)
        out.append(np.asarray(full) if main else None)
        del full
    return jax.tree.unflatten(treedef, out) if main else None


def fetch_metrics(device_metrics: Mapping[str, Any]) -> dict[str, float]:
    """An iteration's metrics as host floats, its device arrays fetched as one tree (`to_host`:
    one device-to-host transfer, not one `float()` per key; host numbers such as a reward
    function's metrics are taken as they are). The training loops call it after
    dispatching the next iteration where they can, so the device is never idle while the host
    waits for, logs and checks the metrics."""
    arrays = {k: v for k, v in device_metrics.items() if isinstance(v, jax.Array)}
    fetched = to_host(arrays)
    return {k: float(fetched[k] if k in arrays else v) for k, v in device_metrics.items()}


# -------------------------------------------------------------------------------------- setup


@dataclasses.dataclass
class _Setup:
    config: cfg.PPORunConfig
    run_dir: Path
    tokenizer: Any
    dataset: data.PromptDataset
    ppo_config: ppo.PPOConfig
    ppo_models: ppo.PPOModels
    paths: dict[str, Path]
    devices: list[Any]
    checkpointer: ckpt.Checkpointer
    resume_step: int | None
    reward_fn: RewardHook | None
    ptx_dataset: data.TextDataset | None = None


def open_checkpointer(
    run_dir: Path, checkpoint: cfg.CheckpointConfig, resume: bool, unit: str = "iteration"
) -> ckpt.Checkpointer:
    """The run directory's checkpointer. A directory that already holds checkpoints is an error
    unless `resume` (a new run must not overwrite or mix with an old one)."""
    checkpointer = ckpt.Checkpointer(
        run_dir, keep=checkpoint.keep, async_save=checkpoint.async_save
    )
    latest = checkpointer.latest_step()
    if latest is not None and not resume:
        checkpointer.close()
        raise SetupError(
            f"{run_dir} already has checkpoints (newest: {unit} {latest}); pass --resume to "
            "continue that run, or choose another run_dir"
        )
    return checkpointer


def _check_vocab(tokenizer: Any, config: models.ModelConfig, key: str) -> None:
    size = len(tokenizer)
    if size > config.vocab_size:
        raise SetupError(
            f"the tokenizer has {size} tokens but {key}'s vocabulary has {config.vocab_size}: "
            "they do not belong together (or a new pad token does not fit); set tokenizer.path "
            "to the model's tokenizer, or tokenizer.pad_token to an existing token"
        )


def check_batch_mesh(
    mesh: sharding.MeshConfig, devices: Sequence[Any], batch_size: int, key: str
) -> tuple[int, int, int]:
    """SetupError unless the `mesh` section fits `devices` and a global batch of `batch_size`
    rows (the config key `key`) divides over its data x fsdp shards and over the processes.
    Returns the resolved `(data, fsdp, tensor)` sizes."""
    try:
        sizes = mesh.resolve(len(devices))
    except ValueError as err:
        raise SetupError(f"mesh: {err}") from err
    data_size, fsdp, tensor = sizes
    shards = data_size * fsdp
    if batch_size % shards:
        raise SetupError(
            f"{key}={batch_size} is not divisible by the mesh's data x fsdp = {shards} "
            f"(mesh {data_size}x{fsdp}x{tensor} over {len(devices)} devices); make {key} a "
            f"multiple of {shards} or change mesh"
        )
    if batch_size % jax.process_count():
        raise SetupError(f"{key}={batch_size} must divide over the {jax.process_count()} processes")
    return sizes


def check_mesh(config: cfg.PPORunConfig, devices: Sequence[Any]) -> None:
    """SetupError unless the run's mesh fits `devices` and its batches divide over it."""
    data_size, fsdp, _ = check_batch_mesh(
        config.mesh, devices, config.ppo.batch_size, "ppo.batch_size"
    )
    shards = data_size * fsdp
    if config.ptx_data is not None:
        rows = ptx_rows(config)
        parts = config.ppo.num_mini_batches * config.ppo.gradient_accumulation_steps
        for what, n in (
            ("num_mini_batches x gradient_accumulation_steps", parts),
            ("the mesh's data x fsdp", shards),
            ("the process count", jax.process_count()),
        ):
            if rows % n:
                raise SetupError(
                    f"ptx_data.batch_size={rows} (rows of pretraining text per iteration) is not "
                    f"divisible by {what} = {n}; set ptx_data.batch_size to a multiple of it"
                )


def ptx_rows(config: cfg.PPORunConfig) -> int:
    """Rows of pretraining text per PPO-ptx iteration."""
    assert config.ptx_data is not None
    return config.ptx_data.batch_size or config.ppo.batch_size


def prepare_ppo(
    config: cfg.PPORunConfig, *, resume: bool = False, devices: Sequence[Any] | None = None
) -> _Setup:
    """Every check that needs no compute: paths, tokenizer, model configs and vocabularies, the
    mesh, the dataset, the run directory's checkpoints. Raises SetupError/DataError."""
    mc = config.models
    paths = {"policy": resolve_model_path(mc.policy, "models.policy")}
    if mc.reward is not None:
        paths["reward"] = resolve_model_path(mc.reward, "models.reward")
    if mc.value is not None:
        paths["value"] = resolve_model_path(mc.value, "models.value")
    tokenizer = data.load_tokenizer(config.tokenizer, str(paths["policy"]))
    policy_cfg = read_model_config(paths["policy"], "models.policy", head="lm", models_config=mc)
    configs = {"policy": policy_cfg}
    for name in ("reward", "value"):
        if name in paths:
            configs[name] = read_model_config(
                paths[name], f"models.{name}", head="score", models_config=mc
            )
    for name, model_config in configs.items():
        _check_vocab(tokenizer, model_config, f"models.{name}")
    if mc.shared_value_head:
        configs["value"] = None
    elif "value" not in configs:
        if "reward" in configs:
            configs["value"] = configs["reward"]
        else:
            configs["value"] = dataclasses.replace(policy_cfg, head="score", num_labels=1)
    policy_lora = lora_config(mc, policy_cfg)
    try:
        if policy_lora is not None:
            policy_cfg = dataclasses.replace(policy_cfg, lora=policy_lora)
            if configs["value"] is not None:
                configs["value"] = dataclasses.replace(
                    configs["value"], lora=value_lora(policy_lora)
                )
    except ValueError as err:
        raise SetupError(f"models.lora: {err}") from err
    # A LoRA value model made from the reward model keeps the reward model's base as its own:
    # one copy of that base, not two (ppo.PPOModels.value_shares_reward_base).
    shares = policy_lora is not None and "value" not in paths and "reward" in configs
    try:
        ppo_models = ppo.PPOModels(
            policy=policy_cfg,
            value=configs["value"],
            reward=configs.get("reward", configs["value"] or policy_cfg),
            value_shares_reward_base=shares and not mc.shared_value_head,
        )
    except ValueError as err:
        raise SetupError(f"models: {err}") from err
    pad_id = int(tokenizer.pad_token_id)
    if config.ppo.pad_token_id not in (0, pad_id):
        raise SetupError(
            f"ppo.pad_token_id={config.ppo.pad_token_id} differs from the tokenizer's pad token "
            f"id {pad_id}; leave ppo.pad_token_id unset (it is taken from the tokenizer)"
        )
    stops = tuple(
        dict.fromkeys(
            (*config.ppo.stop_token_ids, *data.stop_token_ids(tokenizer, config.tokenizer))
        )
    )
    try:
        ppo_config = dataclasses.replace(config.ppo, pad_token_id=pad_id, stop_token_ids=stops)
        check_missing_stop_penalty(ppo_config.missing_eos_penalty, ppo_config.stop_token_ids)
    except ValueError as err:
        raise SetupError(f"ppo: {err}") from err
    devices = list(devices) if devices is not None else jax.devices()
    check_mesh(config, devices)
    dataset = data.load_prompts(config.data, tokenizer, extra_columns=config.data.reward_columns)
    ptx_dataset = None
    if config.ptx_data is not None:
        ptx_dataset = data.load_texts(config.ptx_data, tokenizer)
    reward_fn = reward_hook(mc.reward_function) if mc.reward_function is not None else None
    run_dir = Path(config.run_dir).absolute()
    checkpointer = open_checkpointer(run_dir, config.checkpoint, resume)
    return _Setup(
        config=config,
        run_dir=run_dir,
        tokenizer=tokenizer,
        dataset=dataset,
        ppo_config=ppo_config,
        ppo_models=ppo_models,
        paths=paths,
        devices=devices,
        checkpointer=checkpointer,
        resume_step=checkpointer.latest_step() if resume else None,
        reward_fn=reward_fn,
        ptx_dataset=ptx_dataset,
    )


# ---------------------------------------------------------------------------------- signals


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag checked between iterations (a second signal of the same
    kind acts immediately)."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def stopped_message(self, iteration: int) -> str:
        return (
            f"{self.signal or 'a signal'}: saved a checkpoint at iteration {iteration} and "
            "stopped; continue with --resume"
        )

    def requested(self) -> bool:
        """Whether any process got a signal (all processes agree, so they stop together)."""
        flag = self.signal is not None
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            flag = bool(np.any(multihost_utils.process_allgather(np.array(flag))))
        return flag


def checkpoint_due(iteration: int, end: int, every: int) -> bool:
    """A scheduled checkpoint after `iteration`: every `every` iterations (0: never) and at the
    last iteration `end` of this run."""
    return bool(every and iteration % every == 0) or iteration == end


# ----------------------------------------------------------------------------------- training


def enable_compilation_cache(path: str | Path) -> None:
    """Points JAX's persistent compilation cache at `path` (effective for later compilations
    even if this process has compiled before). Later runs with the same programs, devices and
    flags load the executables instead of compiling them."""
    from jax.experimental.compilation_cache import compilation_cache

    Path(path).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    compilation_cache.reset_cache()


def train_ppo(
    config: cfg.PPORunConfig, *, resume: bool = False, devices: Sequence[Any] | None = None
) -> TrainResult:
    """Runs (or resumes) PPO as configured.

    Args:
      config: the run config.
      resume: continue from the newest complete checkpoint in `config.run_dir` (start fresh if
        there is none). Without it, a run directory with checkpoints is an error.
      devices: the devices of the mesh (default: all).
    Returns:
      A `TrainResult`.
    Raises:
      SetupError, data.DataError, config.ConfigError: before any compute.
      ppo.NonFiniteError: an iteration produced NaN/inf (nothing of it was saved).
      reward_functions.RewardFunctionError: the reward function failed or returned NaN/inf.
    """
    setup = prepare_ppo(config, resume=resume, devices=devices)
    try:
        return _train(setup)
    finally:
        setup.checkpointer.close()


def _train(setup: _Setup) -> TrainResult:
    config, run_dir, tok = setup.config, setup.run_dir, setup.tokenizer
    main = sharding.is_main_process()
    if config.compilation_cache:
        enable_compilation_cache(config.compilation_cache)
    changed = _changed_since_last_run(config, run_dir) if setup.resume_step is not None else []
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save_config(config, run_dir / "config.yaml")
        tok.save_pretrained(str(run_dir / ckpt.TOKENIZER_DIR))
    mesh = sharding.make_mesh(config.mesh, setup.devices)
    pm, pc = setup.ppo_models, setup.ppo_config
    programs = iteration_programs(pc, pm, mesh)
    mc = config.models

    with sharding.with_rules(mesh):
        # With LoRA the bases are loaded straight into frozen_dtype: only adapters train.
        use_lora = pm.policy.lora is not None
        base_dtype = (mc.frozen_dtype or mc.param_dtype) if use_lora else None

        def load(name: str, model_config: models.ModelConfig) -> Params:
            if base_dtype is not None:
                model_config = dataclasses.replace(model_config, param_dtype=base_dtype)
            return load_params(setup.paths[name], model_config, mesh, mc.allow_pickle)

        policy = load("policy", pm.policy)
        reward = load("reward", pm.reward) if "reward" in setup.paths else None
        if pm.shared_value_head:
            value = jax.device_put(
                ppo.value_head_init(pm.policy), programs.state_shardings.value_params
            )
        elif "value" in setup.paths:
            value = load("value", pm.value)
        elif reward is not None:
            value = reward  # init_state copies it (models.value_from_reward semantics)
        else:  # the policy's trunk + a zero score head, built where the shards lie
            # (adapters, with LoRA, are attached below to both)
            value_config = dataclasses.replace(pm.value, lora=None)
            value = jax.jit(
                lambda p: value_from_policy(p, pm.policy)[0],
                out_shardings=models.param_shardings(value_config, mesh),
            )(policy)
        key = jax.random.key(config.seed)
        if use_lora:
            lora_keys = jax.random.split(jax.random.fold_in(key, 0x10A), 2)
            policy = with_adapters(policy, pm.policy, mesh, lora_keys[0], mc.lora_adapter)
            if pm.value_lora is not None:
                value = with_adapters(value, pm.value, mesh, lora_keys[1])
        position = ptx_position = data.DataPosition()
        if setup.resume_step is not None:
            state, key, position, ptx_position = _restore(setup, programs, key, policy, value)
        else:
            state = programs.init(policy, value)
        del value
        # From here `policy` is only the frozen reference (the state owns the trained copy); with
        # LoRA the reference is the state's own base, adapters off.
        policy = None if use_lora else frozen_params(policy, mc.frozen_dtype)
        if pm.value_shares_reward_base:  # the state's value base is the reward's; keep its head
            reward = {"score": reward["score"]}
        reward = frozen_params(reward, mc.frozen_dtype)

    start = int(state.iteration)
    total = pc.total_iterations
    end = min(total, config.stop_after or total)
    logger = run_logging.RunLogger(
        run_dir,
        config.logging,
        total_iterations=total,
        start_iteration=start,
        run_config=cfg.to_dict(config),
        enabled=main,
    )
    ds = setup.dataset
    logger.message(
        f"{len(ds)} prompts of {config.data.path}"
        + (f" ({ds.num_truncated} truncated from the left)" if ds.num_truncated else "")
        + (f" ({ds.num_dropped} longer than max_prompt_length dropped)" if ds.num_dropped else "")
        + (f"; resumed at iteration {start}" if setup.resume_step is not None else "")
    )
    if changed:
        logger.message(
            "warning: resuming with a config that differs from the run's in "
            + ", ".join(changed)
            + "; the continuation will not match an uninterrupted run"
        )
    local = sharding.local_batch_slice(mesh, pc.batch_size)
    ptx_ds = setup.ptx_dataset
    if ptx_ds is not None:
        ptx_size = ptx_rows(config)
        ptx_local = sharding.local_batch_slice(mesh, ptx_size)
        logger.message(
            f"PPO-ptx: {len(ptx_ds)} texts of {config.ptx_data.path}, {ptx_size} per iteration"
            + (f" ({ptx_ds.num_truncated} cut to max_length)" if ptx_ds.num_truncated else "")
            + (f" ({ptx_ds.num_dropped} under 2 tokens dropped)" if ptx_ds.num_dropped else "")
        )
    metrics: dict[str, float] = {}
    status = "finished" if end == total else "stopped"
    iteration = start
    try:
        with StopRequest() as stop:

            def finish_logging(done: _Dispatched) -> tuple[dict[str, float], bool]:
                """Fetches, checks and logs a dispatched iteration, writes its samples and its
                checkpoint when due or on a signal. Returns its metrics and whether to stop.
                `state` is still that iteration's: only the next update donates it."""
                metrics = fetch_metrics(done.device_metrics)
                metrics.update(done.host_metrics)
                ppo.check_finite(metrics, done.iteration)
                tokens = float(metrics.get("response/length_mean", 0.0)) * pc.batch_size
                logger.log(done.iteration, metrics, timings=done.clock.timings(tokens))
                every = config.logging.sample_every
                if every and (done.iteration % every == 0 or done.iteration == end):
                    logger.samples(
                        done.iteration, _sample_rows(setup, done.rows, done.generation, done.scores)
                    )
                stopping = stop.requested()  # once: all processes must see the same answer
                if stopping or checkpoint_due(done.iteration, end, config.checkpoint.every):
                    _save(setup, state, done.key, done.positions, done.iteration)
                if stopping:
                    logger.message(stop.stopped_message(done.iteration))
                return metrics, stopping

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
                rows, next_position = data.batch_indices(
                    len(ds), pc.batch_size, position, seed=config.seed, shuffle=config.data.shuffle
                )
                prompts, mask = sharding.place_batch(
                    (ds.tokens[rows][local], ds.mask[rows][local]), mesh
                )
                ptx_batch = None
                if ptx_ds is not None:
                    ptx_batch_rows, next_ptx_position = data.batch_indices(
                        len(ptx_ds),
                        ptx_size,
                        ptx_position,
                        seed=config.seed + 1,
                        shuffle=config.ptx_data.shuffle,
                    )
                    ptx_batch = ppo.PtxBatch(
                        *sharding.place_batch(
                            (
                                ptx_ds.tokens[ptx_batch_rows][ptx_local],
                                ptx_ds.mask[ptx_batch_rows][ptx_local],
                            ),
                            mesh,
                        )
                    )
                key, iteration_key = jax.random.split(key)
                rollout_key, update_key = jax.random.split(iteration_key)
                with sharding.with_rules(mesh):
                    roll = programs.rollout(state, policy, prompts, mask, rollout_key)
                if pending is not None:
                    metrics, stopping = finish_logging(pending)
                    pending = None
                    if stopping:
                        status = "interrupted"
                        break
                with sharding.with_rules(mesh):
                    lengths = to_host(roll.generation.sequence_lengths)
                    width = ppo.bucket_width(lengths, pc)
                    if reward is not None:
                        scores = programs.score(state, reward, roll, width)
                        reward_metrics = {}
                    else:
                        scores, reward_metrics = _host_scores(
                            setup, roll, rows, local, iteration + 1
                        )
                        scores = sharding.place_batch(scores[local], mesh)
                    state, device_metrics = programs.finish(
                        state, roll, scores, update_key, ptx_batch, width=width
                    )
                iteration += 1
                if iteration == start + 1:  # the programs are compiled now
                    release_host_memory()
                position = next_position
                if ptx_ds is not None:
                    ptx_position = next_ptx_position
                pending = _Dispatched(
                    iteration=iteration,
                    device_metrics=device_metrics,
                    host_metrics={"perf/response_bucket": float(width), **reward_metrics},
                    clock=clock,
                    rows=rows,
                    generation=roll.generation,
                    scores=scores,
                    key=key,
                    positions=(position, ptx_position),
                )
            if pending is not None:  # the last iteration
                metrics, stopping = finish_logging(pending)
                if stopping:
                    status = "interrupted"
        setup.checkpointer.wait()
    finally:
        setup.checkpointer.wait()
        logger.close()
    if main and config.logging.plot and (run_dir / run_logging.METRICS_FILE).exists():
        run_logging.plot_run(run_dir)
    latest = setup.checkpointer.latest_step()
    return TrainResult(
        run_dir=run_dir,
        iteration=iteration,
        status=status,
        metrics=metrics,
        checkpoint=None if latest is None else setup.checkpointer.directory / str(latest),
    )


class _Dispatched(NamedTuple):
    """A PPO iteration whose update has been dispatched but not yet logged."""

    iteration: int
    device_metrics: dict[str, jax.Array]
    host_metrics: dict[str, float]  # the length bucket and the reward function's metrics
    clock: run_logging.IterationClock
    rows: np.ndarray  # the batch's dataset rows
    generation: Any  # the rollout's sampled tokens (its log-probs and values are not kept)
    scores: Any
    key: jax.Array  # the run's key after this iteration's split
    positions: tuple[data.DataPosition, data.DataPosition]  # after this iteration


_RESUME_FREE = ("run_dir", "stop_after", "compilation_cache", "logging.", "checkpoint.")


def _changed_since_last_run(config: cfg.PPORunConfig, run_dir: Path) -> list[str]:
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
    setup: _Setup, roll: ppo.Rollout, rows: np.ndarray, local: slice, iteration: int
) -> tuple[np.ndarray, dict[str, float]]:
    """Decodes this process's rows (`local` of the global batch; their tokens and masks read
    from its own shards) and calls the host reward function on them only (`score_rows`):
    float32 `[B]` scores of the global batch and the reward function's metrics."""

    def score() -> tuple[np.ndarray, dict[str, float]]:
        tokens = local_rows(roll.generation.tokens, local)
        response_mask = local_rows(roll.generation.mask, local).astype(bool)
        ds, tok, mine = setup.dataset, setup.tokenizer, rows[local]
        prompt_tokens = [ds.tokens[r][ds.mask[r]].tolist() for r in mine]
        completion_tokens = [t[m].tolist() for t, m in zip(tokens, response_mask)]
        completions = tok.batch_decode(completion_tokens, skip_special_tokens=True)
        columns = {name: [ds.columns[name][r] for r in mine] for name in ds.columns}
        try:
            return setup.reward_fn(
                [ds.texts[r] for r in mine], completions, prompt_tokens, completion_tokens, columns
            )
        except ValueError as err:
            raise type(err)(f"iteration {iteration}: {err}") from err

    return score_rows(score, local, len(rows))


def _sample_rows(
    setup: _Setup, rows: np.ndarray, generation: Any, scores: Any
) -> list[dict[str, Any]]:
    n = setup.config.logging.num_samples
    tokens, mask = to_host((generation.tokens, generation.mask))  # not the log-probs
    responses, mask = np.asarray(tokens)[:n], np.asarray(mask, bool)[:n]
    texts = setup.tokenizer.batch_decode(
        [r[m].tolist() for r, m in zip(responses, mask)], skip_special_tokens=True
    )
    scores = np.asarray(to_host(scores))[:n]
    return [
        {"prompt": setup.dataset.texts[r], "completion": t, "score": float(s)}
        for r, t, s in zip(rows[:n], texts, scores)
    ]


# ------------------------------------------------------------------------------- checkpoints


def _items(state: ppo.PPOState, key_data: Any, ppo_models: ppo.PPOModels) -> dict[str, Any]:
    """What a checkpoint holds: with LoRA only the trainable halves of the models (adapters and
    trained heads; the bases are re-read from the model paths on resume and export)."""
    train_state = {
        "policy_opt_state": state.policy_opt_state,
        "value_opt_state": state.value_opt_state,
        "kl": state.kl,
        "iteration": state.iteration,
        "episode": state.episode,
        "rng": key_data,
    }
    if state.penalty_beta is not None:  # PPO-Penalty's adapted coefficient
        train_state["penalty_beta"] = state.penalty_beta
    return {
        "policy": lora.split(state.policy_params, ppo_models.policy.lora)[0],
        "value": lora.split(state.value_params, ppo_models.value_lora)[0],
        "train_state": train_state,
    }


def _save(setup: _Setup, state: ppo.PPOState, key: jax.Array, positions, iteration: int) -> None:
    """`positions`: the `DataPosition`s of the prompts and of the PPO-ptx texts."""
    position, ptx_position = positions
    meta = {
        "algorithm": "ppo",
        "data_position": [int(position.epoch), int(position.index)],
        "ptx_data_position": [int(ptx_position.epoch), int(ptx_position.index)],
        "num_ptx_texts": len(setup.ptx_dataset) if setup.ptx_dataset is not None else 0,
        "rng_impl": str(jax.random.key_impl(key)),
        "models": {
            "policy": ckpt.model_config_to_dict(setup.ppo_models.policy),
            "value": ckpt.model_config_to_dict(setup.ppo_models.value_head),
        },
        "shared_value_head": setup.ppo_models.shared_value_head,
        "num_prompts": len(setup.dataset),
        "sources": {name: str(path) for name, path in setup.paths.items()},
    }
    items = _items(state, jax.random.key_data(key), setup.ppo_models)
    setup.checkpointer.save(iteration, items, meta)


def _restore(
    setup: _Setup, programs: IterationPrograms, key: jax.Array, policy: Params, value: Params
):
    """The checkpointed state; with LoRA its trainable halves are joined to the bases of the
    freshly loaded `policy` / `value` (the models' frozen halves are not in checkpoints)."""
    pm = setup.ppo_models
    shardings = programs.state_shardings
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        programs.abstract_state,
        shardings,
    )
    key_data = jax.random.key_data(key)
    rng = jax.ShapeDtypeStruct(key_data.shape, key_data.dtype, sharding=shardings.iteration)
    items, meta = setup.checkpointer.restore(setup.resume_step, _items(abstract, rng, pm))
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
    train_state = items["train_state"]
    state = ppo.PPOState(
        policy_params=lora.join(items["policy"], lora.split(policy, pm.policy.lora)[1]),
        # (copied: a value model's base may be the reward model's arrays, which stay frozen)
        value_params=lora.join(
            items["value"], jax.tree.map(jnp.copy, lora.split(value, pm.value_lora)[1])
        ),
        policy_opt_state=train_state["policy_opt_state"],
        value_opt_state=train_state["value_opt_state"],
        kl=train_state["kl"],
        iteration=train_state["iteration"],
        episode=train_state["episode"],
        penalty_beta=train_state.get("penalty_beta"),
    )
    restored_key = jax.random.wrap_key_data(train_state["rng"], impl=meta["rng_impl"])
    ptx_position = data.DataPosition(*meta.get("ptx_data_position", (0, 0)))
    return state, restored_key, data.DataPosition(*meta["data_position"]), ptx_position


# -------------------------------------------------------------------------------- generation


def load_policy(path: str | Path, *, dtype: str | None = None) -> tuple[Params, Any, Any]:
    """`(params, model_config, tokenizer)` of a causal LM: an HF directory (with its tokenizer)
    or one of our checkpoints (`RUN/checkpoints/<iteration>` or a run directory, with the run's
    saved tokenizer)."""
    import transformers

    path = Path(path)
    is_checkpoint = (path / ckpt.META).is_dir() or (path / ckpt.CHECKPOINTS_DIR).is_dir()
    if is_checkpoint:
        params, config = ckpt.restore_params(path, "policy")
        tokenizer = ckpt.load_run_tokenizer(path)
        if dtype is not None:
            config = dataclasses.replace(config, dtype=dtype)
        return params, config, tokenizer
    local = resolve_model_path(str(path), "--model")
    params, config = models.load(local, dtype=dtype)
    if config.head != "lm":
        raise SetupError(f"{path} is a {config.head!r}-head model; generate needs a causal LM")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(local))
    return params, config, tokenizer


# One compiled sampler per (model, sampling) config (with the CPU decode compiler options).
_jit_generate = functools.cache(sampling.jit_generate)


def generate_completions(
    params: Params,
    model_config: models.ModelConfig,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    greedy: bool = False,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    chat: bool = False,
) -> list[dict[str, Any]]:
    """Completes text prompts (left-padded into one batch; stops at the tokenizer's EOS).

    Returns one dict per prompt: `prompt`, `completion` (decoded, special tokens skipped),
    `prompt_token_ids`, `token_ids` (the response tokens up to and including the stop token)
    and `stopped`.
    """
    if not prompts:
        raise ValueError("give at least one prompt")
    _check_vocab(tokenizer, model_config, "the model")
    if chat:
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    else:
        encoded = tokenizer(list(prompts))["input_ids"]
    if any(len(ids) == 0 for ids in encoded):
        raise ValueError("a prompt tokenizes to nothing")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
    length = max(len(ids) for ids in encoded)
    tokens = np.full((len(encoded), length), pad, np.int32)
    mask = np.zeros((len(encoded), length), bool)
    for i, ids in enumerate(encoded):
        tokens[i, length - len(ids) :] = ids
        mask[i, length - len(ids) :] = True
    sampling = SamplingConfig(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        greedy=greedy,
        top_k=top_k,
        top_p=top_p,
        stop_token_ids=() if eos is None else (int(eos),),
        pad_token_id=int(pad),
    )
    gen = _jit_generate(model_config, sampling)(params, tokens, mask, jax.random.key(seed))
    out_tokens, out_mask = np.asarray(gen.tokens), np.asarray(gen.mask, bool)
    results = []
    for i, prompt in enumerate(prompts):
        ids = out_tokens[i][out_mask[i]].tolist()
        results.append(
            {
                "prompt": prompt,
                "completion": tokenizer.decode(ids, skip_special_tokens=True),
                "prompt_token_ids": list(encoded[i]),
                "token_ids": ids,
                "stopped": bool(np.asarray(gen.stopped)[i]),
            }
        )
    return results
