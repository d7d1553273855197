"""`rlhf-jax train sft` / `train rm` through the CLI on tiny local models and data: the loss falls,
checkpoints resume, and the exported models load where PPO needs them."""

import json

import numpy as np
import pytest
import transformers
from tokenizer_utils import save_tiny_models

from rlhf_jax import cli, models

POSITIVE = ["good happy", "happy good", "good good"]
NEGATIVE = ["bad sad", "sad bad", "bad bad"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("supervised")
    paths = save_tiny_models(root / "models")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(96):
        prompt = f"tell me about the {['cat', 'dog', 'park'][i % 3]} ."
        rows.append(
            {
                "prompt": prompt,
                "completion": POSITIVE[i % 3],
                "chosen": POSITIVE[rng.integers(3)],
                "rejected": NEGATIVE[rng.integers(3)],
            }
        )
    data = root / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    return root, paths, data


def run(*argv):
    assert cli.main(list(argv)) == 0


def common(run_dir, model, data, steps):
    return [
        f"run_dir={run_dir}",
        f"model={model}",
        f"data.path={data}",
        "data.max_length=16",
        "data.eval_fraction=0.25",
        "batch_size=16",
        f"train.total_steps={steps}",
        "train.learning_rate=0.003",
        "eval_every=10",
        "checkpoint.every=5",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
    ]


def test_sft_then_rm_then_loadable_for_ppo(tiny):
    root, paths, data = tiny
    sft_dir = root / "sft"
    run("train", "sft", *common(sft_dir, paths["policy"], data, 10))
    # Resuming finishes the remaining steps from the newest checkpoint.
    run("train", "sft", "--resume", *common(sft_dir, paths["policy"], data, 20))
    records = [json.loads(line) for line in (sft_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == list(range(1, 21))
    assert records[-1]["eval/loss"] < records[0]["loss"] * 0.5, (records[0], records[-1])
    policy = transformers.AutoModelForCausalLM.from_pretrained(sft_dir / "model")
    assert policy.config.vocab_size == 64

    rm_dir = root / "rm"
    run("train", "rm", *common(rm_dir, sft_dir / "model", data, 20))
    last = [json.loads(line) for line in (rm_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["eval/accuracy"] >= 0.9, last
    reward = transformers.AutoModelForSequenceClassification.from_pretrained(rm_dir / "model")
    assert reward.config.num_labels == 1
    params, config = models.load(rm_dir / "model")
    value_params, value_config = models.value_from_reward(params, config)
    assert value_config.head == "score"


def test_missing_column_and_existing_run_are_clear_errors(tiny, capsys):
    root, paths, data = tiny
    bad = common(root / "bad", paths["policy"], data, 2) + ["data.completion_column=answer"]
    assert cli.main(["train", "sft", *bad]) != 0
    assert "no column(s) ['answer']" in capsys.readouterr().err


def test_pad_equal_to_eos_keeps_the_eos_a_real_token():
    """With pad == eos (what the tokenizer error message suggests), the supervised batches still
    mark the appended EOS as a real token: the reward model reads the EOS, as PPO's scoring does
    (the score goes on the last real response token), instead of the token before it."""
    from tokenizer_utils import EOS, tiny_tokenizer

    from rlhf_jax.train_supervised import SupervisedDataConfig, _attention_mask, _pack

    tok = tiny_tokenizer(pad_token=EOS)
    assert tok.pad_token_id == tok.eos_token_id
    config = SupervisedDataConfig(path="unused", max_length=12)
    tokens, loss_mask, _ = _pack(tok, ["tell me about the cat ."], ["good happy"], config)
    mask = _attention_mask(loss_mask)
    last = int(mask[0].sum()) - 1
    assert tokens[0, last] == tok.eos_token_id and loss_mask[0, last]
    np.testing.assert_array_equal(mask[0], np.arange(12) <= last)
    assert tokens[0, last] == tok.pad_token_id  # `tokens != pad` would have hidden it


def test_lora_sft_and_rm_export_merged_models_and_peft_adapters(tiny):
    """SFT and RM with `lora`: the loss falls, resume continues, checkpoints hold the trainable
    half, and the exported adapter on its base equals the merged model."""
    import peft
    import torch

    root, paths, data = tiny
    lora = ["lora.rank=8", "lora.alpha=16", "train.learning_rate=0.01"]
    sft_dir = root / "lora_sft"
    run("train", "sft", *common(sft_dir, paths["policy"], data, 10), *lora)
    run("train", "sft", "--resume", *common(sft_dir, paths["policy"], data, 20), *lora)
    records = [json.loads(line) for line in (sft_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == list(range(1, 21))
    assert records[-1]["eval/loss"] < records[0]["loss"] * 0.7, (records[0], records[-1])
    tokens = torch.tensor([[5, 9, 13, 17, 21]])
    merged = transformers.AutoModelForCausalLM.from_pretrained(sft_dir / "model")
    base = transformers.AutoModelForCausalLM.from_pretrained(paths["policy"])
    adapter = peft.PeftModel.from_pretrained(base, sft_dir / "model_adapter").eval()
    with torch.no_grad():
        want, got = merged(input_ids=tokens).logits, adapter(input_ids=tokens).logits
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-4 * float(want.abs().max()))

    rm_dir = root / "lora_rm"
    run("train", "rm", *common(rm_dir, paths["policy"], data, 20), *lora)
    last = [json.loads(line) for line in (rm_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["eval/accuracy"] >= 0.9, last
    config = json.loads((rm_dir / "model_adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
