"""Prompt data: every file format, chat templates, left padding, truncation, clear errors, and a
deterministic, resumable batch order. Host-only (no JAX compilation)."""

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizer_utils import PAD, TOKENIZER_SIZE, WORDS, save_tiny_tokenizer, tiny_tokenizer

from rlhf_jax import data
from rlhf_jax.config import DataConfig, TokenizerConfig

DATA = Path(__file__).parent / "data"
PROMPTS = [json.loads(line)["prompt"] for line in (DATA / "prompts.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def word_ids(text, tok):
    return [tok.get_vocab()[w] for w in text.split()]


def test_tiny_tokenizer_matches_hf_utils_ids():
    tok = tiny_tokenizer()
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert len(tok) == TOKENIZER_SIZE and tok.pad_token == PAD
    assert tok("the cat")["input_ids"] == word_ids("the cat", tok)
    assert tok.decode(word_ids("the cat", tok) + [2, 0, 0], skip_special_tokens=True) == "the cat"
    assert set(WORDS) <= set(tok.get_vocab())


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_formats_load_the_same_prompts(tmp_path, tok, fmt):
    rows = [{"prompt": p, "answer": str(i)} for i, p in enumerate(PROMPTS[:5])]
    path = tmp_path / f"prompts.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "csv":
        import csv

        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, ["prompt", "answer"])
            writer.writeheader()
            writer.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    config = DataConfig(path=str(path), max_prompt_length=16)
    assert data.detect_format(str(path)) == fmt
    ds = data.load_prompts(config, tok, extra_columns=["answer"])
    assert ds.texts == tuple(PROMPTS[:5])
    assert ds.columns["answer"] == ["0", "1", "2", "3", "4"]
    for i, prompt in enumerate(PROMPTS[:5]):
        ids = tok(prompt)["input_ids"]
        np.testing.assert_array_equal(ds.tokens[i, 16 - len(ids) :], ids)
        assert (ds.tokens[i, : 16 - len(ids)] == tok.pad_token_id).all()
        np.testing.assert_array_equal(ds.mask[i], np.arange(16) >= 16 - len(ids))


def test_checked_in_csv_with_quoted_comma(tok):
    ds = data.load_prompts(
        DataConfig(path=str(DATA / "prompts.csv")), tok, extra_columns=["answer"]
    )
    assert ds.texts[1] == "write a poem, about the dog" and ds.columns["answer"][1] == "dog"


def test_parquet_directory(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "data").mkdir()
    for i in range(2):
        rows = [{"prompt": p} for p in PROMPTS[3 * i : 3 * i + 3]]
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data" / f"train-{i}.parquet")
    ds = data.load_prompts(DataConfig(path=str(tmp_path), max_prompt_length=16), tok)
    assert ds.texts == tuple(PROMPTS[:6])


def test_datasets_save_to_disk_directory(tmp_path, tok):
    datasets = pytest.importorskip("datasets")
    saved = tmp_path / "saved"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"prompt": PROMPTS[:3]})}
    ).save_to_disk(str(saved))
    ds = data.load_prompts(DataConfig(path=str(saved), max_prompt_length=16), tok)
    assert ds.texts == tuple(PROMPTS[:3])


def test_chat_messages_use_the_template_and_drop_the_final_answer(tok):
    config = DataConfig(path=str(DATA / "chat.jsonl"), column="messages", chat=True)
    ds = data.load_prompts(config, tok)
    assert ds.texts == (
        "<|system|> answer yes or no <|user|> is the cat big ? <|assistant|>",
        "<|user|> tell me a story <|assistant|>",
        "<|user|> write a poem about the dog <|assistant|>",
    )
    ids = tok(ds.texts[1], add_special_tokens=False)["input_ids"]
    np.testing.assert_array_equal(ds.tokens[1, -len(ids) :], ids)


def test_truncation_left_and_drop_are_counted(tok):
    records = {"prompt": ["the cat sat on the mat", "a dog", "one two three four five six"]}
    left = data.tokenize_prompts(
        records, tok, DataConfig(path="x", max_prompt_length=4, truncation="left")
    )
    assert (left.num_truncated, left.num_dropped, len(left)) == (2, 0, 3)
    np.testing.assert_array_equal(left.tokens[0], word_ids("sat on the mat", tok))
    np.testing.assert_array_equal(left.tokens[1], [0, 0] + word_ids("a dog", tok))
    drop = data.tokenize_prompts(
        records, tok, DataConfig(path="x", max_prompt_length=4, truncation="drop")
    )
    assert (drop.num_truncated, drop.num_dropped, drop.texts) == (0, 2, ("a dog",))
    with pytest.raises(data.DataError, match="all 3 prompts are longer than"):
        data.tokenize_prompts(records, tok, DataConfig(path="x", max_prompt_length=1))
    limited = data.tokenize_prompts(
        records, tok, DataConfig(path="x", max_prompt_length=8, max_prompts=2)
    )
    assert len(limited) == 2


def test_clear_errors(tmp_path, tok):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(data.DataError, match="is empty"):
        data.load_records(DataConfig(path=str(empty)))
    with pytest.raises(data.DataError, match=r"no column 'text'; available columns: \['answer', "):
        data.load_prompts(DataConfig(path=str(DATA / "prompts.jsonl"), column="text"), tok)
    no_pad = tiny_tokenizer(pad_token=None)
    with pytest.raises(data.DataError, match="no pad token; name one with tokenizer.pad_token"):
        data.tokenize_prompts({"prompt": ["a"]}, no_pad, DataConfig(path="x"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(data.DataError, match=r"bad.jsonl:2: invalid JSON"):
        data.load_records(DataConfig(path=str(bad)))
    with pytest.raises(data.DataError, match="does not exist"):
        data.load_records(DataConfig(path=str(tmp_path / "missing.jsonl")))
    with pytest.raises(data.DataError, match="set data.chat=true"):
        data.tokenize_prompts(
            {"prompt": [[{"role": "user", "content": "a"}]]}, tok, DataConfig(path="x")
        )
    with pytest.raises(data.DataError, match="list of {'role', 'content'} messages"):
        data.tokenize_prompts({"prompt": [3]}, tok, DataConfig(path="x", chat=True))
    no_template = tiny_tokenizer(chat_template=None)
    with pytest.raises(data.DataError, match="no chat template"):
        data.tokenize_prompts({"prompt": ["a"]}, no_template, DataConfig(path="x", chat=True))


def test_load_tokenizer_pad_token_and_stop_tokens(tmp_path):
    save_tiny_tokenizer(tmp_path / "tok", pad_token=None)
    with pytest.raises(
        data.DataError, match=r"has no pad token; name one with tokenizer.pad_token"
    ):
        data.load_tokenizer(TokenizerConfig(), str(tmp_path / "tok"))
    existing = data.load_tokenizer(TokenizerConfig(pad_token="</s>"), str(tmp_path / "tok"))
    assert existing.pad_token_id == existing.eos_token_id == 2 and len(existing) == TOKENIZER_SIZE
    added = data.load_tokenizer(TokenizerConfig(pad_token="[PAD]"), str(tmp_path / "tok"))
    assert added.pad_token_id == TOKENIZER_SIZE and len(added) == TOKENIZER_SIZE + 1
    config = TokenizerConfig(extra_stop_tokens=("?", "!"))
    assert data.stop_token_ids(added, config) == (2, *word_ids("? !", added))
    with pytest.raises(data.DataError, match="not a single token"):
        data.stop_token_ids(added, TokenizerConfig(extra_stop_tokens=("two words",)))
    with pytest.raises(data.DataError, match="cannot load a tokenizer"):
        data.load_tokenizer(TokenizerConfig(), str(tmp_path / "nothing"))


def test_batches_are_deterministic_cover_every_epoch_and_resume_exactly():
    n, b = 7, 3
    position, seen = data.DataPosition(), []
    for _ in range(7):  # 21 rows = 3 epochs
        rows, position = data.batch_indices(n, b, position, seed=5)
        seen.append(rows)
    assert position == data.DataPosition(3, 0)
    flat = np.concatenate(seen)
    for epoch in range(3):
        chunk = flat[epoch * n : (epoch + 1) * n]
        np.testing.assert_array_equal(chunk, data.epoch_order(n, epoch, 5))
        assert sorted(chunk) == list(range(n))
    assert not np.array_equal(flat[:n], flat[n : 2 * n])  # a fresh order every epoch
    # Resuming from a stored position continues the same stream.
    position = data.DataPosition()
    for _ in range(4):
        _, position = data.batch_indices(n, b, position, seed=5)
    resumed = data.DataPosition(*list(position))  # as read back from a checkpoint's JSON
    rest = [data.batch_indices(n, b, resumed, seed=5)[0]]
    np.testing.assert_array_equal(rest[0], flat[12:15])
    # Another seed gives another order; no shuffle gives arange; batches larger than the data.
    assert not np.array_equal(data.epoch_order(n, 0, 6), data.epoch_order(n, 0, 5))
    rows, pos = data.batch_indices(n, 10, data.DataPosition(), seed=0, shuffle=False)
    np.testing.assert_array_equal(rows, [0, 1, 2, 3, 4, 5, 6, 0, 1, 2])
    assert pos == data.DataPosition(1, 3)
    with pytest.raises(ValueError, match="outside the dataset"):
        data.batch_indices(n, b, data.DataPosition(0, 7), seed=0)
