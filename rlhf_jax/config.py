"""Run configurations: frozen dataclasses loaded from YAML plus dotted `key.sub=value` overrides.

The dataclasses are the schema. `load_config(cls, "configs/x.yaml", ["ppo.batch_size=64"])`
merges the YAML file and the overrides onto `cls` with OmegaConf structured configs (which check
every key and type), then builds the frozen dataclasses, whose `__post_init__` validate values.
Every error is a `ConfigError` that names the offending key.

Training algorithms are registered by name (`register_algorithm`) with their config dataclass and
run function; the CLI's `rlhf-jax train NAME` looks them up here.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rlhf_jax.models.lora import LoRAConfig
from rlhf_jax.ppo import PPOConfig
from rlhf_jax.sharding import MeshConfig

T = TypeVar("T")

DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key."""


# ------------------------------------------------------------------------------------ sections


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelsConfig:
    """Which models to load. Paths are local Hugging Face directories (config.json + safetensors)
    or hub ids, which are downloaded when the network allows.

    Attributes:
      policy: the SFT policy; also the frozen reference model.
      reward: a reward model (sequence classifier with one label).
      reward_function: `"module:function"` computing rewards on the host from decoded text
        (exactly one of `reward` / `reward_function`).
      value: initial value model. None: a copy of the reward model (`models.value_from_reward`),
        or with a reward function, the policy's backbone with a zero-initialised score head.
      shared_value_head: no value model; a zero-initialised scalar head on the policy's trunk
        gives the values, and the value loss trains the trunk with the policy loss
        (`ppo.PPOModels(value=None)`). Excludes `value`.
      dtype: compute dtype ("float32" | "bfloat16" | "float16"); matmuls run in it, norms,
        softmaxes, the LM/score heads' outputs and the losses stay float32.
      param_dtype: dtype of the trained parameters (policy, value) and their AdamW moments:
        float32 only, as master weights (in bfloat16 an RL-sized update rounds away:
        `optim.check_trainable`).
      frozen_dtype: storage dtype of the frozen reference and reward models (None: param_dtype);
        "bfloat16" halves their memory and changes nothing that is learned.
      remat: what the backward pass recomputes of each layer (`models.ModelConfig.remat`):
        "dots" (keep the weight-matmul outputs; recompute the elementwise work), "full" (least
        memory, about a third more compute) or "none" (keep everything); true/false mean
        "full"/"none".
      attention: "auto" (TPU flash kernel on TPU, cuDNN on GPU in 16-bit, XLA elsewhere), "xla",
        "flash" or "cudnn" (`models.ModelConfig.attention`).
      scan_layers: full passes scan over the layers (True) or run them unrolled (False); null:
        unrolled for models of at most 4 layers (`models.ModelConfig.scan_layers`).
      allow_pickle: allow `*.bin` (pickle) checkpoints, read with `torch.load(weights_only=True)`.
      lora: train LoRA adapters instead of the whole models (`models.LoRAConfig`: rank, alpha,
        targets, train_modules). The policy's base (stored in `frozen_dtype`) is also the
        reference model, adapters off; a value model gets its own adapters and a trained score
        head on its base; only the adapters (and trained heads) have gradients, AdamW moments
        and checkpoints.
      lora_adapter: a peft LoRA adapter directory to start the policy from (e.g. an SFT
        adapter); its own rank, alpha and targets are used (exclusive with `lora`).
    """

    policy: str
    reward: str | None = None
    reward_function: str | None = None
    value: str | None = None
    shared_value_head: bool = False
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    param_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    frozen_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    remat: bool | Literal["none", "dots", "full"] = "dots"
    attention: Literal["auto", "xla", "flash", "cudnn"] = "auto"
    scan_layers: bool | None = None
    allow_pickle: bool = False
    lora: LoRAConfig | None = None
    lora_adapter: str | None = None

    def __post_init__(self) -> None:
        if self.lora is not None and self.lora_adapter is not None:
            raise ValueError(
                "set one of models.lora (fresh adapters) and models.lora_adapter (start from a "
                "peft adapter, with its own rank and targets), not both"
            )
        if (self.reward is None) == (self.reward_function is None):
            raise ValueError(
                "set exactly one of models.reward (a reward-model path) and "
                "models.reward_function ('module:function'), got "
                f"reward={self.reward!r}, reward_function={self.reward_function!r}"
            )
        if self.param_dtype != "float32":
            raise ValueError(
                f"models.param_dtype={self.param_dtype} would store the trained policy and value "
                "params and their AdamW moments in 16 bits, where an update at RL learning rates "
                "(~1e-6) is below half an ulp of most weights and rounds away: the model would not "
                "learn. Keep models.param_dtype=float32; for memory and speed set "
                "models.dtype=bfloat16 (compute) and models.frozen_dtype=bfloat16 (reference and "
                "reward models)"
            )
        if self.shared_value_head and self.value is not None:
            raise ValueError(
                "models.shared_value_head=true puts the value head on the policy, so there is no "
                f"value model to load; unset models.value (got {self.value!r})"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class TokenizerConfig:
    """The tokenizer and the special tokens generation uses.

    Attributes:
      path: tokenizer directory or hub id; None: the policy's path.
      pad_token: token to use for padding when the tokenizer has none (added to the vocabulary if
        it is not in it; it must still fit the models' embedding tables). Set this, e.g. "[PAD]",
        for tokenizers such as Pythia's that have no pad token.
      stop_at_eos: responses end at the tokenizer's EOS token (added to `ppo.stop_token_ids`).
      extra_stop_tokens: more tokens (as strings, each a single token) that end a response.
      chat_template: a Jinja chat template replacing the tokenizer's (for `data.chat`).
    """

    path: str | None = None
    pad_token: str | None = None
    stop_at_eos: bool = True
    extra_stop_tokens: tuple[str, ...] = ()
    chat_template: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """A prompt dataset.

    Attributes:
      path: a local `.jsonl` / `.json` / `.parquet` / `.csv` file, a `datasets.save_to_disk`
        directory, or a hub dataset id (needs the `datasets` package and network).
      format: "auto" (from the file extension / directory), or one of "jsonl", "json",
        "parquet", "csv", "disk" (save_to_disk directory), "hub".
      split: split of a hub dataset or a saved `DatasetDict`.
      column: the column holding the prompt.
      chat: the column holds a chat (a list of `{"role", "content"}` messages, or a string taken
        as one user message), rendered with the tokenizer's chat template and the generation
        prompt; trailing assistant messages are dropped.
      add_special_tokens: let the tokenizer add its special tokens (e.g. BOS) to plain-text
        prompts (chat templates insert their own).
      max_prompt_length: prompts are left-padded to this many tokens.
      truncation: longer prompts are cut from the "left" (keeping the end) or dropped ("drop").
      shuffle: visit the prompts in a fresh random order every epoch (seeded by `seed`).
      max_prompts: use only the first N prompts (after dropping over-long ones).
      reward_columns: dataset columns passed to a reward function as keyword lists, one value
        per completion (e.g. reference answers for a verifiable reward).
    """

    path: str
    format: Literal["auto", "jsonl", "json", "parquet", "csv", "disk", "hub"] = "auto"
    split: str = "train"
    column: str = "prompt"
    chat: bool = False
    add_special_tokens: bool = True
    max_prompt_length: int = 512
    truncation: Literal["left", "drop"] = "drop"
    shuffle: bool = True
    max_prompts: int | None = None
    reward_columns: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_prompt_length < 1:
            raise ValueError(f"max_prompt_length must be >= 1, got {self.max_prompt_length}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ValueError(f"max_prompts must be >= 1 or null, got {self.max_prompts}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PtxDataConfig:
    """Pretraining text for PPO-ptx (InstructGPT): with `ppo.ptx_coef > 0`, every PPO minibatch
    adds `ptx_coef` times the LM loss (mean next-token NLL) on its share of a batch of these rows.

    Attributes:
      path, format, split: as in `DataConfig`.
      column: the text column.
      max_length: tokens per row, right-padded; a longer text keeps its first `max_length`
        tokens (counted as truncated). Texts of fewer than 2 tokens are dropped.
      batch_size: rows per iteration (None: `ppo.batch_size`). They are split like the rollouts
        into `num_mini_batches x gradient_accumulation_steps` parts; each minibatch of every
        PPO epoch uses its part.
      add_special_tokens: let the tokenizer add its special tokens (e.g. BOS).
      shuffle: a fresh order on every pass over the rows (seeded by `seed`).
    """

    path: str
    format: Literal["auto", "jsonl", "json", "parquet", "csv", "disk", "hub"] = "auto"
    split: str = "train"
    column: str = "text"
    max_length: int = 512
    batch_size: int | None = None
    add_special_tokens: bool = True
    shuffle: bool = True

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or null, got {self.batch_size}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoggingConfig:
    """What the trainer reports (only process 0 writes).

    Attributes:
      log_every: print a compact metrics line every N iterations (metrics.jsonl gets every one).
      sample_every: print and record a table of sample completions every N iterations (0: off).
      num_samples: rows in that table.
      progress_bar: show a tqdm progress bar with ETA.
      tensorboard: write TensorBoard event files to `run_dir/tensorboard`.
      wandb: log to Weights & Biases (needs the `wandb` package).
      wandb_project, wandb_name: W&B project and run name (default: the run directory's name).
      plot: write PNG curves to `run_dir/plots` at the end of the run.
    """

    log_every: int = 10
    sample_every: int = 50
    num_samples: int = 4
    progress_bar: bool = True
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "rlhf-jax"
    wandb_name: str | None = None
    plot: bool = True

    def __post_init__(self) -> None:
        if self.log_every < 1 or self.sample_every < 0 or self.num_samples < 1:
            raise ValueError(
                "need log_every >= 1, sample_every >= 0 and num_samples >= 1, got "
                f"{self.log_every}, {self.sample_every}, {self.num_samples}"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Orbax checkpoints in `run_dir/checkpoints/<iteration>`.

    Attributes:
      every: save every N iterations (0: only at the end and on SIGINT/SIGTERM).
      keep: keep the newest K checkpoints.
      async_save: write in a background thread while training continues.
    """

    every: int = 100
    keep: int = 3
    async_save: bool = True

    def __post_init__(self) -> None:
        if self.every < 0 or self.keep < 1:
            raise ValueError(f"need every >= 0 and keep >= 1, got {self.every}, {self.keep}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPORunConfig:
    """Everything `rlhf-jax train ppo` needs.

    Attributes:
      run_dir: output directory (config, logs, checkpoints, tokenizer, plots).
      seed: seeds the PRNG key of the run and the data order.
      stop_after: stop (with a checkpoint) once this many iterations are done, without changing
        the learning-rate schedule; for splitting a run into time-limited jobs. None: run to
        `ppo.total_iterations`.
      compilation_cache: directory for JAX's persistent compilation cache (None: off).
      models, tokenizer, data, logging, checkpoint: see their classes.
      ptx_data: pretraining text for PPO-ptx; required when `ppo.ptx_coef > 0`, else unset.
      ppo: `rlhf_jax.ppo.PPOConfig`; `pad_token_id` comes from the tokenizer and the tokenizer's
        stop tokens are added to `stop_token_ids`.
      mesh: `rlhf_jax.sharding.MeshConfig`, the `(data, fsdp, tensor)` device mesh.
    """

    run_dir: str
    seed: int = 0
    stop_after: int | None = None
    compilation_cache: str | None = None
    models: ModelsConfig
    tokenizer: TokenizerConfig = dataclasses.field(default_factory=TokenizerConfig)
    data: DataConfig
    ppo: PPOConfig
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    ptx_data: PtxDataConfig | None = None

    def __post_init__(self) -> None:
        if self.stop_after is not None and self.stop_after < 1:
            raise ValueError(f"stop_after must be >= 1 or null, got {self.stop_after}")
        if self.ppo.ptx_coef > 0 and self.ptx_data is None:
            raise ValueError(
                f"ppo.ptx_coef={self.ppo.ptx_coef} needs pretraining text: set ptx_data.path "
                "(a dataset with a text column), or ppo.ptx_coef=0"
            )
        if self.ptx_data is not None and self.ppo.ptx_coef <= 0:
            raise ValueError(
                "ptx_data is set but ppo.ptx_coef=0, so it would be unused; set ppo.ptx_coef > 0 "
                "or remove ptx_data"
            )


# ------------------------------------------------------------------------------------- loading


def _describe(err: OmegaConfBaseException) -> str:
    message = str(getattr(err, "msg", None) or err).splitlines()[0]
    key = getattr(err, "full_key", None)
    return f"{key}: {message}" if key else message


def _dataclass_fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _required_keys(cls: type, prefix: str = "") -> list[str]:
    """Dotted names of the fields without defaults, recursively."""
    out = []
    for f in dataclasses.fields(cls):
        hint = _dataclass_fields(cls)[f.name]
        no_default = (
            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
        )
        if no_default and dataclasses.is_dataclass(hint):
            out.extend(_required_keys(hint, f"{prefix}{f.name}."))
        elif no_default:
            out.append(f"{prefix}{f.name}")
    return out


def _locate_value_error(node: DictConfig, cls: type, prefix: str) -> tuple[str, Exception] | None:
    """Finds the innermost section whose dataclass rejects its values."""
    for name, hint in _dataclass_fields(cls).items():
        if dataclasses.is_dataclass(hint) and isinstance(node.get(name), DictConfig):
            found = _locate_value_error(node[name], hint, f"{prefix}{name}.")
            if found is not None:
                return found
    try:
        OmegaConf.to_object(node)
    except (ValueError, TypeError) as err:
        return prefix.rstrip(".") or "<top level>", err
    return None


def _strip_optional(hint: Any) -> Any:
    """`X | None` -> `X` when X is the only other member (sections that may be null)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return hint


def _field_hint(cls: Any, parts: Sequence[str], where: str) -> Any:
    """The type hint of the dotted key `parts` under the dataclass `cls`.

    Raises ConfigError naming the key and the section's keys when a part is not a field. Below a
    field that is not a dataclass (`Any`, a mapping), every key is allowed and `Any` returned.
    """
    hint: Any = cls
    for i, part in enumerate(parts):
        section = _strip_optional(hint)
        if not dataclasses.is_dataclass(section):
            return Any
        fields = _dataclass_fields(section)  # type: ignore[arg-type]
        if part not in fields:
            name = ".".join(parts[: i + 1])
            raise ConfigError(
                f"{where}{name}: unknown key; {section.__name__} has "  # type: ignore[union-attr]
                + ", ".join(sorted(fields))
            )
        hint = fields[part]
    return hint


def _type_name(hint: Any) -> str:
    """A type hint in words, for error messages: `tuple[int, ...] | None` -> "a list of int or
    null"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return "any value"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (tuple, list) or (isinstance(origin, type) and issubclass(origin, Sequence)):
        inner = args[0] if args else Any
        return f"a list of {_type_name(inner)}"
    if origin is dict or (isinstance(origin, type) and issubclass(origin, Mapping)):
        return "a mapping"
    if dataclasses.is_dataclass(hint):
        return f"a {hint.__name__} section"
    names = {type(None): "null", bool: "true/false", int: "int", float: "float", str: "str"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _conforms(value: Any, hint: Any) -> bool:
    """Whether a parsed YAML value fits a field's type hint (unknown hint kinds accept anything:
    OmegaConf and the dataclass's `__post_init__` still check them)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or (isinstance(value, str) and value.startswith("${")):
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(map(_conforms, value, args))
        return all(_conforms(v, args[0]) for v in value) if args else True
    if dataclasses.is_dataclass(hint):
        return isinstance(value, Mapping)
    return True


def _check_values(cls: Any, values: Mapping[str, Any], prefix: str, where: str) -> None:
    """Checks every key of a parsed YAML mapping against the dataclass `cls`: unknown keys and
    values that do not fit the field's type are ConfigErrors naming the key and the type."""
    for key, value in values.items():
        name = f"{prefix}{key}"
        hint = _field_hint(cls, [str(key)], where + prefix)
        section = _strip_optional(hint)
        if dataclasses.is_dataclass(section) and isinstance(value, Mapping):
            _check_values(section, value, f"{name}.", where)
        elif not _conforms(value, hint):
            raise ConfigError(f"{where}{name} expects {_type_name(hint)}, got {value!r}")


def _schema(cls: type) -> DictConfig:
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"expected a dataclass type, got {cls!r}")
    return OmegaConf.structured(cls)


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    values: Mapping[str, Any] | None = None,
) -> T:
    """Builds a frozen config dataclass from a YAML file, a mapping and dotted overrides.

    Args:
      cls: the config dataclass (nested dataclasses become YAML sections).
      path: YAML file (optional).
      overrides: `"key.sub=value"` strings applied in order after the file (values are parsed as
        YAML: `ppo.stop_token_ids=[0,2]`, `models.value=null`).
      values: a mapping merged after the file and before the overrides.
    Returns:
      An instance of `cls`.
    Raises:
      ConfigError: unreadable file, unknown key, wrong type, missing required value or a value a
        dataclass rejects; the message names the key.
    """
    merged = _schema(cls)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            file_cfg = OmegaConf.load(path)
        except (yaml.YAMLError, OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"cannot parse {path}: {err}") from err
        except OmegaConfBaseException as err:  # valid YAML that OmegaConf cannot hold
            plain = yaml.safe_load(path.read_text())
            if isinstance(plain, Mapping):
                _check_values(cls, plain, "", f"{path}: ")  # names the key and its type
            raise ConfigError(f"cannot parse {path}: {_describe(err)}") from err
        if not isinstance(file_cfg, DictConfig):
            raise ConfigError(f"{path} must hold a mapping of sections, got a list")
        _check_values(cls, OmegaConf.to_container(file_cfg), "", f"{path}: ")
        try:
            merged = OmegaConf.merge(merged, file_cfg)
        except OmegaConfBaseException as err:
            raise ConfigError(f"{path}: {_describe(err)}") from err
    if values:
        _check_values(cls, dict(values), "", "")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.create(dict(values)))
        except OmegaConfBaseException as err:
            raise ConfigError(_describe(err)) from err
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        try:
            yaml.safe_load(raw)  # syntax only: OmegaConf's loader below also reads 1e-5 as a float
        except yaml.YAMLError as err:
            problem = str(err).splitlines()[0]
            raise ConfigError(
                f"override {item!r}: the value is not valid YAML ({problem}); quote it, e.g. "
                f"{key}=\"['?']\""
            ) from err
        hint = _field_hint(cls, key.split("."), f"override {item!r}: ")
        try:
            parsed = OmegaConf.to_container(OmegaConf.from_dotlist([item]))
        except (OmegaConfBaseException, yaml.YAMLError, ValueError, TypeError) as err:
            raise ConfigError(
                f"override {item!r}: {key} expects {_type_name(hint)}, got {raw.strip()!r}"
            ) from err
        _check_values(cls, parsed, "", f"override {item!r}: ")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.create(parsed))
        except OmegaConfBaseException as err:
            raise ConfigError(f"override {item!r}: {_describe(err)}") from err
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        hints = dict(_dataclass_fields(cls))
        needed = []
        for key in missing:
            hint = hints.get(key)
            if hint is not None and dataclasses.is_dataclass(hint):
                needed.extend(_required_keys(hint, f"{key}."))
            else:
                needed.append(key)
        raise ConfigError(
            "missing required value(s): " + ", ".join(needed) + " (set them in the YAML file or "
            "as key=value overrides)"
        )
    try:
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise ConfigError(_describe(err)) from err
    except (ValueError, TypeError) as err:
        found = _locate_value_error(merged, cls, "")
        where, cause = found if found is not None else ("<config>", err)
        raise ConfigError(f"{where}: {cause}") from err


def to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as plain nested dicts/lists (JSON- and YAML-safe)."""
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)  # type: ignore[return-value]


def to_yaml(config: Any) -> str:
    """The resolved config as YAML that `load_config` reads back to an equal object."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def save_config(config: Any, path: str | Path) -> None:
    """Writes `to_yaml(config)` to `path`."""
    Path(path).write_text(to_yaml(config))


def diff_configs(a: Any, b: Any, ignore: Sequence[str] = ()) -> list[str]:
    """Dotted keys whose values differ between two configs of the same class (for resume
    checks); keys starting with any prefix in `ignore` are skipped."""

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(d, dict):
            out: dict[str, Any] = {}
            for k, v in d.items():
                out |= flat(v, f"{prefix}{k}.")
            return out
        return {prefix[:-1]: d}

    fa, fb = flat(to_dict(a)), flat(to_dict(b))
    keys = sorted(set(fa) | set(fb))
    return [k for k in keys if fa.get(k) != fb.get(k) and not any(k.startswith(p) for p in ignore)]


# ------------------------------------------------------------------------------------ registry


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """A trainer the CLI can run as `rlhf-jax train NAME`.

    `config` is the run-config dataclass, `run` a function `run(config, *, resume: bool) -> Any`.
    Either may be given as an import string `"package.module:attribute"`, resolved on first use,
    so registering costs no imports.
    """

    name: str
    config: type | str
    run: Callable[..., Any] | str
    help: str = ""

    def config_class(self) -> type:
        return _resolve(self.config) if isinstance(self.config, str) else self.config

    def run_fn(self) -> Callable[..., Any]:
        return _resolve(self.run) if isinstance(self.run, str) else self.run


def _resolve(spec: str) -> Any:
    module, _, attr = spec.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


_ALGORITHMS: dict[str, Algorithm] = {}
_BROKEN: dict[str, str] = {}
ENTRY_POINT_GROUP = "rlhf_jax.algorithms"


def register_algorithm(
    name: str,
    *,
    config: type | str,
    run: Callable[..., Any] | str,
    help: str = "",
    replace: bool = False,
) -> Algorithm:
    """Registers `rlhf-jax train NAME`. Packages can also register through the entry-point group
    `rlhf_jax.algorithms`, whose entries load to an `Algorithm`."""
    if name in _ALGORITHMS and not replace:
        raise ValueError(f"algorithm {name!r} is already registered; pass replace=True")
    algorithm = Algorithm(name=name, config=config, run=run, help=help)
    _ALGORITHMS[name] = algorithm
    return algorithm


def algorithms() -> dict[str, Algorithm]:
    """The registered algorithms (built-ins plus entry points), by name. An entry point that
    fails to load is reported on stderr and skipped."""
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINT_GROUP):
        if entry.name in _ALGORITHMS or entry.name in _BROKEN:
            continue
        try:
            algorithm = entry.load()
            if not isinstance(algorithm, Algorithm):
                raise TypeError(f"{entry.value} is a {type(algorithm).__name__}, not an Algorithm")
        except Exception as err:  # one broken plugin must not take the whole CLI down
            _BROKEN[entry.name] = f"{type(err).__name__}: {err}"
            print(
                f"rlhf-jax: warning: algorithm {entry.name!r} ({entry.value}) is unavailable: "
                f"{_BROKEN[entry.name]}",
                file=sys.stderr,
            )
            continue
        _ALGORITHMS[entry.name] = algorithm
    return dict(_ALGORITHMS)


register_algorithm(
    "ppo",
    config="rlhf_jax.config:PPORunConfig",
    run="rlhf_jax.trainer:train_ppo",
    help="PPO with a reward model or a reward function (TRL PPOTrainer semantics)",
)
