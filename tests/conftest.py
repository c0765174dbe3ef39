"""Test session setup, before JAX initialises.

* 8 host CPU devices for the whole session, so sharding tests build their meshes in process
  (tests on one device use the first and do not notice the others);
* parity fixtures are fp32 references: full-precision matmuls everywhere (the CPU default,
  but TPU/GPU default to bf16 passes).
"""

import os

os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
# Tests never read or write the user's compilation cache (the cache tests pass their own folder).
os.environ["MAGI_JAX_CACHE_DIR"] = "off"

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")
