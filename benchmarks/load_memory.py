"""Peak host memory (RSS) of loading an HF checkpoint: the eager loader (every tensor read whole,
converted and stacked on the host, then placed) against `models.load`'s lazy one (one layer's
tensor at a time, straight into each device's slice), onto an 8-device fsdp=8 CPU mesh and onto
one device.

    python3 benchmarks/load_memory.py                   # ~1.2B Llama, bfloat16, under /tmp
    python3 benchmarks/load_memory.py --layers 2 --hidden 256 --intermediate 1024 --vocab 1024 \
        --heads 4 --checkpoint /tmp/tiny_ckpt           # a toy size

The checkpoint (random bfloat16 weights; config.json + one model.safetensors, written tensor by
tensor) is created once under `--checkpoint` and reused. Each variant runs in a fresh
subprocess, which reports its own `ru_maxrss` (the peak over its whole life), the RSS before
loading (imports, mesh, a warm-up placement) and the bytes its devices hold. On the CPU backend
the "devices" are this process's memory too, so the floor for any loader is the baseline plus
the loaded params; what a loader adds above that is what it holds on the host.

The eager variant is the loader as it was before the lazy one (issue #25 item 8), reproduced
here: `safe_open(...).get_tensor` for every tensor, the per-spec conversion stacked with
`np.stack`, then `jax.make_array_from_callback` per leaf (on a mesh) or `jnp.asarray` (one
device).
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402

from rlhf_jax import models  # noqa: E402
from rlhf_jax import sharding as sh  # noqa: E402
from rlhf_jax.models import weights  # noqa: E402

VARIANTS = [
    ("eager", "fsdp8"),
    ("lazy", "fsdp8"),
    ("eager", "one_device"),
    ("lazy", "one_device"),
]


# ----------------------------------------------------------------------------- the checkpoint


def write_checkpoint(config: models.ModelConfig, path: Path, seed: int = 0) -> int:
    """Random bfloat16 weights of `config` as config.json + model.safetensors, generated and
    written one tensor at a time. Returns the file's size in bytes."""
    import ml_dtypes

    # Names and shapes from a one-layer copy of the model (the other layers only rename).
    one = dataclasses.replace(config, num_layers=1)
    shapes = jax.eval_shape(lambda: models.init_params(one, jax.random.key(0)))
    dummy = jax.tree.map(lambda s: np.zeros(s.shape, np.int8), shapes)
    layer0 = {name: t.shape for name, t in models.params_to_hf(dummy, one).items()}
    entries = []
    for name, shape in layer0.items():
        if ".layers.0." in name:
            entries += [
                (name.replace(".layers.0.", f".layers.{i}."), shape)
                for i in range(config.num_layers)
            ]
        else:
            entries.append((name, shape))
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in entries:
        nbytes = int(np.prod(shape)) * 2
        header[name] = {
            "dtype": "BF16",
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tmp = path / "model.safetensors.partial"
    with open(tmp, "wb") as f:
        f.write(np.uint64(len(blob)).tobytes() + blob)
        for name, shape in entries:
            scale = 1.0 if name.endswith("norm.weight") else 0.02
            value = rng.standard_normal(shape, np.float32) * np.float32(scale)
            f.write(value.astype(ml_dtypes.bfloat16).tobytes())
    tmp.rename(path / "model.safetensors")
    models.config_to_hf(config).save_pretrained(path)
    return (path / "model.safetensors").stat().st_size


# ----------------------------------------------------------------------------- the old loader


def eager_hf_to_params(tensors: dict[str, np.ndarray], config: models.ModelConfig) -> Any:
    """`hf_to_params` as it was: every layer converted, `np.stack`ed, then cast."""
    shapes = models.param_shapes(config)
    specs = weights.expected_specs(config, shapes)
    expected = {name for spec in specs for name in weights.layer_names(spec, config)}
    by_name = {}
    for name, value in tensors.items():
        canonical = weights.canonical_name(name, config, expected)
        if canonical is not None:
            by_name[canonical] = value
    params: dict[str, Any] = {}
    for spec in specs:
        per_layer = "{i}" in spec.hf
        layers = [spec.to_params(np.asarray(by_name[n])) for n in weights.layer_names(spec, config)]
        for j, path in enumerate(spec.paths):
            parts = [leaves[j] for leaves in layers]
            value = np.stack(parts) if per_layer else parts[0]
            weights.set_path(params, path, np.asarray(value, dtype=config.params_dtype))
    return params


def eager_load(path: Path, config: models.ModelConfig, mesh: Any) -> Any:
    from safetensors import safe_open

    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="np") as f:
            tensors |= {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    host = eager_hf_to_params(tensors, config)
    if mesh is None:
        return jax.tree.map(jax.numpy.asarray, host)
    shardings = models.param_shardings(config, mesh)

    def place(x: np.ndarray, sharding: Any) -> jax.Array:
        return jax.make_array_from_callback(x.shape, sharding, lambda i: np.asarray(x[i]))

    return jax.tree.map(place, host, shardings)


# ----------------------------------------------------------------------------- one variant


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_variant(args: argparse.Namespace) -> dict[str, Any]:
    import transformers

    path = Path(args.checkpoint)
    mesh = sh.make_mesh(sh.MeshConfig(data=1, fsdp=8, tensor=1)) if args.target == "fsdp8" else None
    config = models.config_from_hf(transformers.AutoConfig.from_pretrained(path))
    config = dataclasses.replace(config, dtype=args.dtype, param_dtype=args.dtype)
    # warm up: the placement code paths on a small array
    warm = {"w": np.ones((8, 8), np.float32)}
    if mesh is None:
        jax.device_put(warm["w"]).block_until_ready()
    else:
        jax.block_until_ready(
            sh.shard_params(warm, {"w": jax.sharding.PartitionSpec("embed")}, mesh)
        )
    baseline = common.peak_rss_mb()
    start = time.perf_counter()
    if args.variant == "eager":
        params = eager_load(path, config, mesh)
    else:
        params, _ = models.load(path, dtype=args.dtype, mesh=mesh)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    device_bytes = sum(s.data.nbytes for x in jax.tree.leaves(params) for s in x.addressable_shards)
    return {
        "variant": args.variant,
        "target": args.target,
        "baseline_rss_mb": baseline,
        "peak_rss_mb": common.peak_rss_mb(),
        "rss_after_mb": rss_mb(),
        "device_mb": device_bytes / 2**20,
        "seconds": seconds,
    }


# ----------------------------------------------------------------------------- driver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--checkpoint", default="/tmp/rlhf_jax_load_memory_ckpt")
    parser.add_argument("--dtype", default="bfloat16", help="params dtype to load into")
    parser.add_argument("--json", default=None)
    parser.add_argument("--variant", choices=["eager", "lazy"], help=argparse.SUPPRESS)
    parser.add_argument("--target", choices=["fsdp8", "one_device"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant is not None:  # a child: one measurement, as JSON on the last line
        print(json.dumps(run_variant(args)))
        return

    config = common.llama_config(
        layers=args.layers,
        hidden=args.hidden,
        intermediate=args.intermediate,
        heads=args.heads,
        vocab=args.vocab,
    )
    path = Path(args.checkpoint)
    if not (path / "model.safetensors").exists():
        print(f"writing a random bfloat16 checkpoint to {path} ...", flush=True)
        write_checkpoint(config, path)
    n_params = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(models.param_shapes(config)))
    size_mb = (path / "model.safetensors").stat().st_size / 2**20
    print(
        f"checkpoint: {n_params / 1e6:.0f}M params, {size_mb:.0f} MiB bfloat16 safetensors; "
        f"loading into {args.dtype}"
    )
    print(f"{'variant':<8} {'target':<11} {'baseline':>9} {'peak':>9} {'peak-base':>10} "
          f"{'devices':>9} {'host extra':>11} {'seconds':>8}  (MiB)")  # fmt: skip
    results = []
    for variant, target in VARIANTS:
        cmd = [sys.executable, __file__, f"--checkpoint={path}", f"--dtype={args.dtype}"]
        cmd += [f"--variant={variant}", f"--target={target}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{variant} {target} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r["host_extra_mb"] = r["peak_rss_mb"] - r["baseline_rss_mb"] - r["device_mb"]
        results.append(r)
        print(
            f"{variant:<8} {target:<11} {r['baseline_rss_mb']:>9.0f} {r['peak_rss_mb']:>9.0f} "
            f"{r['peak_rss_mb'] - r['baseline_rss_mb']:>10.0f} {r['device_mb']:>9.0f} "
            f"{r['host_extra_mb']:>11.0f} {r['seconds']:>8.1f}",
            flush=True,
        )
    if args.json:
        common.write_json(
            args.json,
            "load_memory",
            vars(args) | {"params": n_params, "checkpoint_mb": size_mb},
            {"variants": results},
        )


if __name__ == "__main__":
    main()
