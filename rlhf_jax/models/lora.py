"""LoRA (Hu et al. 2021) on every family with separate projections, as peft applies it.

A targeted projection computes `y = x W + (alpha / rank) (x A) B` with `A` `[in..., rank]` and `B`
`[rank, out...]` (float32, whatever the base's dtype), unmerged, in the layer that also applies
`W` (`layers.Dense`). The adapters are leaves `lora_a` / `lora_b` beside the projection's `kernel`
in the one param tree of a model whose `ModelConfig.lora` is set (stacked over layers like the
kernels, with their own logical axes: `A` keeps the kernel's input axes, `B` its output axes), so
every forward, scan, cache, sharding rule and checkpoint handles them without a second path.

- `split(params, lora)` -> `(trainable, frozen)`: the adapters (and the modules named in
  `LoRAConfig.train_modules`, e.g. a value model's new score head) vs the base. Gradients, the
  gradient accumulator and the optimiser state cover only `trainable`; `join` puts them back.
- `base(params)`: the params without adapters: the same forward as the base model (the policy's
  frozen reference when LoRA is on; no second copy of the base exists).
- `merge(params, config)`: the base with `W + (alpha / rank) A B` folded in (export, decode).
- `adapter_to_peft` / `adapter_from_peft`, `save_peft` / `load_peft`: the adapter in peft's
  safetensors names and layout.

What an adapter is (`LoRAConfig`, the projections it may target, which families carry one) is in
`lora_config`, below the model. Initialisation as peft's default: `A` uniform in
`±1/sqrt(fan_in)` (kaiming-uniform with `a = sqrt(5)`), `B` zero, so a fresh adapter leaves the
model unchanged.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from rlhf_jax.models.lora_config import (
    ADAPTER_KEYS,
    TARGETS,
    TRAIN_MODULES,
    LoRAConfig,
    check_family,
)
from rlhf_jax.models.model import Params, param_shapes
from rlhf_jax.models.weights import PREFIX, expected_specs, get_path, params_to_hf


def _is_trainable(path: tuple[str, ...], lora: LoRAConfig) -> bool:
    return path[-1] in ADAPTER_KEYS or path[0] in lora.train_modules


def split(params: Params, lora: LoRAConfig | None) -> tuple[Params, Params | None]:
    """`(trainable, frozen)` halves of a LoRA model's params (nested dicts; `join` inverts it).
    Without LoRA everything is trainable and `frozen` is None."""
    if lora is None:
        return params, None
    flat = flax.traverse_util.flatten_dict(params)
    trainable = {k: v for k, v in flat.items() if _is_trainable(k, lora)}
    frozen = {k: v for k, v in flat.items() if not _is_trainable(k, lora)}
    unflatten = flax.traverse_util.unflatten_dict
    return unflatten(trainable), unflatten(frozen)


def join(trainable: Params, frozen: Params | None) -> Params:
    """The whole param tree from `split`'s halves."""
    if frozen is None:
        return trainable
    flat = flax.traverse_util.flatten_dict(frozen)
    flat.update(flax.traverse_util.flatten_dict(trainable))
    return flax.traverse_util.unflatten_dict(flat)


def base(params: Params) -> Params:
    """`params` without adapters (same arrays): the base model's forward."""
    flat = flax.traverse_util.flatten_dict(params)
    return flax.traverse_util.unflatten_dict(
        {k: v for k, v in flat.items() if k[-1] not in ADAPTER_KEYS}
    )


def has_adapters(params: Params) -> bool:
    return any(k[-1] in ADAPTER_KEYS for k in flax.traverse_util.flatten_dict(params))


def delta(a: jax.Array, b: jax.Array) -> jax.Array:
    """`A B` in the kernel's shape (`A` `[L, in..., r]`, `B` `[L, r, out...]`), float32."""
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    layers, r = a.shape[0], a.shape[-1]
    product = jnp.matmul(a.reshape(layers, -1, r), b.reshape(layers, r, -1))
    return product.reshape(a.shape[:-1] + b.shape[2:])


def merge(params: Params, config: Any) -> Params:
    """The base params with every adapter folded into its kernel, `W + (alpha / r) A B`
    (computed and stored in float32: in a 16-bit kernel most of a fine-tuning update would round
    away); no adapter leaves remain."""
    lora = config.lora
    if lora is None or not has_adapters(params):
        return params
    out = base(params)
    flat = flax.traverse_util.flatten_dict(out)
    full = flax.traverse_util.flatten_dict(params)
    for name in lora.targets:
        path = TARGETS[name][0]
        if path + ("lora_a",) not in full:
            continue
        kernel = flat[path + ("kernel",)]
        d = delta(full[path + ("lora_a",)], full[path + ("lora_b",)]) * lora.scale
        flat[path + ("kernel",)] = jnp.asarray(kernel, jnp.float32) + d
    return flax.traverse_util.unflatten_dict(flat)


def merged_for_decode(params: Params, config: Any) -> tuple[Params, Any]:
    """`(params, config)` to sample from: the adapters merged into copies of the kernels, stored
    in the kernels' dtype, and the config without LoRA (no-op without adapters)."""
    if config.lora is None:
        return params, config
    merged = merge(params, config)
    kinds = flax.traverse_util.flatten_dict(base(params))
    flat = flax.traverse_util.flatten_dict(merged)
    flat = {k: v.astype(kinds[k].dtype) for k, v in flat.items()}
    return flax.traverse_util.unflatten_dict(flat), dataclasses.replace(config, lora=None)


# ------------------------------------------------------------------------------------- peft


def _peft_prefix(config: Any) -> str:
    return f"base_model.model.{PREFIX[config.family]}.layers"


def peft_config(config: Any, base_model_name_or_path: str | None) -> dict[str, Any]:
    """peft's `adapter_config.json` for the adapters of `config` (a `ModelConfig` with `lora`)."""
    lora = config.lora
    modules = [TRAIN_MODULES[m] for m in lora.train_modules]
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if config.head == "lm" else "SEQ_CLS",
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(TARGETS[t][2].split(".")[-1] for t in lora.targets),
        "modules_to_save": modules or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def adapter_to_peft(params: Params, config: Any) -> dict[str, np.ndarray]:
    """peft's tensors (`adapter_model.safetensors` names, torch `[out, in]` layouts) of the
    adapters and trained modules in `params`."""
    lora = config.lora
    host = jax.device_get(params)
    prefix = _peft_prefix(config)
    out: dict[str, np.ndarray] = {}
    for name in lora.targets:
        path, _, hf = TARGETS[name]
        node = get_path(host, path)
        a, b = np.asarray(node["lora_a"], np.float32), np.asarray(node["lora_b"], np.float32)
        r = a.shape[-1]
        for i in range(a.shape[0]):
            out[f"{prefix}.{i}.{hf}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, r).T)
            out[f"{prefix}.{i}.{hf}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(r, -1).T)
    modules = list(lora.train_modules)
    if modules:
        base_config = dataclasses.replace(config, lora=None)
        tensors = params_to_hf(base(host), base_config)
        for module in modules:
            hf = TRAIN_MODULES[module]
            for key, value in tensors.items():
                parts = key.split(".")
                if hf in parts and parts[-1] == "weight":
                    out[f"base_model.model.{key}"] = np.asarray(value, np.float32)
    return out


def adapter_from_peft(
    tensors: dict[str, Any], adapter_config: dict[str, Any], config: Any
) -> tuple[Params, Any]:
    """Adapters (and trained modules) of a peft LoRA directory as a partial param tree for
    `config`'s base model, with `config` given the adapter's `LoRAConfig`. Checks the adapter's
    shapes against the model; raises ValueError naming the first mismatch."""
    if adapter_config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"not a LoRA adapter: peft_type={adapter_config.get('peft_type')!r}")
    for option in ("use_dora", "use_rslora"):
        if adapter_config.get(option):
            raise ValueError(f"the adapter uses {option}, which rlhf_jax does not implement")
    targets = adapter_config.get("target_modules") or ()
    if isinstance(targets, str):
        raise ValueError(f"target_modules={targets!r} (a regex) is not supported; list the names")
    saved = adapter_config.get("modules_to_save") or ()
    modules = [m for m, hf in TRAIN_MODULES.items() if hf in saved]
    lora = LoRAConfig(
        rank=int(adapter_config["r"]),
        alpha=float(adapter_config.get("lora_alpha", adapter_config["r"])),
        targets=tuple(targets),
        train_modules=tuple(modules),
        dropout=0.0,
    )
    config = dataclasses.replace(config, lora=lora)
    check_family(config)
    expected = param_shapes(config)
    prefix = _peft_prefix(config)
    names = {k.replace(".default", ""): v for k, v in tensors.items()}
    adapters: dict[tuple[str, ...], Any] = {}
    for name in lora.targets:
        path, _, hf = TARGETS[name]
        shape_a = get_path(expected, path + ("lora_a",)).shape
        shape_b = get_path(expected, path + ("lora_b",)).shape
        layers_a, layers_b = [], []
        for i in range(config.num_layers):
            key_a, key_b = f"{prefix}.{i}.{hf}.lora_A.weight", f"{prefix}.{i}.{hf}.lora_B.weight"
            if key_a not in names or key_b not in names:
                raise ValueError(f"the adapter has no {key_a} / {key_b}")
            a_w, b_w = np.asarray(names[key_a], np.float32), np.asarray(names[key_b], np.float32)
            want_a = (lora.rank, int(np.prod(shape_a[1:-1])))
            want_b = (int(np.prod(shape_b[2:])), lora.rank)
            if a_w.shape != want_a or b_w.shape != want_b:
                raise ValueError(
                    f"adapter tensor shapes {a_w.shape} / {b_w.shape} of {hf} in layer {i} do not "
                    f"fit this model (expected {want_a} / {want_b}): the adapter was trained on a "
                    "different base model"
                )
            layers_a.append(a_w.T.reshape(shape_a[1:]))
            layers_b.append(b_w.T.reshape(shape_b[1:]))
        adapters[path + ("lora_a",)] = np.stack(layers_a)
        adapters[path + ("lora_b",)] = np.stack(layers_b)
    if modules:
        hf_names = {k.removeprefix("base_model.model."): v for k, v in names.items()}
        hf_names = {k.replace(".modules_to_save", ""): v for k, v in hf_names.items()}
        base_config = dataclasses.replace(config, lora=None)
        for module in modules:
            wanted = {k: v for k, v in hf_names.items() if TRAIN_MODULES[module] in k.split(".")}
            part = _modules_from_hf(wanted, base_config, module)
            adapters.update(flax.traverse_util.flatten_dict({module: part}))
    return flax.traverse_util.unflatten_dict(adapters), config


def _modules_from_hf(tensors: dict[str, Any], config: Any, module: str) -> Params:
    shapes = param_shapes(config)
    out = {}
    for spec in expected_specs(config, shapes):
        if spec.paths[0][0] != module or "{i}" in spec.hf:
            continue
        if spec.hf not in tensors:
            raise ValueError(f"the adapter's modules_to_save has no {spec.hf}")
        value = np.asarray(tensors[spec.hf], np.float32)
        (leaf,) = spec.to_params(value)
        want = get_path(shapes, spec.paths[0]).shape
        if leaf.shape != want:
            raise ValueError(
                f"{spec.hf} has shape {value.shape}, this model's {module} needs {want}: the "
                "adapter was trained on a different base model"
            )
        out[spec.paths[0][1]] = leaf
    return out


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def save_peft(
    path: str | Any, params: Params, config: Any, *, base_model_name_or_path: str | None = None
) -> None:
    """Writes a peft adapter directory (`adapter_config.json` + `adapter_model.safetensors`)
    that `peft.PeftModel.from_pretrained(base_model, path)` loads."""
    if config.lora is None:
        raise ValueError("save_peft: the model config has no lora section")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = adapter_to_peft(params, config)
    save_file(tensors, path / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    adapter_config = peft_config(config, base_model_name_or_path)
    (path / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2) + "\n")


def load_peft(path: str | Any, config: Any) -> tuple[Params, Any]:
    """A peft LoRA adapter directory as `(adapter params, config with its LoRAConfig)` for the
    base model `config` (see `adapter_from_peft`; `join(adapters, base_params)` gives the model).
    Raises ValueError when the directory is not a LoRA adapter or does not fit the model."""
    path = Path(path)
    if not (path / ADAPTER_CONFIG).exists():
        raise ValueError(f"{path} is not a peft adapter directory (no {ADAPTER_CONFIG})")
    adapter_config = json.loads((path / ADAPTER_CONFIG).read_text())
    files = [path / ADAPTER_WEIGHTS] if (path / ADAPTER_WEIGHTS).exists() else []
    if not files:
        raise ValueError(f"{path} has no {ADAPTER_WEIGHTS}")
    return adapter_from_peft(load_file(str(files[0])), adapter_config, config)


def adapters_only(tree: Params) -> Params:
    """The `lora_a` / `lora_b` leaves of a param-shaped tree (no trained modules, no base)."""
    flat = flax.traverse_util.flatten_dict(tree)
    return flax.traverse_util.unflatten_dict(
        {k: v for k, v in flat.items() if k[-1] in ADAPTER_KEYS}
    )
