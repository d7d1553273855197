"""Orbax checkpoints of a training run, and export of a checkpoint to Hugging Face format.

A run directory holds `checkpoints/<iteration>/`, one Orbax checkpoint per saved iteration with
the items

    policy, value     parameter pytrees (whatever the algorithm trains; value is optional)
    train_state       optimiser states, controller states, counters, the PRNG key data
    meta              JSON: the iteration, the data position, the models' `ModelConfig`s, ...

and `tokenizer/` (written once by the trainer). Orbax writes each checkpoint into a temporary
directory and renames it when every item is complete, so a process killed in the middle of a
save leaves the previous checkpoint as the latest one; the unfinished directory is removed before
the next save. Saves can run asynchronously: device arrays are copied to the host before
`save` returns, so the caller may donate them to the next step right away.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from rlhf_jax import models
from rlhf_jax.models import lora
from rlhf_jax.models.config import freeze_rope_scaling

CHECKPOINTS_DIR = "checkpoints"
TOKENIZER_DIR = "tokenizer"
META = "meta"
HANG_ENV = "RLHF_JAX_HANG_IN_SAVE"
"""Test hook: when set to an iteration number, the save of that iteration never commits (its
temporary directory exists and is being written; a later save waits for it forever), so a test
can kill the process in the middle of a save."""


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not match the run."""


async def _hang(iteration: str) -> None:
    print(f"rlhf_jax: {HANG_ENV}: hanging inside the save of {iteration}", file=sys.stderr)
    sys.stderr.flush()
    await asyncio.sleep(3600)


class _MetaHandler(ocp.handlers.JsonCheckpointHandler):
    """JSON metadata item; honours the `HANG_ENV` test hook by adding a commit operation that
    never finishes (it starts once the temporary directories exist)."""

    async def async_save(self, directory, item=None, args=None):
        futures = await super().async_save(directory, item, args)
        hang = os.environ.get(HANG_ENV)
        if hang and args is not None and str(args.item.get("iteration")) == hang:
            blocker = ocp.future.CommitFutureAwaitingContractedSignals(_hang(hang), name="hang")
            futures = [*(futures or []), blocker]
        return futures


@ocp.args.register_with_handler(_MetaHandler, for_save=True)
@dataclasses.dataclass
class _MetaSave(ocp.args.CheckpointArgs):
    item: dict[str, Any]


@ocp.args.register_with_handler(_MetaHandler, for_restore=True)
@dataclasses.dataclass
class _MetaRestore(ocp.args.CheckpointArgs):
    item: dict[str, Any] | None = None


# ------------------------------------------------------------------------------- model configs


def model_config_to_dict(config: models.ModelConfig) -> dict[str, Any]:
    """A `ModelConfig` as JSON-safe values (inverse: `model_config_from_dict`)."""
    out = dataclasses.asdict(config)
    if config.rope_scaling is not None:
        out["rope_scaling"] = dict(config.rope_scaling)
    return out


def model_config_from_dict(values: Mapping[str, Any]) -> models.ModelConfig:
    """Rebuilds a `ModelConfig` written by `model_config_to_dict`."""
    values = dict(values)
    if values.get("rope_scaling") is not None:
        values["rope_scaling"] = freeze_rope_scaling(values["rope_scaling"])
    if isinstance(values.get("eos_token_id"), list):
        values["eos_token_id"] = tuple(values["eos_token_id"])
    return models.ModelConfig(**values)


# ---------------------------------------------------------------------------------- manager


class Checkpointer:
    """Saves and restores the checkpoints of one run directory (`run_dir/checkpoints`).

    Args:
      run_dir: the run directory.
      keep: number of newest checkpoints to keep.
      async_save: write in the background (`wait` blocks until done).
    """

    def __init__(self, run_dir: str | Path, *, keep: int = 3, async_save: bool = True) -> None:
        self.directory = Path(run_dir).absolute() / CHECKPOINTS_DIR
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's iteration, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, items: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
        """Saves pytrees `items` (e.g. `{"policy": params, "train_state": {...}}`) and JSON
        `meta` as checkpoint `step`. Arrays are on the host when this returns."""
        args = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
        args[META] = _MetaSave(dict(meta, iteration=int(step)))
        self._manager.save(int(step), args=ocp.args.Composite(**args), force=True)

    def restore(
        self, step: int, abstract_items: Mapping[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restores the named items onto the shapes, dtypes and shardings of `abstract_items`
        (pytrees of `jax.ShapeDtypeStruct`); returns `(items, meta)`."""
        args = {name: ocp.args.StandardRestore(tree) for name, tree in abstract_items.items()}
        args[META] = _MetaRestore()
        restored = self._manager.restore(int(step), args=ocp.args.Composite(**args))
        meta = dict(restored[META])
        return {name: restored[name] for name in abstract_items}, meta

    def wait(self) -> None:
        """Blocks until a background save has been committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(tree: Any) -> Any:
    """`jax.ShapeDtypeStruct`s (with shardings) of a pytree of arrays or abstract arrays."""

    def leaf(x: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

    return jax.tree.map(leaf, tree)


# ------------------------------------------------------------------------- single checkpoints


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a path to one, or to a run directory (its newest checkpoint).

    Raises:
      CheckpointError: nothing complete there.
    """
    path = Path(path).absolute()
    if (path / META).is_dir():
        if not (path / "_CHECKPOINT_METADATA").exists() and path.name.endswith("-tmp"):
            raise CheckpointError(f"{path} is an unfinished checkpoint (the save was interrupted)")
        return path
    ckpt_root = path / CHECKPOINTS_DIR if (path / CHECKPOINTS_DIR).is_dir() else path
    steps = (
        sorted(
            (int(p.name) for p in ckpt_root.iterdir() if p.name.isdigit() and (p / META).is_dir()),
        )
        if ckpt_root.is_dir()
        else []
    )
    if not steps:
        raise CheckpointError(
            f"no checkpoint at {path}; pass RUN_DIR/checkpoints/<iteration> or a run directory"
        )
    return ckpt_root / str(steps[-1])


def run_dir_of(checkpoint_dir: str | Path) -> Path:
    """The run directory a checkpoint belongs to (`RUN/checkpoints/<iteration>`)."""
    return Path(checkpoint_dir).absolute().parent.parent


def read_meta(checkpoint_dir: str | Path) -> dict[str, Any]:
    """The JSON metadata of a checkpoint directory."""
    import json

    file = Path(checkpoint_dir) / META / "metadata"
    if not file.exists():
        raise CheckpointError(f"{checkpoint_dir} has no {META}/metadata; is it a checkpoint?")
    return json.loads(file.read_text())


def restore_params(
    checkpoint_dir: str | Path, item: str = "policy", *, sharding: Any = None
) -> tuple[Any, models.ModelConfig]:
    """Restores one parameter item of a checkpoint with its `ModelConfig`.

    Args:
      checkpoint_dir: `RUN/checkpoints/<iteration>` (or a run directory: the newest one).
      item: "policy" or "value" (a run with a value head on the policy trunk gives the value
        model made of the policy's trunk and that head).
      sharding: where to put every array (default: the first device).
    """
    checkpoint_dir = resolve_checkpoint(checkpoint_dir)
    meta = read_meta(checkpoint_dir)
    configs = meta.get("models", {})
    if item not in configs or not (checkpoint_dir / item).is_dir():
        raise CheckpointError(f"{checkpoint_dir} has no {item!r} model; it has {sorted(configs)}")
    config = model_config_from_dict(configs[item])
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shapes = models.param_shapes(config)
    shared_head = item == "value" and meta.get("shared_value_head", False)
    if shared_head:
        shapes = {"score": shapes["score"]}
    elif config.lora is not None:  # a LoRA run saves only the trainable half
        shapes = lora.split(shapes, config.lora)[0]
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes
    )
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(checkpoint_dir / item, abstract)
    if shared_head:
        policy, _ = restore_params(checkpoint_dir, "policy", sharding=sharding)
        params = {**{k: v for k, v in policy.items() if k != "lm_head"}, "score": params["score"]}
    elif config.lora is not None:
        params = lora.join(params, lora.split(_lora_base(meta, item, sharding), config.lora)[1])
    return params, config


def _lora_base(meta: Mapping[str, Any], item: str, sharding: Any) -> Any:
    """The base model of a LoRA run's `item`, read from the model path the run recorded: the
    policy's; a value model's own, else the reward model's, else the policy's trunk."""
    sources = meta.get("sources", {})
    names = ["policy"] if item == "policy" else ["value", "reward", "policy"]
    for name in names:
        source = sources.get(name)
        if source is None:
            continue
        if not (Path(source) / "config.json").exists():
            raise CheckpointError(
                f"the checkpoint holds LoRA adapters only; their base model {source} (the run's "
                f"models.{name}) is not available to rebuild the {item} model"
            )
        params, _ = models.load(source)
        params = jax.device_put(params, sharding)
        if name == "policy" and item == "value":  # the trunk; the score head is trained
            params = {k: v for k, v in params.items() if k != "lm_head"}
        return params
    raise CheckpointError(f"the checkpoint records no base model for its LoRA {item} model")


def load_run_tokenizer(checkpoint_dir: str | Path) -> Any:
    """The tokenizer saved with the run of a checkpoint (`RUN/tokenizer`)."""
    import transformers

    path = run_dir_of(resolve_checkpoint(checkpoint_dir)) / TOKENIZER_DIR
    if not path.is_dir():
        raise CheckpointError(f"the run has no saved tokenizer at {path}")
    return transformers.AutoTokenizer.from_pretrained(str(path))


def save_model(
    params: Any,
    config: models.ModelConfig,
    out: Path,
    *,
    tokenizer: Any = None,
    lora_mode: str = "merged",
    base_path: str | None = None,
) -> None:
    """Writes one model: an HF checkpoint, or for a LoRA model with `lora_mode="adapter"` a peft
    adapter directory (for `base_path`); "merged" folds the adapters into an HF checkpoint."""
    if config.lora is not None and lora_mode == "adapter":
        lora.save_peft(out, params, config, base_model_name_or_path=base_path)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        return
    if config.lora is not None:  # written in float32 (see `lora.merge`)
        params = jax.tree.map(lambda x: x.astype("float32"), lora.merge(params, config))
        config = dataclasses.replace(config, lora=None, param_dtype="float32")
    models.save(params, config, out, tokenizer=tokenizer)


def export(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    value: bool = True,
    reward: bool = False,
    lora_mode: str = "merged",
) -> dict[str, Path]:
    """Writes a checkpoint's models in Hugging Face format with the run's tokenizer.

    The policy goes to `out_dir` itself (so `AutoModelForCausalLM.from_pretrained(out_dir)` and
    `rlhf-jax generate --model out_dir` work); with `value`, the value model to `out_dir/value`
    and with `reward` the (frozen) reward model the run used to `out_dir/reward` (both
    `*ForSequenceClassification` checkpoints). Returns the written paths.

    LoRA runs (whose checkpoints hold adapters only; the base is read from the model path the
    run recorded): `lora_mode="merged"` writes full HF checkpoints with the adapters folded in;
    "adapter" writes peft adapter directories (`adapter_config.json` +
    `adapter_model.safetensors`) that `peft.PeftModel.from_pretrained(base, out_dir)` loads.

    Raises:
      CheckpointError: no complete checkpoint there, or the reward model's source directory
        (recorded in the checkpoint) is gone.
    """
    checkpoint_dir = resolve_checkpoint(checkpoint)
    tokenizer = load_run_tokenizer(checkpoint_dir)
    meta = read_meta(checkpoint_dir)
    out = Path(out_dir)
    written = {}
    if lora_mode not in ("merged", "adapter"):
        raise ValueError(f"lora_mode must be 'merged' or 'adapter', got {lora_mode!r}")
    sources = meta.get("sources", {})
    params, config = restore_params(checkpoint_dir, "policy")
    if lora_mode == "adapter" and config.lora is None:
        raise CheckpointError("--lora adapter: this run trained the whole policy, not adapters")
    save_model(
        params,
        config,
        out,
        tokenizer=tokenizer,
        lora_mode=lora_mode,
        base_path=sources.get("policy"),
    )
    written["policy"] = out
    if value and "value" in meta.get("models", {}):
        params, config = restore_params(checkpoint_dir, "value")
        base = sources.get("value") or sources.get("reward") or sources.get("policy")
        mode = lora_mode if not meta.get("shared_value_head") else "merged"
        save_model(
            params, config, out / "value", tokenizer=tokenizer, lora_mode=mode, base_path=base
        )
        written["value"] = out / "value"
    if reward:
        source = meta.get("sources", {}).get("reward")
        if source is None or not (Path(source) / "config.json").exists():
            raise CheckpointError(
                f"the run's reward model ({source or 'none recorded'}) is not available to export"
            )
        params, config = models.load(source)
        models.save(params, config, out / "reward", tokenizer=tokenizer)
        written["reward"] = out / "reward"
    return written


# ------------------------------------------------------------------------- an RL run's state


def rl_items(state: Any, key_data: Any, rl_models: Any) -> dict[str, Any]:
    """What an RL run's checkpoint holds of its `core.RLState` and key: `policy`, `value` (with a
    critic) and `train_state` (optimiser states, KL controller, counters, key, the algorithm's
    state). With LoRA only the trainable halves of the models (adapters and trained heads; the
    bases are re-read from the model paths on resume and export)."""
    train_state = {
        "opt_state": state.opt_state,
        "kl": state.kl,
        "iteration": state.iteration,
        "episode": state.episode,
        "rng": key_data,
    }
    items = {"policy": lora.split(state.policy_params, rl_models.policy.lora)[0]}
    if state.value_params is not None:
        train_state["value_opt_state"] = state.value_opt_state
        items["value"] = lora.split(state.value_params, rl_models.value_lora)[0]
    if state.algo_state is not None:  # e.g. PPO-Penalty's adapted coefficient
        train_state["algo_state"] = state.algo_state
    return {**items, "train_state": train_state}


def save_rl_state(
    checkpointer: Checkpointer,
    step: int,
    state: Any,
    key: jax.Array,
    rl_models: Any,
    meta: Mapping[str, Any],
) -> None:
    """Saves an RL run's state and key (`rl_items`) with `meta` at `step`."""
    checkpointer.save(step, rl_items(state, jax.random.key_data(key), rl_models), meta)


def restore_rl_state(
    checkpointer: Checkpointer,
    step: int,
    abstract_state: Any,
    shardings: Any,
    key: jax.Array,
    bases: tuple[Any, Any],
    rl_models: Any,
) -> tuple[Any, jax.Array, dict[str, Any]]:
    """`(state, key, meta)` of the checkpoint at `step`, restored straight into `shardings`
    (the `core.RLState`'s). With LoRA the saved trainable halves are joined to the frozen halves
    of `bases` (the freshly loaded `(policy, value)` params; `value` is copied, as a value
    model's base may be the reward model's arrays, which stay frozen)."""
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings
    )
    key_data = jax.random.key_data(key)
    rng = jax.ShapeDtypeStruct(key_data.shape, key_data.dtype, sharding=key.sharding)
    items, meta = checkpointer.restore(step, rl_items(abstract, rng, rl_models))
    policy, value = bases
    train_state = items["train_state"]
    value_params = None
    if "value" in items:
        base = jax.tree.map(jnp.copy, lora.split(value, rl_models.value_lora)[1])
        value_params = lora.join(items["value"], base)
    state = abstract_state.replace(
        policy_params=lora.join(items["policy"], lora.split(policy, rl_models.policy.lora)[1]),
        opt_state=train_state["opt_state"],
        kl=train_state["kl"],
        iteration=train_state["iteration"],
        episode=train_state["episode"],
        value_params=value_params,
        value_opt_state=train_state.get("value_opt_state"),
        algo_state=train_state.get("algo_state"),
    )
    restored_key = jax.random.wrap_key_data(train_state["rng"], impl=meta["rng_impl"])
    return state, restored_key, meta
