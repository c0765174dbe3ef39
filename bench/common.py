"""Shared helpers of the benchmarks: device naming, a reference matmul, timing, peak memory,
where a program's time goes."""

from __future__ import annotations

import collections
import gzip
import json
import resource
import time
from pathlib import Path

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


# Dense bf16 matmul FLOP/s by the vendors' datasheets (no sparsity), by a substring of the
# device kind, most specific first: the "peak" an MFU is usually stated against. The matmul
# measured in the same run is what a device really does; both are printed.
DATASHEET_BF16 = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
    ("L4", 121e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12),
)


def datasheet_bf16_flops() -> float | None:
    """The datasheet's dense bf16 FLOP/s of this device, where DATASHEET_BF16 knows its kind."""
    kind = getattr(jax.devices()[0], "device_kind", "")
    return next((flops for name, flops in DATASHEET_BF16 if name in kind), None)


def peak_memory_bytes() -> int:
    """Peak device memory where the backend reports it, else the process's peak RSS."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def fmt_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def time_by_op(fn, *args, folder: str, top: int = 12) -> list[str]:
    """Runs `fn(*args)` once under JAX's profiler (trace kept in `folder`) and returns lines of
    where the device time went: each kernel (accelerators) or XLA op (CPU) by total time,
    with its share of the busy time and its HLO op. Call it after `fn` has compiled."""
    jax.block_until_ready(fn(*args))
    with jax.profiler.trace(folder, create_perfetto_trace=True):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        wall = time.perf_counter() - t0
    newest = max(Path(folder).glob("plugins/profile/*/*.trace.json.gz"), key=lambda f: f.stat().st_mtime)
    trace = json.loads(gzip.decompress(newest.read_bytes()))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    meta = [e for e in events if e.get("ph") == "M"]
    device = {e["pid"] for e in meta if e["name"] == "process_name" and e["args"]["name"].startswith("/device:")}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in meta if e["name"] == "thread_name"}
    # a GPU's kernels are on its stream lines (its "XLA Ops" and "XLA Modules" lines span the
    # same time again), a TPU's on "XLA Ops"; on CPU, XLA's own threads
    if device:
        on_device = [t for t in threads if t[0] in device]
        kernels = (
            {t for t in on_device if threads[t].startswith("Stream")}
            or {t for t in on_device if threads[t] == "XLA Ops"}
            or {t for t in on_device if threads[t] not in ("XLA Modules", "Steps")}
        )
    else:
        kernels = {t for t, name in threads.items() if name.startswith("tf_XLA")}

    def counted(e):  # without XLA:CPU's executor and pool-wait spans, and loops and branches holding others
        skip = ("end: ", "ThunkExecutor", "SlinkyThreadPool", "while", "cond")
        return e.get("ph") == "X" and (e["pid"], e.get("tid")) in kernels and not e["name"].startswith(skip)

    total, example = collections.Counter(), {}
    for e in filter(counted, events):
        total[e["name"]] += e["dur"]
        op = (e.get("args") or {}).get("hlo_op", "")
        example.setdefault(e["name"], op if op != e["name"] else "")
    busy = sum(total.values())
    where = sorted({threads[t] for t in kernels})
    lines = [
        f"profile: {busy / 1e3:.1f} ms in kernels / ops, {wall * 1e3:.1f} ms wall (trace in {folder})",
        f"  counted lines: {', '.join(where[:4])}{' ...' if len(where) > 4 else ''}",
    ]
    for name, us in total.most_common(top):
        op = f"  [{example[name]}]" if example[name] else ""
        lines.append(f"  {us / 1e3:9.2f} ms {us / max(busy, 1):6.1%}  {name[:90]}{op}")
    return lines
