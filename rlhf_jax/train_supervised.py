"""`rlhf-jax train sft` and `rlhf-jax train rm`: the supervised stages before PPO.

Same data loading (`data.load_records`), tokenizer handling, Orbax checkpoints, run logging and
config system as `train ppo`. Each run ends by exporting its model in Hugging Face format to
`run_dir/model`: the SFT model is the PPO policy; the reward model loads directly as PPO's reward
model and as the value-model initialisation.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

import jax
import numpy as np

from rlhf_jax import checkpoint as ckpt
from rlhf_jax import config as cfg
from rlhf_jax import data, models, sharding
from rlhf_jax.host import fetch_metrics, gather_to_main, release_host_memory
from rlhf_jax.logging import IterationClock, RunLogger
from rlhf_jax.models import lora
from rlhf_jax.models.lora import LoRAConfig
from rlhf_jax.reward_model import (
    PreferenceBatch,
    make_rm_step,
    normalize_head,
    pair_scores,
    reward_init_from_policy,
)
from rlhf_jax.run_setup import TrainResult, check_batch_mesh, open_checkpointer, with_adapters
from rlhf_jax.sft import (
    SFTBatch,
    TrainConfig,
    TrainState,
    jit_init_train_state,
    jit_train_step,
    make_sft_step,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SupervisedDataConfig:
    """A dataset of prompts with completions (SFT) or with chosen/rejected pairs (RM).

    Attributes:
      path, format, split: as in `DataConfig` (local JSONL/JSON/Parquet/CSV, `datasets` dirs).
      prompt_column: the prompt text.
      completion_column: the demonstration (SFT).
      chosen_column, rejected_column: the preferred and dispreferred responses (RM).
      max_length: prompt + response tokens per sequence (right-padded to it).
      truncation: sequences longer than `max_length` lose prompt tokens from the "left", or are
        dropped ("drop"); the counts are reported.
      eval_fraction: share of rows held out for the evaluation loss / pairwise accuracy.
      shuffle: reshuffle the training rows every epoch (seeded).
    """

    path: str
    format: Literal["auto", "jsonl", "json", "parquet", "csv", "disk", "hub"] = "auto"
    split: str = "train"
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    max_length: int = 512
    truncation: Literal["left", "drop"] = "left"
    eval_fraction: float = 0.05
    shuffle: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SupervisedRunConfig:
    """`rlhf-jax train sft` / `train rm`.

    Attributes:
      run_dir: output directory (config, logs, checkpoints, the exported `model/`).
      model: HF directory of the starting model (SFT: a causal LM; RM: a causal LM, from which the
        reward model is initialised, or a sequence classifier to continue training).
      batch_size: sequences (SFT) or pairs (RM) per optimiser step.
      train: optimiser settings; `train.total_steps` is the length of the run.
      beta_rm: RM only: weight of the LM loss on the chosen response ("Secrets of RLHF";
        needs tied embeddings).
      normalize: RM only: rescale the head so held-out chosen responses score with std 1 (and mean
        0 where the architecture allows), as lm-human-preferences does.
      eval_every: evaluate on the held-out rows every N steps (and at the end).
      dtype: compute dtype; the trained params and AdamW moments stay float32.
      mesh: the device mesh, as in `train ppo`: params and AdamW moments sharded by the model's
        logical axes, batches split over data x fsdp (`batch_size` must divide by them).
      lora: train LoRA adapters (`models.LoRAConfig`) instead of the whole model; the base is
        stored in `dtype`, a reward model's score head trains whole; checkpoints hold the
        trainable half; the run exports `model/` (adapters merged) and `model_adapter/` (peft),
        which `train ppo|grpo|... models.lora_adapter=RUN/model_adapter` starts from.
    """

    run_dir: str
    model: str
    seed: int = 0
    batch_size: int = 32
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    beta_rm: float = 0.0
    normalize: bool = True
    eval_every: int = 100
    allow_pickle: bool = False
    tokenizer: cfg.TokenizerConfig = dataclasses.field(default_factory=cfg.TokenizerConfig)
    data: SupervisedDataConfig
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    logging: cfg.LoggingConfig = dataclasses.field(default_factory=cfg.LoggingConfig)
    checkpoint: cfg.CheckpointConfig = dataclasses.field(default_factory=cfg.CheckpointConfig)
    mesh: sharding.MeshConfig = dataclasses.field(default_factory=sharding.MeshConfig)
    lora: LoRAConfig | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.eval_every < 1:
            raise ValueError(
                f"batch_size and eval_every must be >= 1, got {self.batch_size}, {self.eval_every}"
            )
        if self.batch_size % self.train.gradient_accumulation_steps:
            raise ValueError(
                f"batch_size={self.batch_size} must be divisible by "
                f"train.gradient_accumulation_steps={self.train.gradient_accumulation_steps}"
            )


def _pack(
    tokenizer: Any, prompts: list[str], responses: list[str], config: SupervisedDataConfig
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Tokenizes prompt + response (+ EOS), right-pads to `max_length`. Returns tokens, the
    response mask (the tokens to supervise) and truncation counts; dropped rows get -1 rows."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    length = config.max_length
    tokens = np.full((len(prompts), length), pad, np.int32)
    response_mask = np.zeros((len(prompts), length), bool)
    counts = {"truncated": 0, "dropped": 0}
    keep = np.ones(len(prompts), bool)
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"]
        if eos is not None and (not r or r[-1] != eos):
            r = r + [eos]
        if len(r) >= length:
            keep[i] = False
        elif len(p) + len(r) > length:
            if config.truncation == "drop":
                keep[i] = False
            else:
                p = p[len(p) + len(r) - length :]
                counts["truncated"] += 1
        if not keep[i]:
            counts["dropped"] += 1
            continue
        tokens[i, : len(p) + len(r)] = p + r
        response_mask[i, len(p) : len(p) + len(r)] = True
    return tokens[keep], response_mask[keep], {**counts, "kept": int(keep.sum())}


def _attention_mask(response_mask_BT: np.ndarray) -> np.ndarray:
    """Real tokens of `_pack`'s rows (prompt then response, right-padded): every position up to
    the row's last response token. Not `tokens != pad`: with pad == eos (a common tokenizer
    set-up) that would hide the EOS, and the reward model would learn to score the token before
    it while PPO scores the EOS itself (the score goes on the last real response token)."""
    return np.flip(np.cumsum(np.flip(response_mask_BT, axis=1), axis=1), axis=1) > 0


def _columns(records: dict[str, list], names: list[str], path: str) -> list[list[str]]:
    missing = [n for n in names if n not in records]
    if missing:
        raise data.DataError(
            f"dataset {path!r} has no column(s) {missing}; available: {sorted(records)}. "
            "Set data.prompt_column / completion_column / chosen_column / rejected_column"
        )
    return [[str(v) for v in records[n]] for n in names]


def _split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng([seed, 12345]).permutation(n)
    n_eval = int(round(n * fraction)) if fraction else 0
    return order[n_eval:], order[:n_eval]


def _run(config: SupervisedRunConfig, *, kind: str, resume: bool) -> TrainResult:
    run_dir = Path(config.run_dir)
    model_path = Path(config.model)
    if not (model_path / "config.json").exists():
        raise cfg.ConfigError(f"model: {config.model!r} is not a local HF model directory")
    tokenizer = data.load_tokenizer(config.tokenizer, config.model)
    devices = jax.devices()
    data_size, fsdp, _ = check_batch_mesh(config.mesh, devices, config.batch_size, "batch_size")
    mesh = sharding.make_mesh(config.mesh, devices)
    # float32 master params (`optim.check_trainable`), computing in `config.dtype`; loaded shard
    # by shard onto the mesh, as `train ppo` loads its models
    params, model_config = models.load(model_path, allow_pickle=config.allow_pickle, mesh=mesh)
    model_config = dataclasses.replace(model_config, dtype=config.dtype)
    if len(tokenizer) > model_config.vocab_size:
        raise cfg.ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary is "
            f"{model_config.vocab_size}; use the model's own tokenizer (tokenizer.path)"
        )
    records = data.load_records(
        cfg.DataConfig(path=config.data.path, format=config.data.format, split=config.data.split)
    )
    d = config.data
    if kind == "sft":
        prompts, completions = _columns(records, [d.prompt_column, d.completion_column], d.path)
        tokens, loss_mask, counts = _pack(tokenizer, prompts, completions, d)
        arrays = {"tokens": tokens, "loss_mask": loss_mask, "mask": _attention_mask(loss_mask)}
        if model_config.head != "lm":
            raise cfg.ConfigError("train sft needs a causal LM (model.head must be 'lm')")
    else:
        prompts, chosen, rejected = _columns(
            records, [d.prompt_column, d.chosen_column, d.rejected_column], d.path
        )
        c_tokens, c_mask, c_counts = _pack(tokenizer, prompts, chosen, d)
        r_tokens, r_mask, r_counts = _pack(tokenizer, prompts, rejected, d)
        if c_counts["kept"] != len(prompts) or r_counts["kept"] != len(prompts):
            raise data.DataError(
                f"{len(prompts) - min(c_counts['kept'], r_counts['kept'])} preference pairs do "
                f"not fit in data.max_length={d.max_length}; raise it or shorten the responses"
            )
        counts = {"truncated": c_counts["truncated"] + r_counts["truncated"], "dropped": 0}
        arrays = {
            "chosen": c_tokens,
            "rejected": r_tokens,
            "chosen_loss_mask": c_mask,
            "chosen_mask": _attention_mask(c_mask),
            "rejected_mask": _attention_mask(r_mask),
        }
        if model_config.head == "lm":
            params, model_config = reward_init_from_policy(
                params, model_config, jax.random.key(config.seed)
            )
    if config.lora is not None:  # adapters on a base stored in the compute dtype
        lora_config = config.lora
        if kind == "rm":  # the score head trains whole (it is new, or being fitted)
            modules = tuple(dict.fromkeys((*lora_config.train_modules, "score")))
            lora_config = dataclasses.replace(lora_config, train_modules=modules)
        try:
            model_config = dataclasses.replace(model_config, lora=lora_config)
        except ValueError as err:
            raise cfg.ConfigError(f"lora: {err}") from err
        params = jax.tree.map(lambda x: x.astype(config.dtype), params)
        lora_key = jax.random.fold_in(jax.random.key(config.seed), 0x10A)
        base_shardings = models.param_shardings(dataclasses.replace(model_config, lora=None), mesh)
        params = with_adapters(jax.device_put(params, base_shardings), model_config, mesh, lora_key)
    num_rows = len(next(iter(arrays.values())))
    if num_rows == 0:
        raise data.DataError(f"no usable rows in {d.path!r} ({counts})")
    train_rows, eval_rows = _split(num_rows, d.eval_fraction, config.seed)

    def batch_at(rows: np.ndarray):
        if kind == "sft":
            return SFTBatch(arrays["tokens"][rows], arrays["mask"][rows], arrays["loss_mask"][rows])
        return PreferenceBatch(
            arrays["chosen"][rows],
            arrays["chosen_mask"][rows],
            arrays["rejected"][rows],
            arrays["rejected_mask"][rows],
            arrays["chosen_loss_mask"][rows],
        )

    step_fn = (
        make_sft_step(model_config, config.train)
        if kind == "sft"
        else make_rm_step(model_config, config.train, beta_rm=config.beta_rm)
    )
    step_fn = jit_train_step(step_fn, model_config, config.train, mesh)
    # A reward model made from a policy has a fresh score head: place every param by the rules.
    params = jax.device_put(params, models.param_shardings(model_config, mesh))
    state = jit_init_train_state(model_config, config.train, mesh)(params)
    del params
    lora_split = model_config.lora

    def saved(state: TrainState) -> TrainState:
        """What a checkpoint holds: with LoRA the trainable half of the params only."""
        return state.replace(params=lora.split(state.params, lora_split)[0])

    position = data.DataPosition()
    main = sharding.is_main_process()
    checkpointer = open_checkpointer(run_dir, config.checkpoint, resume, unit="step")
    start = 0
    latest = checkpointer.latest_step()
    if latest is not None:
        abstract = ckpt.abstract_like(saved(state))
        restored, meta = checkpointer.restore(latest, {"state": abstract})
        state = restored["state"].replace(
            params=lora.join(restored["state"].params, lora.split(state.params, lora_split)[1])
        )
        position = data.DataPosition(*meta["data_position"])
        start = latest
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save_config(config, run_dir / "config.yaml")
    total = config.train.total_steps
    logger = RunLogger(
        run_dir, config.logging, total_iterations=total, start_iteration=start, enabled=main
    )
    logger.message(
        f"{kind}: {len(train_rows)} training / {len(eval_rows)} held-out rows "
        f"({counts['truncated']} truncated, {counts['dropped']} dropped)"
    )
    eval_fn = sharding.jit_with_rules(_eval_fn(kind, model_config, config.beta_rm), mesh)
    local = sharding.local_batch_slice(mesh, config.batch_size)

    def place(rows: np.ndarray, local_rows: slice | None):
        """The batch of `rows` on the mesh: split over data x fsdp (each process passes its
        `local_rows`), or replicated when None (an eval remainder the mesh does not divide)."""
        batch = batch_at(rows)
        if local_rows is None:
            return sharding.place_replicated(batch, mesh)
        return sharding.place_batch(jax.tree.map(lambda x: x[local_rows], batch), mesh)

    def evaluate() -> dict[str, float]:
        if not len(eval_rows):
            return {}
        sums: dict[str, float] = {}
        chunks = [
            eval_rows[i : i + config.batch_size]
            for i in range(0, len(eval_rows), config.batch_size)
        ]
        for rows in chunks:
            divides = len(rows) % (data_size * fsdp) == 0
            local_rows = sharding.local_batch_slice(mesh, len(rows)) if divides else None
            for k, v in fetch_metrics(eval_fn(state.params, place(rows, local_rows))).items():
                sums[k] = sums.get(k, 0.0) + v * len(rows)
        return {f"eval/{k}": v / len(eval_rows) for k, v in sums.items()}

    def fetch(step: int, out: dict[str, jax.Array]) -> dict[str, float]:
        metrics = fetch_metrics(out)
        if not np.all(np.isfinite(list(metrics.values()))):
            raise FloatingPointError(f"step {step}: non-finite metrics {metrics}; nothing saved")
        return metrics

    # A step's metrics are fetched and logged after the next step has been dispatched (the
    # device never waits for the host), except at steps that evaluate or save: those need the
    # step's state before the next step donates it.
    metrics: dict[str, float] = {}
    pending: tuple[int, dict[str, jax.Array], IterationClock] | None = None
    for step in range(start + 1, total + 1):
        if pending is not None:
            pending[2].stop()
        clock = IterationClock()
        rows, position = data.batch_indices(
            len(train_rows), config.batch_size, position, seed=config.seed, shuffle=d.shuffle
        )
        state, out = step_fn(state, place(train_rows[rows], local))
        if step == start + 1:  # compiled now
            release_host_memory()
        if pending is not None:
            previous, previous_out, previous_clock = pending
            metrics = fetch(previous, previous_out)
            logger.log(previous, metrics, timings=previous_clock.timings())
            pending = None
        evaluating = step % config.eval_every == 0 or step == total
        saving = (config.checkpoint.every and step % config.checkpoint.every == 0) or step == total
        if not (evaluating or saving):
            pending = (step, out, clock)
            continue
        metrics = fetch(step, out)
        if evaluating:
            metrics |= evaluate()
        logger.log(step, metrics, timings=clock.timings())
        if saving:
            checkpointer.save(step, {"state": saved(state)}, {"data_position": list(position)})
    checkpointer.close()
    # Every process takes part; only process 0 receives the model (leaf by leaf), normalises the
    # reward head on it and writes it.
    params = gather_to_main(state.params)
    summary = {k: v for k, v in metrics.items()}
    if main:
        if kind == "rm" and config.normalize and len(eval_rows):
            scores = [np.asarray(pair_scores(params, model_config, batch_at(eval_rows))[0])]
            params, stats = normalize_head(params, model_config, np.concatenate(scores))
            summary["normalization"] = stats
        ckpt.save_model(params, model_config, run_dir / "model", tokenizer=tokenizer)
        logger.message(f"exported the {kind} model to {run_dir / 'model'}")
        if model_config.lora is not None:
            ckpt.save_model(
                params,
                model_config,
                run_dir / "model_adapter",
                tokenizer=tokenizer,
                lora_mode="adapter",
                base_path=str(model_path.absolute()),
            )
            logger.message(f"and its peft adapter to {run_dir / 'model_adapter'}")
    logger.close()
    return TrainResult(run_dir, total, "finished", summary, checkpointer.directory / str(total))


def _eval_fn(kind: str, model_config: models.ModelConfig, beta_rm: float):
    from rlhf_jax.reward_model import rm_loss
    from rlhf_jax.sft import sft_loss

    def fn(params, batch):
        if kind == "sft":
            loss, aux = sft_loss(params, model_config, batch)
            return {"loss": loss}
        loss, aux = rm_loss(params, model_config, batch, beta_rm=beta_rm)
        return {"loss": loss, "accuracy": aux["accuracy"]}

    return fn


def train_sft(config: SupervisedRunConfig, *, resume: bool = False) -> TrainResult:
    """Supervised fine-tuning on (prompt, completion) rows."""
    return _run(config, kind="sft", resume=resume)


def train_rm(config: SupervisedRunConfig, *, resume: bool = False) -> TrainResult:
    """Reward-model training on (prompt, chosen, rejected) rows (`metrics['eval/accuracy']` is
    the held-out pairwise accuracy)."""
    return _run(config, kind="rm", resume=resume)


__all__ = ["RM", "SFT", "SupervisedDataConfig", "SupervisedRunConfig", "train_rm", "train_sft"]

SFT = cfg.Algorithm(
    name="sft",
    config=SupervisedRunConfig,
    run=train_sft,
    help="supervised fine-tuning on (prompt, completion) data",
)
RM = cfg.Algorithm(
    name="rm",
    config=SupervisedRunConfig,
    run=train_rm,
    help="reward model on (prompt, chosen, rejected) pairs (Bradley-Terry)",
)
