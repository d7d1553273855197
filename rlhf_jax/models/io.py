"""Hugging Face checkpoint files: safetensors indexed from their headers and read one tensor at a
time (`index_weights`, `StoredTensor`), PyTorch pickles only when allowed, and `load` / `save` of a
checkpoint directory (config.json + weights; the name and layout mapping is `weights`, the config
mapping `hf_config`).

Loading is lazy (`load`): safetensors files are indexed from their headers, names and shapes are
checked, and each param leaf (`weights.LazyLeaf`) reads and converts one layer's tensor at a time
when a device's slice of it is placed.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from jax.sharding import Mesh
from safetensors.numpy import save_file

from rlhf_jax import sharding as sh
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.hf_config import config_from_hf, config_to_hf
from rlhf_jax.models.model import Params, logical_axes
from rlhf_jax.models.weights import LazyLeaf, hf_to_params, params_to_hf

_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U64": np.uint64,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """One tensor of a safetensors file, read into a fresh buffer only by `np.asarray` (never
    memory-mapped: touched pages of a mapping would count in the process's RSS)."""

    name: str
    file: Path
    dtype_name: str  # the safetensors dtype, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int  # of the first byte, from the start of the file
    nbytes: int

    @property
    def dtype(self) -> np.dtype:
        if self.dtype_name not in _SAFETENSORS_DTYPES:
            raise ValueError(
                f"tensor {self.name!r} in {self.file} has unsupported dtype {self.dtype_name}"
            )
        return np.dtype(_SAFETENSORS_DTYPES[self.dtype_name])

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        stored = self.dtype  # safetensors is little-endian, like every host JAX runs on
        count = int(np.prod(self.shape))
        data = np.fromfile(self.file, dtype=stored, count=count, offset=self.offset)
        if data.size != count:
            raise ValueError(f"{self.file} is truncated: tensor {self.name!r} is incomplete")
        data = data.reshape(self.shape)
        return data if dtype is None else data.astype(dtype, copy=False)


def _index_safetensors(file: Path) -> dict[str, StoredTensor]:
    """Every tensor of one safetensors file, from its header alone."""
    with open(file, "rb") as f:
        header_len = int(np.frombuffer(f.read(8), "<u8")[0])
        header = json.loads(f.read(header_len))
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        out[name] = StoredTensor(
            name, file, info["dtype"], tuple(info["shape"]), 8 + header_len + start, end - start
        )
    return out


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        return [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return sorted(path.glob("*.safetensors"))


def _pickles(path: Path, allow_pickle: bool) -> list[Path]:
    pickles = sorted(path.glob("*.bin"))
    if pickles and not allow_pickle:
        raise ValueError(
            f"{path} has only pickled weights ({pickles[0].name}); pickle can run arbitrary code. "
            "Convert them to safetensors, or pass allow_pickle=True to load them with "
            "torch.load(weights_only=True)."
        )
    if not pickles:
        raise ValueError(f"no *.safetensors or *.bin weights in {path}")
    return pickles


def index_weights(path: str | Path, allow_pickle: bool = False) -> dict[str, Any]:
    """Every tensor of an HF checkpoint directory by HF name, read only when converted: sharded
    or single safetensors files are indexed from their headers (`StoredTensor`s); only with
    `allow_pickle`, PyTorch `.bin` pickles are read whole (NumPy arrays)."""
    path = Path(path)
    files = _safetensors_files(path)
    if files:
        tensors: dict[str, Any] = {}
        for file in files:
            tensors |= _index_safetensors(file)
        return tensors
    import torch  # only for explicitly allowed pickled checkpoints

    tensors = {}
    for file in _pickles(path, allow_pickle):
        state = torch.load(file, map_location="cpu", weights_only=True)
        tensors |= {k: v.float().numpy() for k, v in state.items()}
    return tensors


def read_weights(path: str | Path, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """All tensors of an HF checkpoint directory as NumPy arrays, by HF name (`index_weights`,
    every tensor read)."""
    return {name: np.asarray(t) for name, t in index_weights(path, allow_pickle).items()}


def load(
    path: str | Path,
    *,
    dtype: str | None = None,
    allow_pickle: bool = False,
    mesh: Mesh | None = None,
    rules: sh.Rules | None = None,
) -> tuple[Params, ModelConfig]:
    """Loads a local HF checkpoint directory (config.json + safetensors; never downloads).

    Safetensors are read lazily, one layer's tensor at a time, straight into each device's
    slice: tensor names and shapes are checked against the config first (from the files'
    headers), then each leaf is placed device by device (`rlhf_jax.sharding.shard_params`), so
    the host holds at most one device's slice of one leaf plus one layer's HF tensor (without a
    mesh: one leaf). In a multi-process run every process calls it with the same `path` (a shared
    or replicated file system) and reads only what its own devices hold.

    Args:
      path: directory with config.json and `model.safetensors`, sharded safetensors with
        `model.safetensors.index.json`, or (with `allow_pickle`) `*.bin` files (read whole).
      dtype: params and compute dtype (e.g. "bfloat16"); default float32 for both.
      allow_pickle: allow `*.bin` pickles (read with `torch.load(weights_only=True)`).
      mesh: place every param sharded on `mesh` (`models.param_shardings(config, mesh,
        rules)`); None: on the default device.
      rules: logical-axis rules for `mesh` (None: `rlhf_jax.sharding.DEFAULT_RULES`).

    Returns:
      `(params, config)`: params as jax arrays.
    """
    import transformers  # here: importing it adds seconds to every process start

    path = Path(path)
    if not (path / "config.json").exists():
        raise ValueError(f"{path} is not an HF checkpoint directory (no config.json)")
    hf_config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    config = config_from_hf(hf_config)
    if dtype is not None:
        config = dataclasses.replace(config, dtype=dtype, param_dtype=dtype)
    host = hf_to_params(index_weights(path, allow_pickle), config, lazy=True)
    if mesh is None:
        # one leaf at a time (a transfer in flight keeps its host array alive)
        put = lambda x: jax.device_put(np.asarray(x)).block_until_ready()  # noqa: E731
        is_leaf = lambda x: isinstance(x, LazyLeaf)  # noqa: E731
        return jax.tree.map(put, host, is_leaf=is_leaf), config
    return sh.shard_params(host, logical_axes(config), mesh, rules), config


def save(params: Params, config: ModelConfig, path: str | Path, *, tokenizer: Any = None) -> None:
    """Writes `model.safetensors` + `config.json` (+ the tokenizer) that transformers'
    `AutoModelForCausalLM` / `AutoModelForSequenceClassification` load without key warnings."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(params_to_hf(params, config), path / "model.safetensors", metadata={"format": "pt"})
    config_to_hf(config).save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
