"""Host reward functions: loading by "module:function", the weighted sum with the reward model,
decoding, and errors that name the function and the offending sample."""

from typing import NamedTuple

import numpy as np
import pytest
from tolerances import REORDERED, assert_f32_close

from rlhf_jax import reward_functions as rf

NOT_CALLABLE = 3


def count_a(prompts, completions, **unused):
    return [float(c.count("a")) for c in completions]


def fails_on_x(prompts, completions, **unused):
    return [1.0 / ("x" not in c) for c in completions]  # ZeroDivisionError on "x"


def fails_on_batches(prompts, completions, **unused):
    if len(completions) > 1:
        raise RuntimeError("batch too large")
    return [0.0]


PROMPTS = ["2+2=", "3+3=", "capital of France:"]
COMPLETIONS = [" 4", "7", "Paris\n"]
ANSWERS = [4, "6", "Paris"]


def test_load_builtin_and_exact_match():
    fn = rf.load_reward_function("rlhf_jax.reward_functions:exact_match")
    assert fn is rf.exact_match
    assert fn(prompts=PROMPTS, completions=COMPLETIONS, answer=ANSWERS) == [1.0, 0.0, 1.0]


def test_load_nested_attribute():
    assert rf.load_reward_function("rlhf_jax.reward_functions:RewardTerm._make")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_colon", "must look like 'package.module:function'"),
        ("a:b:c", "must look like"),
        (":exact_match", "must name both a module and a function"),
        ("rlhf_jax.nope:f", "cannot import module 'rlhf_jax.nope'"),
        ("rlhf_jax.reward_functions:nope", "has no attribute 'nope'.*exact_match"),
        ("test_reward_functions:NOT_CALLABLE", "is a int, not a callable"),
    ],
)
def test_load_errors(spec, message):
    with pytest.raises(rf.RewardFunctionError, match=message):
        rf.load_reward_function(spec)


def test_weighted_sum_with_reward_model_and_metrics():
    terms = rf.reward_terms(
        [("rlhf_jax.reward_functions:exact_match", 2.0), count_a, (count_a, -0.5)]
    )
    names = [t.name for t in terms]
    assert names == ["rlhf_jax.reward_functions:exact_match", "count_a", "count_a_2"]
    assert [t.weight for t in terms] == [2.0, 1.0, -0.5]
    completions = ["a 4", "aa", "Paris"]
    scores, metrics = rf.compute_rewards(
        terms,
        PROMPTS,
        completions,
        columns={"answer": ["a 4", "6", "Paris"]},
        model_scores=np.array([0.5, -1.0, 2.0]),
        model_weight=0.1,
    )
    exact = np.array([1.0, 0.0, 1.0])
    a_count = np.array([1.0, 2.0, 1.0])
    want = 2.0 * exact + a_count - 0.5 * a_count + 0.1 * np.array([0.5, -1.0, 2.0])
    assert scores.dtype == np.float32
    assert_f32_close(scores, want, ulps=REORDERED, floor=1.0)
    assert metrics["rewards/rlhf_jax.reward_functions:exact_match/mean"] == pytest.approx(2 / 3)
    assert (
        metrics["rewards/count_a/mean"] == metrics["rewards/count_a_2/mean"] == pytest.approx(4 / 3)
    )
    assert metrics["rewards/reward_model/mean"] == pytest.approx(0.5)


def bad_return(value):
    def fn(prompts, completions, **unused):
        return value

    fn.__qualname__ = "bad"
    return fn


@pytest.mark.parametrize(
    "value, message",
    [
        ([1.0, 2.0], r"'bad' returned 2 values for 3 completions"),
        (np.zeros((3, 1)), r"must return a 1-D array of 3 floats, got an array of shape \[3, 1\]"),
        ("1.0", "must return a list or 1-D array of 3 floats, got str"),
        (1.0, "must return a list or 1-D array of 3 floats, got float"),
        ({"a": 1}, "got dict"),
        ([1.0, None, 0.0], r"returned None \(NoneType\) for sample 1 \(prompt '3\+3=', completion"),
        ([1.0, 0.0, "x"], r"returned 'x' \(str\) for sample 2"),
        ([True, False, True], r"returned True \(bool\) for sample 0"),
        ([1.0, float("nan"), 0.0], r"returned nan for sample 1 .*rewards must be finite"),
        (np.array([0.0, 0.0, np.inf]), r"returned inf for sample 2 .*completion 'Paris\\n'"),
    ],
)
def test_bad_return_values_are_clear_errors(value, message):
    with pytest.raises(rf.RewardFunctionError, match=message):
        rf.compute_rewards(rf.reward_terms([bad_return(value)]), PROMPTS, COMPLETIONS)


def test_numpy_scalars_are_accepted():
    scores, _ = rf.compute_rewards(
        rf.reward_terms([bad_return(np.array([1, 2, 3], np.int64))]), PROMPTS, COMPLETIONS
    )
    np.testing.assert_array_equal(scores, [1.0, 2.0, 3.0])


def test_exception_names_function_and_offending_sample():
    completions = ["fine", "long text with an x " + "y" * 100, "also fine"]
    with pytest.raises(rf.RewardFunctionError) as info:
        rf.compute_rewards(rf.reward_terms([fails_on_x]), PROMPTS, completions)
    message = str(info.value)
    assert "'fails_on_x' raised ZeroDivisionError" in message
    assert "sample 1 (prompt '3+3=', completion 'long text with an x yyyy" in message
    assert "...'" in message and "y" * 100 not in message  # an excerpt, not the whole text
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_exception_only_on_whole_batch():
    with pytest.raises(rf.RewardFunctionError, match="no single sample fails alone"):
        rf.compute_rewards(rf.reward_terms([fails_on_batches]), PROMPTS, COMPLETIONS)


def test_missing_column_is_reported_with_the_function():
    terms = rf.reward_terms(["rlhf_jax.reward_functions:exact_match"])
    with pytest.raises(rf.RewardFunctionError, match="exact_match' raised TypeError.*answer"):
        rf.compute_rewards(terms, PROMPTS, COMPLETIONS)


def test_bad_arguments():
    terms = rf.reward_terms([count_a])
    with pytest.raises(rf.RewardFunctionError, match="got 2 prompts for 3 completions"):
        rf.compute_rewards(terms, PROMPTS[:2], COMPLETIONS)
    with pytest.raises(rf.RewardFunctionError, match=r"completions\[1\] is int, not str"):
        rf.compute_rewards(terms, PROMPTS, ["a", 1, "b"])
    with pytest.raises(rf.RewardFunctionError, match="column 'answer' has 1 entries"):
        rf.compute_rewards(terms, PROMPTS, COMPLETIONS, columns={"answer": [1]})
    with pytest.raises(rf.RewardFunctionError, match="no reward"):
        rf.compute_rewards((), PROMPTS, COMPLETIONS)
    with pytest.raises(rf.RewardFunctionError, match="must be a callable or 'module:function'"):
        rf.reward_terms([3])
    with pytest.raises(rf.RewardFunctionError, match="weight inf is not finite"):
        rf.reward_terms([(count_a, float("inf"))])


class FakeGeneration(NamedTuple):
    tokens: np.ndarray
    mask: np.ndarray


class FakeRollout(NamedTuple):
    generation: FakeGeneration
    model_scores: np.ndarray | None


def test_score_fn_decodes_masked_tokens_and_repeats_prompts_per_group():
    tokens = np.array([[1, 2, 0], [1, 1, 1], [3, 0, 0], [2, 3, 1]])
    mask = np.array([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]], bool)
    seen = {}

    def record(prompts, completions, answer, **unused):
        seen.update(prompts=prompts, completions=completions, answer=answer)
        return [float(c == a) for c, a in zip(completions, answer, strict=True)]

    decode = lambda ids: "".join("_abc"[i] for i in ids)  # noqa: E731
    score_fn = rf.make_score_fn(rf.reward_terms([record]), decode, group_size=2, model_weight=2.0)
    roll = FakeRollout(FakeGeneration(tokens, mask), np.array([0.0, 1.0, 0.0, 1.0]))
    scores, metrics = score_fn(roll, ["p0", "p1"], {"answer": ["ab", "bca"]})
    assert seen == {
        "prompts": ["p0", "p0", "p1", "p1"],
        "completions": ["ab", "aaa", "c", "bca"],
        "answer": ["ab", "ab", "bca", "bca"],
    }
    np.testing.assert_array_equal(scores, [1.0, 2.0, 0.0, 3.0])
    assert metrics["rewards/reward_model/mean"] == 0.5
    with pytest.raises(rf.RewardFunctionError, match="got 3 prompt texts for 4 completions"):
        score_fn(roll, ["p0", "p1", "p2"])


def test_builtin_length_reward():
    assert rf.length_reward([""] * 3, ["ab", "abcd", "a" * 9], target_length=4) == [0.5, 1.0, 0.0]
