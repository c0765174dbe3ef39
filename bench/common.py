"""Shared helpers of the benchmarks: device naming, a reference matmul, timing, peak memory."""

from __future__ import annotations

import resource
import time

import jax
import jax.numpy as jnp


def device_name() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', '?')} (x{jax.device_count()})"


def timeit(fn, *args, repeat: int = 3) -> float:
    """Best wall time of `fn(*args)` (compiled and warmed up first), outputs blocked on."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_flops(dtype, n: int | None = None) -> float:
    """Achieved FLOP/s of a large square matmul on the current device (the roofline we compare to)."""
    if n is None:
        n = 8192 if jax.devices()[0].platform in ("gpu", "tpu") else 2048
    a = jnp.ones((n, n), dtype)
    # float32 accumulation, as every matmul of the model: for 16-bit inputs the fast path on CPU
    f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    return 2 * n**3 / timeit(f, a, a)


def peak_memory_bytes() -> int:
    """Peak device memory where the backend reports it, else the process's peak RSS."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def fmt_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
