"""Run configurations: the sections of a run's YAML file as frozen dataclasses, and the registry
of training algorithms.

The dataclasses are the schema; `load_config(cls, "configs/x.yaml", ["ppo.batch_size=64"])` (from
`rlhf_jax.config_files`, re-exported here with `ConfigError`, `to_dict`, `to_yaml`, `save_config`
and `diff_configs`) builds them from a YAML file and dotted overrides.

Training algorithms are registered by name (`register_algorithm`) with their config dataclass and
run function; the CLI's `rlhf-jax train NAME` looks them up here.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from collections.abc import Callable
from typing import Any, ClassVar, Literal

from rlhf_jax.algorithms import GRPOConfig, PPOConfig, ReinforcePPConfig, RLOOConfig
from rlhf_jax.config_files import ConfigError as ConfigError  # re-exported
from rlhf_jax.config_files import diff_configs as diff_configs
from rlhf_jax.config_files import load_config as load_config
from rlhf_jax.config_files import save_config as save_config
from rlhf_jax.config_files import to_dict as to_dict
from rlhf_jax.config_files import to_yaml as to_yaml
from rlhf_jax.core.config import RLConfig
from rlhf_jax.models.lora import LoRAConfig
from rlhf_jax.sharding import MeshConfig

DTYPES = ("float32", "bfloat16", "float16")


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
        (`core.RLModels(value=None)`). Excludes `value`.
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
class RLRunConfig:
    """Everything `rlhf-jax train ppo | rloo | grpo | reinforce++` needs (use a subclass: each
    adds its algorithm's section, `ppo`, `rloo`, `grpo` or `reinforce`).

    Attributes:
      run_dir: output directory (config, logs, checkpoints, tokenizer, plots, the exported policy).
      seed: seeds the PRNG key of the run and the data order.
      stop_after: stop (with a checkpoint) once this many iterations are done, without changing
        the learning-rate schedule; for splitting a run into time-limited jobs. None: run to the
        algorithm's `total_iterations`.
      compilation_cache: directory for JAX's persistent compilation cache (None: off).
      models, tokenizer, data, logging, checkpoint: see their classes (`models.value` and
        `models.shared_value_head` are read only by algorithms with a critic).
      ptx_data: pretraining text for PPO-ptx; required when the algorithm's `ptx_coef > 0`, else
        unset.
      mesh: `rlhf_jax.sharding.MeshConfig`, the `(data, fsdp, tensor)` device mesh.
    The algorithm's section: its `pad_token_id` comes from the tokenizer and the tokenizer's stop
    tokens are added to `stop_token_ids`.
    """

    #: The YAML section holding the algorithm's config (set by each subclass).
    section: ClassVar[str] = ""

    run_dir: str
    seed: int = 0
    stop_after: int | None = None
    compilation_cache: str | None = None
    models: ModelsConfig
    tokenizer: TokenizerConfig = dataclasses.field(default_factory=TokenizerConfig)
    data: DataConfig
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    ptx_data: PtxDataConfig | None = None

    def algorithm(self) -> RLConfig:
        """The algorithm's config (the `section` field)."""
        return getattr(self, self.section)

    def __post_init__(self) -> None:
        if self.stop_after is not None and self.stop_after < 1:
            raise ValueError(f"stop_after must be >= 1 or null, got {self.stop_after}")
        ptx_coef, key = self.algorithm().ptx_coef, f"{self.section}.ptx_coef"
        if ptx_coef > 0 and self.ptx_data is None:
            raise ValueError(
                f"{key}={ptx_coef} needs pretraining text: set ptx_data.path "
                f"(a dataset with a text column), or {key}=0"
            )
        if self.ptx_data is not None and ptx_coef <= 0:
            raise ValueError(
                f"ptx_data is set but {key}=0, so it would be unused; set {key} > 0 "
                "or remove ptx_data"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPORunConfig(RLRunConfig):
    """`rlhf-jax train ppo`; `ppo` holds `algorithms.PPOConfig`."""

    section: ClassVar[str] = "ppo"
    ppo: PPOConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLOORunConfig(RLRunConfig):
    """`rlhf-jax train rloo`; `rloo` holds `algorithms.RLOOConfig`."""

    section: ClassVar[str] = "rloo"
    rloo: RLOOConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPORunConfig(RLRunConfig):
    """`rlhf-jax train grpo`; `grpo` holds `algorithms.GRPOConfig`."""

    section: ClassVar[str] = "grpo"
    grpo: GRPOConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReinforcePPRunConfig(RLRunConfig):
    """`rlhf-jax train reinforce++`; `reinforce` holds `algorithms.ReinforcePPConfig`."""

    section: ClassVar[str] = "reinforce"
    reinforce: ReinforcePPConfig


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


for _name, _config, _help in (
    (
        "ppo",
        "PPORunConfig",
        "PPO with a reward model or a reward function (TRL PPOTrainer semantics)",
    ),
    ("rloo", "RLOORunConfig", "RLOO: leave-one-out baseline over k completions"),
    ("grpo", "GRPORunConfig", "GRPO: group-normalised advantages, KL loss term"),
    ("reinforce++", "ReinforcePPRunConfig", "REINFORCE++: globally whitened discounted returns"),
):
    register_algorithm(
        _name, config=f"rlhf_jax.config:{_config}", run="rlhf_jax.trainer:train", help=_help
    )
