"""What every training run does before and around its computation: resolving and reading the
models, LoRA wiring, the run directory's checkpointer, mesh checks, signals, the compilation
cache. Everything here is checked or loaded before any compute; problems are `SetupError`s whose
message says how to fix them."""

from __future__ import annotations

import dataclasses
import re
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import checkpoint as ckpt
from rlhf_jax import config as cfg
from rlhf_jax import models, sharding
from rlhf_jax.core import RLModels
from rlhf_jax.models import lora
from rlhf_jax.models.lora import LoRAConfig

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


def check_vocab(tokenizer: Any, config: models.ModelConfig, key: str) -> None:
    size = len(tokenizer)
    if size > config.vocab_size:
        raise SetupError(
            f"the tokenizer has {size} tokens but {key}'s vocabulary has {config.vocab_size}: "
            "they do not belong together (or a new pad token does not fit); set tokenizer.path "
            "to the model's tokenizer, or tokenizer.pad_token to an existing token"
        )


def check_batch_mesh(
    mesh: sharding.MeshConfig,
    devices: Sequence[Any],
    batch_size: int,
    key: str,
    *,
    allow_fewer: bool = False,
) -> tuple[int, int, int]:
    """SetupError unless the `mesh` section fits `devices` and a global batch of `batch_size`
    rows (the config key `key`) divides over its data x fsdp shards and over the processes.
    `allow_fewer`: a batch of fewer rows than shards is allowed in a one-process run (a small
    batch on a large mesh: one row per device, the others idle). Returns the resolved
    `(data, fsdp, tensor)` sizes."""
    try:
        sizes = mesh.resolve(len(devices))
    except ValueError as err:
        raise SetupError(f"mesh: {err}") from err
    data_size, fsdp, tensor = sizes
    shards = data_size * fsdp
    fewer = allow_fewer and batch_size < shards and jax.process_count() == 1
    if batch_size % shards and not fewer:
        raise SetupError(
            f"{key}={batch_size} is not divisible by the mesh's data x fsdp = {shards} "
            f"(mesh {data_size}x{fsdp}x{tensor} over {len(devices)} devices); make {key} a "
            f"multiple of {shards} or change mesh"
        )
    if batch_size % jax.process_count():
        raise SetupError(f"{key}={batch_size} must divide over the {jax.process_count()} processes")
    return sizes


def check_mesh(config: cfg.RLRunConfig, devices: Sequence[Any]) -> None:
    """SetupError unless the run's mesh fits `devices` and its batches (the algorithm's rows,
    unless fewer than the shards in one process, and the PPO-ptx rows) divide over its
    data x fsdp shards and over the processes. (Prompts are replicated and the rows split over
    the shards inside the programs, so this is about even work per device, and about each
    process scoring its own rows with a host reward function.)"""
    algo, section = config.algorithm(), config.section
    key = f"{section}.batch_size" if section == "ppo" else f"{section}.num_prompts x group_size"
    sizes = check_batch_mesh(config.mesh, devices, algo.batch_size, key, allow_fewer=True)
    data_size, fsdp, _ = sizes
    shards = data_size * fsdp
    if config.ptx_data is not None:
        rows = ptx_rows(config)
        parts = algo.num_mini_batches * algo.gradient_accumulation_steps
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


def ptx_rows(config: cfg.RLRunConfig) -> int:
    """Rows of pretraining text per PPO-ptx iteration (default: the algorithm's batch size)."""
    assert config.ptx_data is not None
    return config.ptx_data.batch_size or config.algorithm().batch_size


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


def model_paths(config: cfg.RLRunConfig) -> dict[str, Path]:
    """The local directories of the run's models (`policy`, `reward`, and `value` for an
    algorithm with a critic), by `resolve_model_path`."""
    mc, algo = config.models, config.algorithm()
    paths = {"policy": resolve_model_path(mc.policy, "models.policy")}
    if mc.reward is not None:
        paths["reward"] = resolve_model_path(mc.reward, "models.reward")
    if mc.value is not None and algo.has_critic:
        paths["value"] = resolve_model_path(mc.value, "models.value")
    return paths


def resolve_models(
    config: cfg.RLRunConfig, tokenizer: Any = None, paths: dict[str, Path] | None = None
) -> tuple[RLModels, dict[str, Path]]:
    """The run's `RLModels` (with its LoRA) and model directories, from the models' config.json
    files only (no weights). With a `tokenizer`, each model's vocabulary is checked against it.
    A value model (algorithms with a critic, unless `models.shared_value_head`) is
    `models.value`, else the reward model's architecture, else the policy's trunk."""
    mc, algo = config.models, config.algorithm()
    paths = model_paths(config) if paths is None else paths
    policy = read_model_config(paths["policy"], "models.policy", head="lm", models_config=mc)
    configs: dict[str, Any] = {"policy": policy}
    for name in ("reward", "value"):
        if name in paths:
            configs[name] = read_model_config(
                paths[name], f"models.{name}", head="score", models_config=mc
            )
    if tokenizer is not None:
        for name, model_config in configs.items():
            check_vocab(tokenizer, model_config, f"models.{name}")
    value = None
    if algo.has_critic and not mc.shared_value_head:
        value = configs.get("value") or configs.get("reward")
        value = value or dataclasses.replace(policy, head="score", num_labels=1)
    policy_lora = lora_config(mc, policy)
    try:
        if policy_lora is not None:
            policy = dataclasses.replace(policy, lora=policy_lora)
            if value is not None:
                value = dataclasses.replace(value, lora=value_lora(policy_lora))
    except ValueError as err:
        raise SetupError(f"models.lora: {err}") from err
    # A LoRA value model made from the reward model keeps the reward model's base as its own:
    # one copy of that base, not two (RLModels.value_shares_reward_base).
    shares = value is not None and policy_lora is not None and "value" not in paths
    try:
        rl_models = RLModels(
            policy=policy,
            reward=configs.get("reward"),
            value=value,
            value_shares_reward_base=shares and "reward" in configs,
        )
    except ValueError as err:
        raise SetupError(f"models: {err}") from err
    return rl_models, paths
