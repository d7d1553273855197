"""Test set-up: 8 virtual CPU devices, configured once before any JAX computation."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Older jaxlib versions read the device count from XLA_FLAGS only.
# Tiny test models are compile-bound on a 2-core CPU: LLVM's -O0 halves compile time.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_enable_x64", False)
