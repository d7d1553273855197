"""Prompt datasets: loading (JSONL, JSON, Parquet, CSV, `datasets` directories, the hub),
tokenization with left padding to a fixed length, and a deterministic, resumable batch order.
Pretraining text for PPO-ptx loads the same way into right-padded rows (`load_texts`).

Everything here runs on the host with NumPy. A dataset becomes a `PromptDataset` of left-padded
token arrays; `batch_indices(position)` returns the rows of the next batch and the position after
it, a pure function of `(seed, epoch, index)`, so storing the position in a checkpoint makes a
resumed run see exactly the prompts an uninterrupted run would.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from rlhf_jax.config import DataConfig, PtxDataConfig, TokenizerConfig

Records = dict[str, list[Any]]

_SUFFIX_FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".tsv": "csv",
}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class DataError(ValueError):
    """The dataset or tokenizer cannot be used; the message says why and how to fix it."""


# ------------------------------------------------------------------------------------- loading


def detect_format(path: str) -> str:
    """The `DataConfig.format` that "auto" resolves to for `path`."""
    p = Path(path)
    if p.is_dir():
        if any((p / name).exists() for name in ("dataset_info.json", "dataset_dict.json")):
            return "disk"
        if any(p.rglob("*.parquet")):
            return "parquet"
        raise DataError(
            f"cannot tell the format of directory {path!r}: it is neither a datasets "
            "save_to_disk directory nor holds *.parquet files; set data.format"
        )
    if p.suffix.lower() in _SUFFIX_FORMATS:
        if not p.exists():
            raise DataError(f"dataset file {path!r} does not exist")
        return _SUFFIX_FORMATS[p.suffix.lower()]
    if not p.exists() and _HUB_ID.match(path):
        return "hub"
    if not p.exists():
        raise DataError(f"dataset {path!r} does not exist (and is not a hub id like 'org/name')")
    raise DataError(
        f"cannot tell the format of {path!r} from its extension; set data.format to one of "
        "jsonl, json, parquet, csv, disk, hub"
    )


def _rows_to_columns(rows: Sequence[Mapping[str, Any]], where: str) -> Records:
    columns: Records = {}
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise DataError(f"{where}: row {i} is a {type(row).__name__}, expected an object")
        for key in row:
            columns.setdefault(key, [None] * i)
        for key, values in columns.items():
            values.append(row.get(key))
    return columns


def _read_jsonl(path: Path) -> Records:
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{line_no}: invalid JSON ({err.msg})") from err
    return _rows_to_columns(rows, str(path))


def _read_json(path: Path) -> Records:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON ({err})") from err
    if isinstance(data, list):
        return _rows_to_columns(data, str(path))
    if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
        lengths = {len(v) for v in data.values()}
        if len(lengths) > 1:
            raise DataError(f"{path}: the columns have different lengths {sorted(lengths)}")
        return {k: list(v) for k, v in data.items()}
    raise DataError(f"{path}: expected a list of objects or an object of equal-length lists")


def _read_csv(path: Path) -> Records:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with path.open(encoding="utf-8", newline="") as f:
        return _rows_to_columns(list(csv.DictReader(f, delimiter=delimiter)), str(path))


def _read_parquet(path: Path) -> Records:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as err:
        raise DataError("reading Parquet needs pyarrow: pip install pyarrow") from err
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    tables = [pq.read_table(f) for f in files]
    return pa.concat_tables(tables).to_pydict() if tables else {}


def _import_datasets():
    try:
        import datasets
    except ImportError as err:
        raise DataError(
            "this dataset needs the `datasets` package (pip install datasets), or convert it to "
            "JSONL/Parquet/CSV"
        ) from err
    return datasets


def _select_split(obj: Any, split: str, where: str) -> Any:
    if hasattr(obj, "keys") and not hasattr(obj, "column_names"):  # a DatasetDict
        if split not in obj:
            raise DataError(f"{where} has no split {split!r}; available: {sorted(obj.keys())}")
        return obj[split]
    return obj


def load_records(config: DataConfig | PtxDataConfig) -> Records:
    """Reads the dataset named by `config` into columns (`{name: [value per row]}`).

    Raises:
      DataError: unreadable or empty dataset, missing optional package, unknown split.
    """
    fmt = detect_format(config.path) if config.format == "auto" else config.format
    path = Path(config.path)
    if fmt not in ("hub",) and not path.exists():
        raise DataError(f"dataset {config.path!r} does not exist")
    if fmt == "jsonl":
        records = _read_jsonl(path)
    elif fmt == "json":
        records = _read_json(path)
    elif fmt == "csv":
        records = _read_csv(path)
    elif fmt == "parquet":
        records = _read_parquet(path)
    elif fmt == "disk":
        datasets = _import_datasets()
        ds = _select_split(datasets.load_from_disk(str(path)), config.split, config.path)
        records = ds.to_dict()
    elif fmt == "hub":
        datasets = _import_datasets()
        try:
            ds = datasets.load_dataset(config.path, split=config.split)
        except Exception as err:
            raise DataError(
                f"cannot load hub dataset {config.path!r} (split {config.split!r}): {err}. "
                "Without network access, download it elsewhere and point data.path at the "
                "local files"
            ) from err
        records = ds.to_dict()
    else:
        raise DataError(f"unknown data.format {fmt!r}")
    num_rows = len(next(iter(records.values()))) if records else 0
    if num_rows == 0:
        raise DataError(f"dataset {config.path!r} is empty (no rows); point data.path at prompts")
    return records


# ---------------------------------------------------------------------------------- tokenizer


def load_tokenizer(config: TokenizerConfig, default_path: str) -> Any:
    """Loads the tokenizer (`config.path`, else `default_path`) and applies `pad_token` and
    `chat_template` from the config. Never downloads unless `default_path` is a hub id that
    transformers can fetch.

    Raises:
      DataError: the tokenizer cannot be loaded, or it has no pad token and none is configured.
    """
    import transformers

    path = config.path or default_path
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    except Exception as err:
        raise DataError(
            f"cannot load a tokenizer from {path!r} ({type(err).__name__}: {err}); set "
            "tokenizer.path to a directory with tokenizer.json / tokenizer_config.json"
        ) from err
    if config.pad_token is not None and tokenizer.pad_token != config.pad_token:
        if config.pad_token in tokenizer.get_vocab():
            tokenizer.pad_token = config.pad_token
        else:
            tokenizer.add_special_tokens({"pad_token": config.pad_token})
    if tokenizer.pad_token_id is None:
        raise DataError(
            f"the tokenizer at {path!r} has no pad token; name one with tokenizer.pad_token=... "
            "(an existing token such as the EOS token, or a new one like '[PAD]' that fits the "
            "model's embedding table)"
        )
    if config.chat_template is not None:
        tokenizer.chat_template = config.chat_template
    tokenizer.padding_side = "left"
    return tokenizer


def stop_token_ids(tokenizer: Any, config: TokenizerConfig) -> tuple[int, ...]:
    """Token ids that end a response: EOS (when `stop_at_eos`) plus `extra_stop_tokens`."""
    ids: list[int] = []
    if config.stop_at_eos:
        if tokenizer.eos_token_id is None:
            raise DataError(
                "tokenizer.stop_at_eos is set but the tokenizer has no EOS token; set "
                "tokenizer.extra_stop_tokens or tokenizer.stop_at_eos=false"
            )
        ids.append(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for token in config.extra_stop_tokens:
        if token not in vocab:
            raise DataError(
                f"tokenizer.extra_stop_tokens: {token!r} is not a single token of the vocabulary"
            )
        ids.append(int(vocab[token]))
    return tuple(dict.fromkeys(ids))


# ------------------------------------------------------------------------------- tokenization


@dataclasses.dataclass(frozen=True)
class PromptDataset:
    """Tokenized prompts, left-padded to a fixed length.

    Attributes:
      tokens: int32 `[N, P]`, pad id on the left.
      mask: bool `[N, P]`, True on real tokens (every row has at least one).
      texts: the prompt strings as tokenized (chat prompts after the template).
      columns: the requested extra columns, one value per row (e.g. answers for a reward
        function).
      num_truncated: prompts cut from the left to fit. num_dropped: prompts dropped as too long.
    """

    tokens: np.ndarray
    mask: np.ndarray
    texts: tuple[str, ...]
    columns: Mapping[str, list[Any]]
    num_truncated: int = 0
    num_dropped: int = 0

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


def _render_chat(value: Any, tokenizer: Any, row: int, column: str) -> str:
    if isinstance(value, str):
        messages = [{"role": "user", "content": value}]
    elif isinstance(value, Sequence) and all(
        isinstance(m, Mapping) and "role" in m and "content" in m for m in value
    ):
        messages = [dict(m) for m in value]
    else:
        raise DataError(
            f"row {row}: column {column!r} must hold a list of {{'role', 'content'}} messages "
            f"(or a string) when data.chat is set, got {type(value).__name__}"
        )
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    if not messages:
        raise DataError(f"row {row}: column {column!r} has no non-assistant message to prompt with")
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(
            "data.chat is set but the tokenizer has no chat template; set "
            "tokenizer.chat_template or use plain-text prompts (data.chat=false)"
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def tokenize_prompts(
    records: Records,
    tokenizer: Any,
    config: DataConfig,
    *,
    extra_columns: Sequence[str] = (),
) -> PromptDataset:
    """Tokenizes `records[config.column]` and left-pads to `config.max_prompt_length`.

    Raises:
      DataError: missing column (the message lists the available ones), tokenizer without a pad
        token, non-string prompts, or no prompt left after dropping over-long ones.
    """
    available = sorted(records)
    for name in (config.column, *extra_columns):
        if name not in records:
            raise DataError(
                f"dataset {config.path!r} has no column {name!r}; available columns: {available}"
                + (" (set data.column)" if name == config.column else "")
            )
    if tokenizer.pad_token_id is None:
        raise DataError(
            "the tokenizer has no pad token; name one with tokenizer.pad_token=... (an existing "
            "token such as EOS, or a new one like '[PAD]')"
        )
    values = records[config.column]
    if config.chat:
        texts = [_render_chat(v, tokenizer, i, config.column) for i, v in enumerate(values)]
        add_special = False
    else:
        for i, v in enumerate(values):
            if not isinstance(v, str):
                raise DataError(
                    f"row {i}: column {config.column!r} holds {type(v).__name__}, not text; for "
                    "chat messages set data.chat=true"
                )
        texts = list(values)
        add_special = config.add_special_tokens
    encoded = tokenizer(texts, add_special_tokens=add_special)["input_ids"]
    length, pad = config.max_prompt_length, int(tokenizer.pad_token_id)
    keep, rows, truncated, dropped = [], [], 0, 0
    for i, ids in enumerate(encoded):
        if len(ids) == 0:
            raise DataError(f"row {i}: the prompt tokenizes to nothing ({texts[i]!r})")
        if len(ids) > length:
            if config.truncation == "drop":
                dropped += 1
                continue
            ids = ids[-length:]
            truncated += 1
        keep.append(i)
        rows.append(ids)
        if config.max_prompts is not None and len(rows) == config.max_prompts:
            break
    if not rows:
        raise DataError(
            f"all {len(encoded)} prompts are longer than data.max_prompt_length={length} tokens "
            "and were dropped; raise max_prompt_length or set data.truncation=left"
        )
    tokens = np.full((len(rows), length), pad, np.int32)
    mask = np.zeros((len(rows), length), bool)
    for r, ids in enumerate(rows):
        tokens[r, length - len(ids) :] = ids
        mask[r, length - len(ids) :] = True
    return PromptDataset(
        tokens=tokens,
        mask=mask,
        texts=tuple(texts[i] for i in keep),
        columns={name: [records[name][i] for i in keep] for name in extra_columns},
        num_truncated=truncated,
        num_dropped=dropped,
    )


def load_prompts(
    config: DataConfig, tokenizer: Any, *, extra_columns: Sequence[str] = ()
) -> PromptDataset:
    """`load_records` + `tokenize_prompts`."""
    return tokenize_prompts(load_records(config), tokenizer, config, extra_columns=extra_columns)


@dataclasses.dataclass(frozen=True)
class TextDataset:
    """Tokenized text rows, right-padded to a fixed length (the PPO-ptx pretraining data).

    Attributes:
      tokens: int32 `[N, S]`, pad id on the right.
      mask: bool `[N, S]`, True on real tokens (every row has at least 2).
      num_truncated: texts cut to the first S tokens. num_dropped: texts of fewer than 2 tokens.
    """

    tokens: np.ndarray
    mask: np.ndarray
    num_truncated: int = 0
    num_dropped: int = 0

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


def load_texts(config: PtxDataConfig, tokenizer: Any) -> TextDataset:
    """Reads `config.column` of the dataset and tokenizes it, right-padded to `max_length`.

    Raises:
      DataError: unreadable dataset, missing column (the message lists the available ones),
        non-string values, or no row with at least 2 tokens.
    """
    records = load_records(config)
    if config.column not in records:
        raise DataError(
            f"ptx_data: dataset {config.path!r} has no column {config.column!r}; available "
            f"columns: {sorted(records)} (set ptx_data.column)"
        )
    values = records[config.column]
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise DataError(
                f"ptx_data: row {i} of column {config.column!r} holds {type(v).__name__}, not text"
            )
    encoded = tokenizer(list(values), add_special_tokens=config.add_special_tokens)["input_ids"]
    rows = [ids[: config.max_length] for ids in encoded if len(ids) >= 2]
    if not rows:
        raise DataError(
            f"ptx_data: none of the {len(values)} texts of {config.path!r} has 2 tokens or more"
        )
    length, pad = config.max_length, int(tokenizer.pad_token_id)
    tokens = np.full((len(rows), length), pad, np.int32)
    mask = np.zeros((len(rows), length), bool)
    for r, ids in enumerate(rows):
        tokens[r, : len(ids)] = ids
        mask[r, : len(ids)] = True
    return TextDataset(
        tokens=tokens,
        mask=mask,
        num_truncated=sum(len(ids) > length for ids in encoded),
        num_dropped=len(encoded) - len(rows),
    )


# ----------------------------------------------------------------------------------- batching


class DataPosition(NamedTuple):
    """Where the batch stream stands: the epoch and the index within its order."""

    epoch: int = 0
    index: int = 0


def epoch_order(num_rows: int, epoch: int, seed: int, shuffle: bool = True) -> np.ndarray:
    """Row order of an epoch: a permutation drawn from `(seed, epoch)`, or `arange`."""
    if not shuffle:
        return np.arange(num_rows)
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


def batch_indices(
    num_rows: int,
    batch_size: int,
    position: DataPosition,
    *,
    seed: int,
    shuffle: bool = True,
) -> tuple[np.ndarray, DataPosition]:
    """Rows `[batch_size]` of the next batch and the position after it.

    The stream is the concatenation of the epochs' orders; a batch that reaches the end of an
    epoch continues with the next one, so no prompt is skipped and datasets smaller than a batch
    work. A pure function of its arguments.
    """
    if num_rows < 1 or batch_size < 1:
        raise ValueError(f"need num_rows >= 1 and batch_size >= 1, got {num_rows}, {batch_size}")
    epoch, index = int(position.epoch), int(position.index)
    if not 0 <= index < num_rows:
        raise ValueError(f"data position index {index} is outside the dataset of {num_rows} rows")
    parts, needed = [], batch_size
    while needed:
        take = min(needed, num_rows - index)
        parts.append(epoch_order(num_rows, epoch, seed, shuffle)[index : index + take])
        needed -= take
        index += take
        if index == num_rows:
            epoch, index = epoch + 1, 0
    return np.concatenate(parts), DataPosition(epoch, index)
