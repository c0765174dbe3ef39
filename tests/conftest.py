import os

# Parity fixtures are fp32 references: full-precision matmuls everywhere (the CPU default,
# but TPU/GPU default to bf16 passes). Set before JAX initialises.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
