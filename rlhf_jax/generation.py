"""Sampling completions from a trained or loaded policy (`rlhf-jax generate`)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from rlhf_jax import checkpoint as ckpt
from rlhf_jax import models, sampling
from rlhf_jax.run_setup import SetupError, check_vocab, resolve_model_path
from rlhf_jax.sampling import SamplingConfig

Params = Any


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
    check_vocab(tokenizer, model_config, "the model")
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
