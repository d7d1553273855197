"""`RLConfig`: the options every RL algorithm shares, in one place.

PPO (`ppo.PPOConfig`) and the critic-free algorithms (`critic_free.RLOOConfig`, `GRPOConfig`,
`ReinforcePPConfig`) extend it with their own batch layout, advantage, loss and KL options, so
sampling, the update loop's sizes, the optimiser and the learning-rate schedule are declared,
validated and built once: an option added here (a sampling filter, a schedule) reaches every
algorithm.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from rlhf_jax.optim import Decay, adamw, check_schedule, lr_schedule
from rlhf_jax.sampling import SamplingConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLConfig:
    """Sampling, update-loop and optimiser options of every RL algorithm (use a subclass).

    A subclass provides `batch_size` (rows per iteration: a field or a property) and
    `steps_per_iteration` (optimiser steps per iteration), and calls `check_common()` from its
    `__post_init__`.

    Attributes:
      response_length: new tokens sampled per row (the maximum response length).
      temperature, top_k, top_p, min_p: sampling (see `SamplingConfig`; the filters are off by
        default); log-probs for the ratio use the temperature-scaled, unfiltered distribution,
        at rollout and in the update (TRL, OpenRLHF).
      stop_token_ids: a response ends at the first of these (kept); the rest is padding.
      pad_token_id: token written after the stop token.
      missing_eos_penalty: subtracted from the score of responses without a stop token.
      num_mini_batches, gradient_accumulation_steps: each iteration's batch is split into
        `num_mini_batches` minibatches (one optimiser step each) of
        `gradient_accumulation_steps` micro-batches whose gradients are averaged.
      learning_rate: AdamW peak learning rate, constant within an iteration (TRL steps its
        scheduler once per iteration).
      total_iterations: the decay reaches its floor after this many iterations.
      warmup_iterations: linear warm-up; iteration `i` uses `(i + 1) / warmup` of the peak.
      lr_decay, min_lr_ratio: "linear" (TRL) or "cosine" decay after warm-up, to
        `min_lr_ratio` of the peak (0: TRL; "Secrets of RLHF" decays cosine to 0.1). See
        `optim.lr_schedule`.
      weight_decay, adam_eps, max_grad_norm: AdamW settings (`max_grad_norm=None`: no
        global-norm clipping).
      entropy_coef: entropy bonus weight (0 = off).
      recompute_old_logprobs: recompute rollout log-probs with a training-style forward pass
        instead of taking them from the sampler (removes the sampler/trainer numeric gap).
      lora_merged_decode: with a LoRA policy, sample from a copy of the weights with the
        adapters merged (`lora.merged_for_decode`: one merge per rollout, a copy of the
        projection weights while decoding) instead of applying them unmerged at every decode
        step (the default: no third copy of the policy; on a 2-core CPU host decode took 1.11x
        the base model's time unmerged and 1.05x merged, benchmarks/lora_decode.py). In 16-bit
        compute the merged weights round the update, so set `recompute_old_logprobs` with it.
      logprob_chunk_size: positions per chunk when computing log-probs (and entropies) from
        hidden states, so at most `[micro_batch, chunk, V]` float32 logits are alive at once
        (any response length works; None: the whole response in one block, which at a 128k
        vocabulary is 0.5 MB per token of float32 logits).
      log_entropy: compute the policy's token entropy in the update for the
        `policy/entropy_avg` metric (a softmax over the vocabulary at every position; it is
        computed anyway when `entropy_coef > 0`).
      decode_chunks: `SamplingConfig.decode_chunks` of the rollout (None: automatic).
      length_buckets: the phased trainers score and update on the smallest of this many static
        response widths (`response_buckets`) that holds the batch's longest response, so those
        passes cost what the real lengths need; only padding is cut (1: always
        `response_length`). One-jit iterations always use `response_length`.
    """

    response_length: int = 53
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    stop_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    missing_eos_penalty: float | None = None
    num_mini_batches: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: float = 3e-6
    total_iterations: int = 1000
    warmup_iterations: int = 0
    lr_decay: Decay = "linear"
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    adam_eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    entropy_coef: float = 0.0
    recompute_old_logprobs: bool = False
    lora_merged_decode: bool = False
    logprob_chunk_size: int | None = 128
    log_entropy: bool = True
    decode_chunks: int | None = None
    length_buckets: int = 4

    @property
    def steps_per_iteration(self) -> int:
        """Optimiser steps per iteration (epochs x minibatches)."""
        raise NotImplementedError

    def check_common(self) -> None:
        """Normalises `stop_token_ids` and validates the shared options (ValueError naming the
        option). The batch layout is checked by the subclass, whose message names its own
        batch options."""
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        for name in ("response_length", "total_iterations", "num_mini_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.length_buckets < 1:
            raise ValueError(f"length_buckets must be >= 1, got {self.length_buckets}")
        if self.gradient_accumulation_steps < 1 or self.warmup_iterations < 0:
            raise ValueError(
                "gradient_accumulation_steps must be >= 1 and warmup_iterations >= 0, got "
                f"{self.gradient_accumulation_steps}, {self.warmup_iterations}"
            )
        if self.logprob_chunk_size is not None and self.logprob_chunk_size < 1:
            raise ValueError(
                f"logprob_chunk_size must be >= 1 (or null: no chunking), got "
                f"{self.logprob_chunk_size}"
            )
        check_schedule(self.lr_decay, self.min_lr_ratio)
        self.sampling_config()  # validates temperature and the filters with their own messages

    @property
    def micro_batch_size(self) -> int:
        """Rows per micro-batch: `batch_size / (num_mini_batches * gradient_accumulation_steps)`."""
        return self.batch_size // (self.num_mini_batches * self.gradient_accumulation_steps)

    def sampling_config(self) -> SamplingConfig:
        """The rollout's sampler."""
        return SamplingConfig(
            max_new_tokens=self.response_length,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
            stop_token_ids=self.stop_token_ids,
            pad_token_id=self.pad_token_id,
            decode_chunks=self.decode_chunks,
        )

    def response_buckets(self) -> tuple[int, ...]:
        """The static response widths of `length_buckets` (ascending, the last
        `response_length`): near-equal steps."""
        n, length = self.length_buckets, self.response_length
        return tuple(sorted({math.ceil(k * length / n) for k in range(1, n + 1)}))

    def bucket_width(self, sequence_lengths: Any, extra: int = 0) -> int:
        """The smallest of `response_buckets()` holding every response of a batch
        (`sequence_lengths`: host ints, each row's last real token index), plus `extra` columns
        (PPO's score one position after the last token)."""
        needed = min(int(max(sequence_lengths)) + 1 + extra, self.response_length)
        return next(w for w in self.response_buckets() if w >= needed)

    def lr_schedule(self, peak_lr: float | None = None) -> optax.Schedule:
        """Learning rate per optimiser step (`optim.lr_schedule` in units of iterations);
        `peak_lr` defaults to `learning_rate`."""
        return lr_schedule(
            self.learning_rate if peak_lr is None else peak_lr,
            total=self.total_iterations,
            warmup=self.warmup_iterations,
            steps_per_unit=self.steps_per_iteration,
            decay=self.lr_decay,
            min_lr_ratio=self.min_lr_ratio,
        )

    def learning_rate_at(self, iteration: jax.Array, peak_lr: float | None = None) -> jax.Array:
        """The learning rate used during `iteration` (0-based)."""
        return self.lr_schedule(peak_lr)(jnp.asarray(iteration) * self.steps_per_iteration)

    def optimizer(self, peak_lr: float | None = None) -> optax.GradientTransformation:
        """AdamW (after global-norm clipping unless `max_grad_norm` is None) on `lr_schedule`."""
        return adamw(
            self.lr_schedule(peak_lr),
            weight_decay=self.weight_decay,
            eps=self.adam_eps,
            max_grad_norm=self.max_grad_norm,
        )
