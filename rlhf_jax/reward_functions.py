"""Rewards computed on the host: Python reward functions (verifiable rewards), their weighted sum
and the reward model's score.

A reward function follows TRL's convention: it is called with keyword arguments
`prompts` and `completions` (lists of decoded strings, one entry per completion) plus one keyword
per extra dataset column (e.g. `answer`, a list aligned with the completions), and returns one
float per completion (list, tuple or 1-D array). Accept `**kwargs` to ignore columns you do not
use. Functions run between the jitted rollout and the jitted update
(`core.make_host_iteration`); every failure is raised as a `RewardFunctionError` naming the
function and, where one exists, the offending sample (index and text excerpt).

Reference functions by `"module:function"` (`load_reward_function`), e.g.
`"rlhf_jax.reward_functions:exact_match"`.
"""

from __future__ import annotations

import importlib
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

RewardFunction = Callable[..., Any]

_EXCERPT = 60


class RewardFunctionError(ValueError):
    """A reward function could not be loaded, failed, or returned something unusable."""


def _excerpt(text: str) -> str:
    return repr(text if len(text) <= _EXCERPT else text[:_EXCERPT] + "...")


def load_reward_function(spec: str) -> RewardFunction:
    """Imports `"package.module:function"` (a dotted attribute path after the colon is allowed,
    e.g. `"mod:Class.method"`) and returns the callable.

    Raises:
      RewardFunctionError: malformed spec, module not importable, attribute missing, not callable.
    """
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise RewardFunctionError(
            f"reward function spec {spec!r} must look like 'package.module:function'"
        )
    module_name, attr_path = spec.split(":")
    if not module_name or not attr_path:
        raise RewardFunctionError(
            f"reward function spec {spec!r} must name both a module and a function, as in "
            "'package.module:function'"
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise RewardFunctionError(
            f"reward function {spec!r}: cannot import module {module_name!r} ({err}); check the "
            "name and that its directory is on PYTHONPATH"
        ) from err
    except Exception as err:  # the module exists but raised while importing
        raise RewardFunctionError(
            f"reward function {spec!r}: importing module {module_name!r} raised "
            f"{type(err).__name__}: {err}"
        ) from err
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            available = sorted(n for n in dir(obj) if not n.startswith("_"))
            listed = ", ".join(available[:20]) + (", ..." if len(available) > 20 else "")
            raise RewardFunctionError(
                f"reward function {spec!r}: {module_name!r} has no attribute {attr_path!r} "
                f"(public names: {listed})"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardFunctionError(
            f"reward function {spec!r} is a {type(obj).__name__}, not a callable"
        )
    return obj


# -------------------------------------------------------------------- built-in reward functions


def exact_match(
    prompts: Sequence[str], completions: Sequence[str], *, answer: Sequence[Any], **unused: Any
) -> list[float]:
    """1.0 where the completion, stripped of surrounding whitespace, equals `str(answer)` stripped,
    else 0.0 (a verifiable reward; needs an `answer` dataset column)."""
    del prompts, unused
    return [float(c.strip() == str(a).strip()) for c, a in zip(completions, answer, strict=True)]


def length_reward(
    prompts: Sequence[str], completions: Sequence[str], *, target_length: int = 64, **unused: Any
) -> list[float]:
    """`1 - |len(completion) - target_length| / target_length`, clipped at 0 (characters): a
    format-style reward that prefers completions of about `target_length` characters."""
    del prompts, unused
    return [max(0.0, 1.0 - abs(len(c) - target_length) / target_length) for c in completions]


# ------------------------------------------------------------------------------- evaluation


class RewardTerm(NamedTuple):
    """One weighted reward function."""

    name: str
    fn: RewardFunction
    weight: float = 1.0


def reward_terms(
    specs: Sequence[str | RewardFunction | tuple[str | RewardFunction, float]],
) -> tuple[RewardTerm, ...]:
    """Resolves reward functions given as `"module:function"`, callables, or `(either, weight)`
    pairs into named, weighted terms (weight 1 when not given). Names are the spec or the
    function's qualified name, made unique with a suffix `_2`, `_3`, ... for repeats."""
    terms: list[RewardTerm] = []
    for spec in specs:
        weight = 1.0
        if isinstance(spec, tuple):
            if len(spec) != 2 or not isinstance(spec[1], numbers.Real):
                raise RewardFunctionError(
                    f"reward term {spec!r} must be (function or 'module:function', weight)"
                )
            spec, weight = spec
        if isinstance(spec, str):
            name, fn = spec, load_reward_function(spec)
        elif callable(spec):
            name, fn = getattr(spec, "__qualname__", None) or repr(spec), spec
        else:
            raise RewardFunctionError(
                f"a reward function must be a callable or 'module:function', got {spec!r}"
            )
        if not math.isfinite(float(weight)):
            raise RewardFunctionError(f"reward function {name!r}: weight {weight} is not finite")
        taken = {t.name for t in terms}
        base, n = name, 2
        while name in taken:
            name, n = f"{base}_{n}", n + 1
        terms.append(RewardTerm(name, fn, float(weight)))
    return tuple(terms)


def _sample_description(index: int, prompts: Sequence[str], completions: Sequence[str]) -> str:
    return (
        f"sample {index} (prompt {_excerpt(prompts[index])}, completion "
        f"{_excerpt(completions[index])})"
    )


def _locate_failure(
    term: RewardTerm,
    prompts: Sequence[str],
    completions: Sequence[str],
    columns: Mapping[str, Sequence[Any]],
) -> tuple[int, BaseException] | None:
    """Re-runs the function one sample at a time to find the first one it fails on."""
    for i in range(len(completions)):
        kwargs = {name: [values[i]] for name, values in columns.items()}
        try:
            term.fn(prompts=[prompts[i]], completions=[completions[i]], **kwargs)
        except Exception as err:
            return i, err
    return None


def _evaluate(
    term: RewardTerm,
    prompts: Sequence[str],
    completions: Sequence[str],
    columns: Mapping[str, Sequence[Any]],
) -> np.ndarray:
    count = len(completions)
    try:
        out = term.fn(prompts=list(prompts), completions=list(completions), **columns)
    except Exception as err:
        located = _locate_failure(term, prompts, completions, columns)
        if located is None:
            where = f"on the batch of {count} completions (no single sample fails alone)"
            cause: BaseException = err
        else:
            index, cause = located
            where = f"on {_sample_description(index, prompts, completions)}"
        raise RewardFunctionError(
            f"reward function {term.name!r} raised {type(cause).__name__}: {cause} {where}"
        ) from cause
    if isinstance(out, (str, bytes, Mapping)) or not isinstance(out, (Sequence, np.ndarray)):
        raise RewardFunctionError(
            f"reward function {term.name!r} must return a list or 1-D array of {count} floats, "
            f"got {type(out).__name__}"
        )
    if isinstance(out, np.ndarray) and out.ndim != 1:
        raise RewardFunctionError(
            f"reward function {term.name!r} must return a 1-D array of {count} floats, got an "
            f"array of shape {list(out.shape)}"
        )
    if len(out) != count:
        raise RewardFunctionError(
            f"reward function {term.name!r} returned {len(out)} values for {count} completions; "
            "return exactly one float per completion"
        )
    values = np.empty(count, np.float64)
    for i, value in enumerate(out):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.number)):
            raise RewardFunctionError(
                f"reward function {term.name!r} returned {value!r} ({type(value).__name__}) for "
                f"{_sample_description(i, prompts, completions)}; rewards must be real numbers"
            )
        values[i] = float(value)
        if not math.isfinite(values[i]):
            raise RewardFunctionError(
                f"reward function {term.name!r} returned {values[i]} for "
                f"{_sample_description(i, prompts, completions)}; rewards must be finite"
            )
    return values


def compute_rewards(
    terms: Sequence[RewardTerm],
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    columns: Mapping[str, Sequence[Any]] | None = None,
    model_scores: Any = None,
    model_weight: float = 1.0,
) -> tuple[np.ndarray, dict[str, float]]:
    """The weighted sum of reward functions (and optionally the reward model's scores).

    Args:
      terms: from `reward_terms`.
      prompts, completions: decoded text, one entry per completion (`B`).
      columns: extra keyword arguments for the functions, each a sequence of length `B`.
      model_scores: optional float `[B]` reward-model scores, added with `model_weight`.
    Returns:
      `(rewards, metrics)`: float32 `[B]`, and `rewards/<name>/mean` (unweighted) for every term.
    Raises:
      RewardFunctionError: a function failed or returned a wrong length, type or a non-finite
        value (the message names the function and the sample).
    """
    count = len(completions)
    if len(prompts) != count:
        raise RewardFunctionError(
            f"got {len(prompts)} prompts for {count} completions; repeat each prompt once per "
            "completion (group_size times)"
        )
    for (
        name,
        seq,
    ) in (("prompts", prompts), ("completions", completions)):
        bad = next((i for i, s in enumerate(seq) if not isinstance(s, str)), None)
        if bad is not None:
            raise RewardFunctionError(
                f"{name}[{bad}] is {type(seq[bad]).__name__}, not str; decode the tokens first"
            )
    columns = dict(columns or {})
    for name in ("prompts", "completions"):
        if name in columns:
            raise RewardFunctionError(f"a dataset column may not be called {name!r}")
    for name, values in columns.items():
        if len(values) != count:
            raise RewardFunctionError(
                f"column {name!r} has {len(values)} entries for {count} completions; repeat "
                "each prompt's value once per completion"
            )
    if not terms and model_scores is None:
        raise RewardFunctionError("no reward: give reward functions and/or reward-model scores")
    total = np.zeros(count, np.float64)
    metrics: dict[str, float] = {}
    if model_scores is not None:
        scores = np.asarray(model_scores, np.float64)
        if scores.shape != (count,):
            raise RewardFunctionError(
                f"model_scores must have shape [{count}], got {list(scores.shape)}"
            )
        total += model_weight * scores
        metrics["rewards/reward_model/mean"] = float(np.mean(scores))
    for term in terms:
        values = _evaluate(term, prompts, completions, columns)
        total += term.weight * values
        metrics[f"rewards/{term.name}/mean"] = float(np.mean(values))
    return total.astype(np.float32), metrics


def decode_completions(
    tokens_BT: Any, mask_BT: Any, decode: Callable[[list[int]], str]
) -> list[str]:
    """Decodes each row's real tokens (where `mask_BT` is set) with `decode`, e.g.
    `functools.partial(tokenizer.decode, skip_special_tokens=True)`."""
    tokens, mask = np.asarray(tokens_BT), np.asarray(mask_BT).astype(bool)
    if tokens.shape != mask.shape or tokens.ndim != 2:
        raise ValueError(
            f"tokens{list(tokens.shape)} and mask{list(mask.shape)} must be equal [B, T] shapes"
        )
    return [decode(row[m].tolist()) for row, m in zip(tokens, mask, strict=True)]


def repeat_per_completion(values: Sequence[Any], group_size: int) -> list[Any]:
    """Per-prompt values (prompts, dataset columns) repeated `group_size` times each, in the
    contiguous group layout of the rollout (`[a, a, b, b]` for `group_size=2`)."""
    return [v for v in values for _ in range(group_size)]


def make_score_fn(
    terms: Sequence[RewardTerm],
    decode: Callable[[list[int]], str],
    group_size: int,
    *,
    model_weight: float = 1.0,
) -> Callable[..., tuple[np.ndarray, dict[str, float]]]:
    """A `score_fn` for `core.make_host_iteration`:
    `score_fn(roll, prompt_texts, columns=None) -> (rewards [B], metrics)`.

    Args:
      terms: reward functions (`reward_terms`); may be empty when only the reward model scores.
      decode: token ids -> text (e.g. `partial(tokenizer.decode, skip_special_tokens=True)`).
      group_size: completions per prompt; `prompt_texts` and `columns` hold one entry per prompt
        and are repeated per completion.
      model_weight: weight of the rollout's reward-model scores when the rollout has them.
    """

    def score_fn(
        roll: Any, prompt_texts: Sequence[str], columns: Mapping[str, Sequence[Any]] | None = None
    ) -> tuple[np.ndarray, dict[str, float]]:
        gen = roll.generation
        completions = decode_completions(gen.tokens, gen.mask, decode)
        if len(prompt_texts) * group_size != len(completions):
            raise RewardFunctionError(
                f"got {len(prompt_texts)} prompt texts for {len(completions)} completions in "
                f"groups of {group_size}; pass the batch's prompts, one entry per prompt"
            )
        cols = {k: repeat_per_completion(v, group_size) for k, v in (columns or {}).items()}
        model_scores = None if roll.model_scores is None else np.asarray(roll.model_scores)
        return compute_rewards(
            terms,
            repeat_per_completion(prompt_texts, group_size),
            completions,
            columns=cols,
            model_scores=model_scores,
            model_weight=model_weight,
        )

    return score_fn
