"""magi-jax's guided DiT forward against upstream MAGI-1's PyTorch one, on the identical call.

    MAGI_UPSTREAM_GIT=<git dir of SandAI-org/MAGI-1> ~/uperf-venv/bin/python bench/vs_upstream.py \
        --configs small,wide,24b_wide --calls cfg1,cfg3 [--dtype fp32|bf16] [--runs 5 --warmup 2]

Needs torch, so it runs in the upstream_perf venv (see ../shared/upstream_perf/README.md), never
in magi-jax's own environment. Upstream runs through that folder's harness (`--upstream-perf`,
default ../shared/upstream_perf): it builds the config's deterministic weights, captures the
sampler's call and records upstream's output as a golden fixture in a temp folder. magi-jax
loads that fixture through the real converter and its jitted guided forward, checks parity
(max|diff| / max|ref|), then the two alternate in one process (upstream, magi-jax, 3 x a
2048^3 matmul per round) so drifts of this shared machine hit both. Prints, per shape and
call, the medians, speedup = upstream / magi-jax (> 1: magi-jax faster), the spread of the
per-round speedups (noise), the parity, and the matmul rate; the last line is JSON. A second
parity column reruns magi-jax with the timestep frequencies this torch's exp computes: torch
builds round a few entries of that table differently (see torch_frequencies), which alone
moves a distilled call by a few 1e-5.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _paths(upstream_perf: str):
    for p in (upstream_perf, str(ROOT), str(ROOT / "tests")):
        if p not in sys.path:
            sys.path.insert(0, p)


def one(uf, config: str, call: str, dtype: str, runs: int, warmup: int, threads: int) -> dict:
    """Fixture from upstream, parity, then interleaved timing of one (config, call, dtype)."""
    import torch

    out = tempfile.mkdtemp(prefix="vs_upstream_")
    try:
        args = ["--config", config, "--dtype", dtype, "--call", call, "--fixtures", call]
        uf.main(args + ["--runs", "1", "--warmup", "1", "--threads", str(threads), "--out", out])
        name = f"{config}_{dtype}_{uf.CALLS[call][1]}"

        import jax
        import numpy as np
        import parity
        from dit_fixtures import call_inputs, model_of

        from magi_jax.guidance import jit_guided

        files = {"json": f"{name}.json", "npz": f"{name}.npz", "safetensors": "weights.safetensors"}
        fx = parity.Fixture(name, "dit", Path(out), files)
        cfg, args, cache0, ref = call_inputs(fx, fx.meta["calls"][0])
        run = jit_guided(model_of(fx), cfg)

        def jax_call():
            o, c = run(*args, cache0)
            jax.block_until_ready((o, c))
            return o

        o = np.asarray(jax_call(), np.float32)  # compiles
        want = np.asarray(ref["out"][0], np.float32)
        rel = float(np.abs(o - want).max() / max(np.abs(want).max(), 1e-30))
        rel_torch_exp, table_ulps = _parity_with_torch_exp(fx, cfg, args, cache0, want)

        setup = uf.build_setup(config, dtype, calls=[call], threads=threads, log=lambda m: None)
        up_fn, up_setup = uf.prepare_upstream_call(setup, call, attn="sdpa")
        mm = uf.matmul_fn(2048, torch.float32)
        up_t, jx_t, mm_t = [], [], []
        for i in range(warmup + runs):
            ip = up_setup()
            gc.collect()
            t0 = time.perf_counter()
            up_fn(ip)
            d_up = time.perf_counter() - t0
            del ip
            gc.collect()
            t0 = time.perf_counter()
            jax_call()
            d_jx = time.perf_counter() - t0
            for _ in range(3):
                t0 = time.perf_counter()
                mm()
                if i >= warmup:
                    mm_t.append(time.perf_counter() - t0)
            if i >= warmup:
                up_t.append(d_up)
                jx_t.append(d_jx)
        shutil.rmtree(setup.workdir, ignore_errors=True)
        ratios = [u / j for u, j in zip(up_t, jx_t)]
        up, jx = statistics.median(up_t), statistics.median(jx_t)
        return {
            "config": config,
            "call": call,
            "dtype": dtype,
            "upstream_median_s": round(up, 4),
            "magi_jax_median_s": round(jx, 4),
            "speedup": round(up / jx, 3),
            "speedup_min": round(min(ratios), 3),
            "speedup_max": round(max(ratios), 3),
            "parity_rel": rel,
            "parity_rel_torch_exp": rel_torch_exp,
            "exp_table_ulps_differ": table_ulps,
            "matmul_gflops": round(2 * 2048**3 / statistics.median(mm_t) / 1e9, 1),
        }
    finally:
        shutil.rmtree(out, ignore_errors=True)


def torch_frequencies():
    """The timestep embedder's frequency table as this torch computes it (upstream's formula:
    exp(-ln(10000) * i / 128) in float32). torch.exp's last-bit rounding depends on the
    build: MKL's vsExp (the build that made tests/fixtures/parity, whose table magi-jax
    ships) and ATen's own vectorised exp differ by one ulp in a few entries. At a distilled
    call's step size the arguments reach 32000, where one ulp of a frequency moves a feature
    by about 1e-4."""
    import math

    import torch

    half = 128
    return torch.exp(-math.log(10000) * torch.arange(0, half, dtype=torch.float32) / half).numpy()


def _parity_with_torch_exp(fx, cfg, args, cache0, want) -> tuple[float, list[int]]:
    """Parity of magi-jax run with this torch's frequency table instead of the shipped one,
    and the table entries where the two differ: separates the port's error from the torch
    build's exp rounding."""
    import jax
    import numpy as np
    from dit_fixtures import model_of

    from magi_jax import dit
    from magi_jax.guidance import jit_guided

    table = torch_frequencies()
    differ = np.nonzero(table.view(np.int32) != dit.TimestepEmbedder.frequencies().view(np.int32))[0].tolist()
    shipped = vars(dit.TimestepEmbedder)["frequencies"]  # the staticmethod itself, to put back
    dit.TimestepEmbedder.frequencies = staticmethod(lambda: table)  # read when the forward is traced
    try:
        o, c = jit_guided(model_of(fx), cfg)(*args, cache0)
        o = np.asarray(jax.block_until_ready(o), np.float32)
    finally:
        dit.TimestepEmbedder.frequencies = shipped
    return float(np.abs(o - want).max() / max(np.abs(want).max(), 1e-30)), differ


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="small,wide,24b_wide", help="comma list of upstream_perf configs")
    ap.add_argument("--calls", default="cfg1,cfg3", help="comma list of cfg1 (distilled), cfg3 (base)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (match the cores XLA uses)")
    default_perf = os.environ.get("MAGI_UPSTREAM_PERF", str(ROOT.parent / "shared" / "upstream_perf"))
    ap.add_argument("--upstream-perf", default=default_perf, help="folder of upstream_forward.py and its harness")
    a = ap.parse_args()
    if a.runs < 1 or a.warmup < 0:
        ap.error("--runs must be >= 1 and --warmup >= 0")
    if not os.path.exists(os.path.join(a.upstream_perf, "upstream_forward.py")):
        ap.error(f"--upstream-perf {a.upstream_perf}: no upstream_forward.py there")
    try:
        import torch  # noqa: F401
    except ImportError:
        ap.error("torch is missing: run this with the upstream_perf venv's python (~/uperf-venv/bin/python)")
    _paths(os.path.abspath(a.upstream_perf))
    import upstream_forward as uf

    configs, calls = [c for c in a.configs.split(",") if c], [c for c in a.calls.split(",") if c]
    bad = [c for c in configs if c not in uf.CONFIGS] + [c for c in calls if c not in uf.CALLS]
    if bad:
        ap.error(f"unknown config/call {bad}; configs: {sorted(uf.CONFIGS)}, calls: {sorted(uf.CALLS)}")

    import jax

    rows = [one(uf, cfg, call, a.dtype, a.runs, a.warmup, a.threads) for cfg in configs for call in calls]
    print(
        f"\ndevice: {jax.devices()[0].platform} ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores), {time.strftime('%Y-%m-%d %H:%M %Z')}, {a.dtype}, {a.runs} runs"
    )
    print(
        "| shape | call | upstream | magi-jax | speedup | per-round range | parity max|d|/max|ref| "
        "| parity, this torch's exp table | matmul GF/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['config']} | {r['call']} | {r['upstream_median_s']:.3f} s | {r['magi_jax_median_s']:.3f} s | "
            f"{r['speedup']:.2f} | {r['speedup_min']:.2f}-{r['speedup_max']:.2f} | {r['parity_rel']:.1e} | "
            f"{r['parity_rel_torch_exp']:.1e} | {r['matmul_gflops']:.0f} |"
        )
    differ = rows[0]["exp_table_ulps_differ"] if rows else []
    print(
        f"frequency table entries where this torch's exp and the shipped (MKL-rounded) table differ by an ulp: "
        f"{differ or 'none'}; the last parity column runs magi-jax with this torch's table"
    )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
