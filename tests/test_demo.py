"""The demo's pipeline (reduced and seeded): PPO must beat SFT on the hidden gold rule, and the
exported models must load in transformers."""

import json

import numpy as np
import pytest
import torch
import transformers

from rlhf_jax.demo import DemoConfig, run_demo, task


def test_gold_rule_on_worked_examples():
    subjects = np.array([task.SUBJECTS.index("hotel")] * 4)
    replies = [
        "the hotel was amazing and amazing . <eos>",  # distinct adjectives count once: 3 + 1
        "the movie was awful . <eos>",  # -3, wrong subject -1
        "it was good , bad and okay . <eos>",  # 1 - 1 + 0, no subject
        "the hotel was great",  # 2 + 1, never ends: -2
    ]
    responses = np.zeros((4, task.RESPONSE_LEN), np.int32)
    for i, text in enumerate(replies):
        ids = task.encode(text)
        responses[i, : len(ids)] = ids
    np.testing.assert_array_equal(task.gold_score(responses, subjects), [4, -4, 0, 1])


@pytest.mark.slow
def test_reduced_demo_beats_sft_on_the_gold_rule(tmp_path):
    config = DemoConfig(
        sft_examples=2048,
        sft_steps=120,
        rm_prompts=1024,
        rm_steps=120,
        ppo_iterations=12,
        eval_prompts=256,
        eval_every=6,
    )
    summary = run_demo(tmp_path, seed=0, config=config, progress=False)
    assert summary["gold_win_rate_ppo_vs_sft"] >= 0.7, summary["table"]
    assert summary["table"]["ppo"]["gold_score"] > summary["table"]["sft"]["gold_score"] + 1.0
    assert summary["reward_model_heldout_accuracy"] > 0.8
    assert json.loads((tmp_path / "summary.json").read_text())["seed"] == 0
    assert (tmp_path / "curves.png").stat().st_size > 10_000

    # The exported PPO policy loads in transformers, with its tokenizer, and is the same model.
    path = tmp_path / "models" / "ppo"
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    prompt = tokenizer("<bos> review the hotel :", return_tensors="pt")
    with torch.no_grad():
        out = hf_model.generate(**prompt, do_sample=False, max_new_tokens=8, pad_token_id=task.PAD)
    text = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert text.split()[0] in task.TOKEN_ID, text
    reward = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "models" / "reward"
    )
    assert reward.config.num_labels == 1
