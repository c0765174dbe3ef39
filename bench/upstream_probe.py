"""Probe fixtures from upstream's own code, for parity questions the bundled fixtures do not answer.

Runs upstream MAGI-1's DiT end to end (generate_per_chunk, every forward_dispatcher call
recorded) on the CPU through ../shared/upstream_perf's harness, with a config taken from a
bundled `dit` fixture and overridden field by field, and writes a fixture in the golden format
(calls[] and one run) that the parity tests read through MAGI_PARITY_DIR. Tolerances are the
fixtures' floors (0.02 / 0.002 x max|ref|); for upstream's own variation run it a second time
with GOLDEN_ATTN_MODE=blocked PROBE_THREADS=2 into another folder and compare the two npz files.
Needs the upstream venv (torch), never the project's:

    ~/uperf-venv/bin/python bench/upstream_probe.py OUT tests/fixtures/parity/dit_distill_24b_glu_bf16.json \
        NAME SEED x_rescale_factor=0.1 num_query_groups=2 n_tokens=37
    MAGI_PARITY_DIR=OUT MAGI_PARITY_REPORT=tmp/probe.json python -m pytest -q -n 0 \
        tests/test_dit_parity.py tests/test_sampler_parity.py::test_generate_run -k NAME

Overrides: any model/runtime/engine config field, plus the run's `n_tokens` (caption length),
`num_frames`, `num_steps`, `window_size`.
"""

import copy
import hashlib
import json
import os
import shutil
import sys
import tempfile

# the harness: $UPSTREAM_PERF, else ../shared/upstream_perf beside the checkout (or beside the main one)
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CANDIDATES = [os.path.join(_ROOT, "..", "shared", "upstream_perf"), "/work/shared/upstream_perf"]
HARNESS = os.environ.get("UPSTREAM_PERF") or next((c for c in _CANDIDATES if os.path.isdir(c)), _CANDIDATES[0])
sys.path.insert(0, HARNESS)
os.environ.setdefault("MAGI_UPSTREAM_GIT", "/work/.mirror/SandAI-org+MAGI-1/repo")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from upstream_harness import dit_harness as H  # noqa: E402
from upstream_harness import fixture_io, upstream  # noqa: E402

RUN_FIELDS = ("n_tokens", "num_frames", "num_steps", "window_size")


def split_overrides(cfg, pairs):
    run = {}
    for k, v in (p.split("=", 1) for p in pairs):
        v = json.loads(v)
        part = next((p for p in ("model_config", "runtime_config", "engine_config") if k in cfg[p]), None)
        if k in RUN_FIELDS:
            run[k] = v
            if part is not None and k != "n_tokens":
                cfg[part][k] = v
        elif part is not None:
            cfg[part][k] = v
        else:
            raise SystemExit(f"unknown override {k!r}")
    return run


def main(out_dir, base_json, name, seed, pairs):
    torch.set_num_threads(int(os.environ.get("PROBE_THREADS", "1")))
    base = json.load(open(base_json))
    cfg = copy.deepcopy(base["config"])
    run_over = split_overrides(cfg, pairs)
    work = tempfile.mkdtemp(prefix="probe_")
    tokens = os.path.join(work, "special_tokens.npz")
    H.tiny_special_tokens(cfg["model_config"]["caption_channels"], tokens)
    upstream.load(special_token_path=tokens)
    import upstream_forward

    upstream_forward.set_attention("reference")
    cfg["runtime_config"]["load"] = None
    os.makedirs(os.path.join(work, "w"))
    model, config = H.build_model(cfg, H.make_weights(cfg, os.path.join(work, "w"), seed), os.path.join(work, "b"))
    r0 = base["runs"][0]
    run = {
        "name": "run",
        "num_frames": run_over.get("num_frames", r0["num_frames"]),
        "num_steps": run_over.get("num_steps", r0["num_steps"]),
        "window_size": run_over.get("window_size", r0["window_size"]),
        "seed": seed + 7,
        "prefix_frames": 0,
        "n_tokens": run_over.get("n_tokens", r0["caption_tokens"]),
        "env": dict(r0["env"]),
        "runtime": {},
    }
    H.apply_run_runtime(model, run)
    caption, mask, prefix = H.make_run_inputs(model, run, seed + 3)
    rec = H.DispatchRecorder(model)
    res = H.run_sampler(model, run, caption, mask, prefix, rec)
    rec.detach()
    mc = model.model_config
    arrays, calls, tol = {}, [], {}

    def add(key, t, tolerance=False):
        a = fixture_io.to_numpy(t)
        arrays[key] = a.astype(np.float32) if a.dtype.kind == "f" else a
        if tolerance:
            s = float(np.abs(a).max())
            tol[key] = {"atol": 0.02 * s, "rms_atol": 0.002 * s, "scale": s, "basis": "probe: fixture floors"}

    for i, r in enumerate(rec.calls):
        before, after, lo, hi = H.kv_regions(r, model, mc.num_layers)
        p = f"calls/c{i:02d}/"
        for k in ("x", "timestep", "y", "mask", "kv_range"):
            add(p + k, r[k])
        add(p + "out", r["out"], tolerance=True)
        if lo:
            add(p + "kv_cache_before", before)
        if hi > lo:
            add(p + "kv_cache_written", after[:, lo:hi], tolerance=True)
        layers = len(r["kv_after"])
        calls.append(
            {
                "name": f"c{i:02d}",
                "kwargs": r["kwargs"],
                "env": dict(run["env"]),
                "arg_dtypes": {k: fixture_io.dtype_name(r[k]) for k in ("x", "timestep", "y", "mask", "kv_range")},
                "max_sequence_length": r["max_sequence_length"],
                "max_batch_size": r["max_batch_size"],
                "kv_read_rows": lo,
                "kv_write_end": hi,
                "num_cache_layers": layers,
                "kv_cache_groups": mc.num_query_groups if layers else None,
                "kv_cache_width": 2 * mc.kv_channels if layers else None,
                "kv_cache_dtype": "bfloat16" if layers else None,
            }
        )
    p = "runs/run/"
    add(p + "noise", res["noise"])
    add(p + "y", res["y"])
    add(p + "emb_masks_processed", res["emb_masks"])
    for i, c in enumerate(res["chunks"]):
        add(p + f"chunk_{i:02d}", c, tolerance=True)
    recorded = [
        {
            "kwargs": c["kwargs"],
            "timestep": fixture_io.to_numpy(c["timestep"])[0].tolist(),
            "kv_range": fixture_io.to_numpy(c["kv_range"]).tolist(),
            "x_shape": list(c["x"].shape),
        }
        for c in rec.calls
    ]
    runs = [
        {
            "name": "run",
            "mode": "t2v",
            "num_frames": run["num_frames"],
            "num_steps": run["num_steps"],
            "window_size": run["window_size"],
            "runtime_overrides": {},
            "env": run["env"],
            "prefix_latent_frames": 0,
            "latent_size": list(res["latent_size"]),
            "chunk_num": int(res["chunk_num"]),
            "yielded_chunk_frames": [c.shape[2] for c in res["chunks"]],
            "forward_dispatcher_calls": recorded,
        }
    ]
    doc = {"name": name, "kind": "dit", "config": H.json_config(config), "calls": calls, "runs": runs}
    doc["tolerance"] = tol
    doc["config"]["runtime_config"]["load"] = None
    os.makedirs(out_dir, exist_ok=True)
    ckpt = os.path.join(work, "b", "ckpt", H.weight_subdir(cfg), "model.safetensors")
    shutil.copy(ckpt, os.path.join(out_dir, f"{name}.safetensors"))
    np.savez(os.path.join(out_dir, f"{name}.npz"), **arrays)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(doc, f, default=str)
    manifest_path = os.path.join(out_dir, "manifest.json")
    manifest = {"fixtures": []}
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
    manifest["fixtures"] = [f for f in manifest["fixtures"] if f["name"] != name]
    files = {role: f"{name}.{role}" for role in ("json", "npz", "safetensors")}
    digest = {r: hashlib.sha256(open(os.path.join(out_dir, f), "rb").read()).hexdigest() for r, f in files.items()}
    manifest["fixtures"].append({"name": name, "kind": "dit", "files": files, "sha256": digest})
    with open(manifest_path, "w") as f:
        json.dump(manifest, f, indent=1)
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {name}: {len(calls)} calls, {len(res['chunks'])} chunks")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5:])
