"""Compiling for TPU slices without a TPU: does a released config fit, on which mesh?

    pip install "jax[tpu]"      # libtpu: the TPU compiler (same version as jax); no chip needed
    python -m magi_jax.aot --config 4.5B_distill --topology v5e-8 --mesh model=2,seq=4

For each (config, topology, mesh) this compiles, on the abstract devices of that slice
(`jax.experimental.topologies`), every program a generation runs at the config's released size:
each distinct sampler window program, the encoding of an I2V prefix, the VAE decode of one
chunk and the T5 encode. Nothing is allocated: arguments are shapes with their shardings. Per
program it prints what XLA's `memory_analysis()` says one device holds (arguments, outputs,
temporaries; donated buffers counted once), the memory plan's estimate, the chip's HBM and
whether it fits, and `cost_analysis()`'s FLOPs; `--json FILE` writes one record per program.

The programs are traced exactly as a run on that slice traces them: attention uses the
implementation of the target (`pallas` on TPU, unless --attention says otherwise), captions
take the longest bucket (caption_max_length tokens), the VAE and T5 run where generate runs
them (the VAE on one device; the T5 sharded like the DiT's weights over `model`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

GiB = 1 << 30

# Named slices: (topology for jax.experimental.topologies, HBM bytes per chip). v5p counts
# TensorCores in its name (v5p-8 is 4 chips); v5e and v6e count chips.
TOPOLOGIES: dict[str, tuple[str, int]] = {
    "v5e-8": ("v5e:2x4", 16 * GiB),
    "v6e-8": ("v6e:2x4", 32 * GiB),
    "v5p-8": ("v5p:2x2x1", 95 * GiB),
    "v5p-64": ("v5p:4x4x2", 95 * GiB),  # 32 chips on 8 hosts
}

# A program fits when XLA's per-device bytes are within this share of the chip's HBM (the
# runtime keeps some for itself; memory_plan.check_fits uses the same margin).
HEADROOM = 0.9
HBM_BY_KIND = {"TPU v4": 32 * GiB, "TPU v5 lite": 16 * GiB, "TPU v5": 95 * GiB, "TPU v6 lite": 32 * GiB}

# The released sizes the issue names: 4.5B at 720x720, 24B at 720x1280, 96 frames.
RELEASED_SIZE = {"4.5B": (720, 720), "24B": (720, 1280)}
RELEASED_FRAMES = 96
PROGRAMS = ("window", "prefix", "vae_decode", "t5_encode")
# `largest_window`: only the window program with the most chunks (the step that decides
# whether a run fits): a quick check of a big config
CHOICES = (*PROGRAMS, "largest_window")


class AotError(ValueError):
    """A topology, config or mesh this command cannot compile for."""


class NoMeshFits(AotError):
    """--mesh auto: no mesh of the slice holds the config (the others are still compiled)."""


@dataclass(frozen=True)
class Record:
    config: str
    topology: str
    mesh: str
    program: str
    device_bytes: int  # per device: arguments + outputs + temporaries - donated (aliased)
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    plan_bytes: int | None  # the memory plan's estimate for this program (None: not planned)
    hbm_bytes: int
    fits: bool
    flops: float
    seconds: float  # trace + compile

    def line(self) -> str:
        plan = "-" if self.plan_bytes is None else f"{self.plan_bytes / GiB:6.2f}"
        return (
            f"{self.program:<34} {self.device_bytes / GiB:7.2f} GiB (args {self.argument_bytes / GiB:6.2f}, "
            f"out {self.output_bytes / GiB:5.2f}, temp {self.temp_bytes / GiB:6.2f})  plan {plan}  "
            f"HBM {self.hbm_bytes / GiB:5.1f}  {'fits' if self.fits else 'DOES NOT FIT'}  "
            f"{self.flops / 1e12:9.2f} TFLOP  {self.seconds:5.1f} s"
            + ("  (refused by the compiler)" if math.isnan(self.seconds) else "")
        )


def topology(name: str):
    """(devices, HBM per chip) of a named slice (TOPOLOGIES), a raw topology like 'v5e:2x4'
    (HBM then from the chip kind), or 'host': this process's own devices (what a run here
    would use; the CPU's memory as its capacity)."""
    if name == "host":
        import jax

        from magi_jax.memory_plan import device_capacity

        devices = jax.devices()
        return devices, device_capacity(devices[0]) or 0
    try:
        from jax.experimental import topologies
    except ImportError as e:  # pragma: no cover - jax always has it
        raise AotError(f"this jax has no jax.experimental.topologies ({e})") from None
    topo, hbm = TOPOLOGIES.get(name, (name, None))
    # compiling only (no chip is opened): several processes may load the TPU compiler at once
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topo)
    except Exception as e:
        raise AotError(
            f"cannot describe TPU topology {topo!r} ({type(e).__name__}: {e}); install the TPU compiler with "
            f'pip install "jax[tpu]" (the same version as jax), and name a slice ({", ".join(TOPOLOGIES)}) '
            "or a topology such as v5e:2x4"
        ) from None
    devices = list(desc.devices)
    if hbm is None:
        kind = devices[0].device_kind
        if kind not in HBM_BY_KIND:
            raise AotError(f"no HBM size known for {kind!r}; name a slice ({', '.join(TOPOLOGIES)})")
        hbm = HBM_BY_KIND[kind]
    return devices, hbm


def slice_mesh(slice_name: str, mesh_text: str | None = None, found=None):
    """(mesh over the slice's devices, HBM per chip); mesh_text as --mesh (default: all on seq);
    found: what topology(slice_name) already returned."""
    from magi_jax import sharding

    devices, hbm = found or topology(slice_name)
    try:
        sizes = sharding.parse_mesh(mesh_text, len(devices))
    except sharding.MeshError as e:
        raise AotError(f"{slice_name} has {len(devices)} devices: {e}") from None
    return sharding.make_mesh(sizes, devices), hbm


def released_config(name: str, size: tuple[int, int] | None = None, frames: int | None = None):
    """A config at the size a real run uses (RELEASED_SIZE, RELEASED_FRAMES unless given)."""
    from magi_jax.config import load_config

    cfg = load_config(name)
    family = next((k for k in RELEASED_SIZE if name.startswith(k)), None)
    h, w = size or RELEASED_SIZE.get(family, (cfg.runtime.video_size_h, cfg.runtime.video_size_w))
    return cfg.replace(
        runtime=dict(
            num_frames=frames or (RELEASED_FRAMES if family else cfg.runtime.num_frames),
            video_size_h=h,
            video_size_w=w,
        )
    )


# ----------------------------------------------------------------------------- abstract inputs


def _sds(shape, dtype, where=None):
    import jax

    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=where)


def _placed(module, mesh):
    """An abstract module's parameters as shapes placed by sharding.RULES on `mesh`."""
    from flax import nnx

    from magi_jax import sharding

    state = nnx.state(module)
    target = sharding.shardings(state, mesh)
    flat = [
        (p, v.replace(value=_sds(v.get_value().shape, v.get_value().dtype, target[p])))
        for p, v in nnx.to_flat_state(state)
    ]
    return nnx.from_flat_state(flat)


def _on(tree, where):
    """Host-side inputs (numpy step records, captions, latents; arrays or shapes) as shapes at `where`."""
    import jax

    return jax.tree.map(lambda a: _sds(np.shape(a), a.dtype, where), tree)


@dataclass
class Program:
    name: str
    jitted: object  # a jax.jit-ed function
    args: tuple
    on_mesh: bool = True  # traced under the mesh (the DiT's programs); False: one device
    window: object = None  # a DiT program's ForwardCall Window (what the memory plan is asked about)
    prefix_frames: int = 0  # clean latent frames of the run it belongs to (the prefix encoding's)
    plan: object = None  # the memory plan of a VAE or T5 program (a MemoryPlan)

    @property
    def chunks(self) -> int:
        """Chunks a DiT program runs (the near-clean copy and clean chunk included); 0 otherwise."""
        w = self.window
        return 0 if w is None else w.chunks + int(w.near_clean_copy) + int(w.extra_clean_chunk)


def window_label(win) -> str:
    """A window program's name: its chunks, and the near-clean copy and re-encoded clean chunk it adds."""
    name = f"window {win.chunks} chunk{'s' * (win.chunks > 1)}"
    return name + " +near-clean" * bool(win.near_clean_copy) + " +clean" * bool(win.extra_clean_chunk)


def sampler_programs(config, mesh, impl: str, prefix_frames: int | None = None) -> list[Program]:
    """Every distinct window program of a T2V run and the prefix encoding of a V2V run
    (`prefix_frames` clean latent frames, default one chunk's; 0: none), with the DiT's parameters and the KV cache
    sharded by sharding.RULES and the step's other inputs replicated, as Sampler places them."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from magi_jax import sharding
    from magi_jax.dit_weights import abstract_dit
    from magi_jax.forward_call import Captions
    from magi_jax.kv_cache import KVCache
    from magi_jax.sampler import Program as Static
    from magi_jax.sampler import SamplerState, StageInputs, advance, encode_prefix
    from magi_jax.sampler_plan import cache_shape, latent_slots, layout, plan, prefix_call

    m = config.model
    abstract = abstract_dit(config)
    graphdef, _ = nnx.split(abstract)
    params, static = _placed(abstract, mesh), Static(graphdef, config)
    rep = NamedSharding(mesh, P())
    f32 = jnp.float32
    length, cc = m.caption_max_length, m.caption_channels  # the longest caption bucket

    def captions(rows, chunks):
        return Captions(_sds((rows, chunks, length, cc), f32, rep), _sds((rows, chunks, length), f32, rep))

    if prefix_frames is None:
        prefix_frames = config.runtime.chunk_width
    out = []
    for pf in dict.fromkeys((0, prefix_frames)):
        lay = layout(config, pf)
        shape = cache_shape(config, lay, split=sharding.split_count("kv_seq", mesh=mesh))
        where = sharding.array_sharding(KVCache.AXES, shape, mesh)
        c, _, h, w = lay.latent_shape
        slots = (c, latent_slots(config, lay) * lay.chunk_width, h, w)
        state = SamplerState(_sds(slots, f32, rep), KVCache(_sds(shape, m.dtype, where), _sds(shape, m.dtype, where)))
        if pf and not lay.clean_chunks:
            continue  # an I2V frame is not encoded on its own: it rides in the first window
        if pf:  # the clean prefix chunks' keys and values into the cache (latents in the VAE's bfloat16)
            k = lay.clean_chunks
            x = _sds((c, k * lay.chunk_width, h, w), jnp.bfloat16, rep)
            call = _on(prefix_call(config, lay), rep)
            # a fresh function each time: jit's trace cache is per function, and the attention
            # implementation is read at trace time
            jitted = jax.jit(lambda *a: encode_prefix(*a), static_argnums=0, donate_argnums=2)
            out.append(
                Program(
                    f"prefix (V2V) {k} chunk{'s' * (k > 1)}",
                    jitted,
                    (static, params, state, x, captions(2, k), call),
                    window=call.window,
                    prefix_frames=pf,
                )
            )
            continue
        seen = set()
        for stage in plan(config, lay):
            run = StageInputs(
                captions(2, stage.denoising), captions(1, 1), _sds(slots, f32, rep), _sds((), jnp.int32, rep)
            )
            for group in stage.groups:
                group = _on(group, rep)
                signature = repr(jax.tree.flatten((run, group)))
                if signature in seen:
                    continue
                seen.add(signature)
                jitted = jax.jit(lambda *a: advance(*a), static_argnums=0, donate_argnums=2)  # fresh, as above
                args = (static, params, state, run, group)
                out.append(Program(window_label(group.window), jitted, args, window=group.window))
    return out


def vae_program(config, device) -> Program:
    """The VAE decode of one chunk's latents, on one device (generate's VAE runs on one)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    from magi_jax.memory_plan import plan_vae_decode
    from magi_jax.sampler_plan import layout
    from magi_jax.vae import RELEASED, WORLD, VaeModel
    from magi_jax.vae_runtime import Vae
    from magi_jax.vae_tiling import TileConfig
    from magi_jax.weights import abstract_model

    cfg = WORLD if config.model.latent_channels == WORLD.z_chans else RELEASED  # the tiny variant's VAE, or the release
    vae = Vae(abstract_model(lambda: VaeModel(cfg)), tiles=TileConfig.for_fps(config.runtime.fps))
    where = SingleDeviceSharding(device)
    state = jax.tree.map(lambda a: _sds(a.shape, a.dtype, where), vae.state)
    c, _, h, w = layout(config).latent_shape
    latents = _sds((c, config.runtime.chunk_width, h, w), jnp.float32, where)
    plan = plan_vae_decode(cfg, latents.shape, vae.tiles)
    return Program(
        "vae_decode chunk", vae._jit["decode_chunk"].jitted, (state, latents, vae.tiles, True), on_mesh=False, plan=plan
    )


def t5_program(config, mesh, prompts: int = 2) -> Program:
    """The T5 encode of `prompts` prompts at caption_max_length tokens, float32, its weights
    split over all the mesh's devices as generate places them when `t5_device` is not `cpu`
    (with `cpu` it runs on the host, not the slice)."""
    import jax
    import jax.numpy as jnp

    from magi_jax import t5
    from magi_jax.memory_plan import plan_t5_encode
    from magi_jax.weights import abstract_model

    cfg = t5.XXL if config.model.caption_channels == t5.XXL.d_model else t5.TINY
    cfg = dataclasses.replace(cfg, d_model=config.model.caption_channels)
    abstract = abstract_model(lambda: t5.T5Encoder(cfg, jnp.float32))
    encoder = t5.TextEncoder(abstract, tokenizer=None, placement=mesh)
    everywhere = jax.sharding.NamedSharding(t5.encoder_mesh(mesh), jax.sharding.PartitionSpec())
    ids = _sds((prompts, config.model.caption_max_length), jnp.int32, everywhere)
    name = f"t5_encode {prompts} prompts over {mesh.devices.size} devices"
    state = _placed(abstract, t5.encoder_mesh(mesh))
    plan = plan_t5_encode(cfg, prompts, config.model.caption_max_length, mesh.devices.size)
    return Program(name, encoder._encode.jitted, (state, ids, ids), on_mesh=False, plan=plan)


# ----------------------------------------------------------------------------- compiling


def compile_program(p: Program, mesh, impl: str):
    """Traces and compiles `p` for the mesh's devices; (compiled, seconds)."""
    import jax

    from magi_jax import attention, compile_cache

    t0 = time.perf_counter()
    where = jax.set_mesh(mesh) if p.on_mesh else contextlib.nullcontext()
    with attention.using(impl), where:
        compiled = p.jitted.lower(*p.args).compile(compiler_options=compile_cache.program_options(p.args))
    return compiled, time.perf_counter() - t0


def device_bytes(compiled) -> tuple[int, int, int, int]:
    """(total, arguments, outputs, temporaries) one device holds; donated buffers count once."""
    ma = compiled.memory_analysis()
    a, o, t = ma.argument_size_in_bytes, ma.output_size_in_bytes, ma.temp_size_in_bytes
    return a + o + t - ma.alias_size_in_bytes, a, o, t


def compile_largest_step(config, impl: str | None = None):
    """(program, compiled) of the sampler's largest step on this process's first device, from
    abstract shapes (nothing is allocated), with attention implementation `impl` (default:
    this backend's)."""
    import jax

    from magi_jax import attention, sharding

    impl = impl or attention.implementation(config.model.dtype)
    mesh = sharding.make_mesh({}, jax.local_devices()[:1])
    largest = max(sampler_programs(config, mesh, impl, prefix_frames=0), key=lambda p: p.chunks)
    return largest, compile_program(largest, mesh, impl)[0]


def compiled_step_memory(config, impl: str | None = None) -> int:
    """XLA's own account of the sampler's largest step (compile_largest_step): bytes of its
    arguments (parameters, KV cache, inputs), temporaries and outputs. The reference
    memory_plan.plan_memory is checked against."""
    return device_bytes(compile_largest_step(config, impl)[1])[0]


def _refused_bytes(error) -> tuple[int, bool] | None:
    """(bytes, whether they are the temporaries alone) a program needs when the compiler
    refused it for running out of HBM; None for other errors."""
    import re

    text = str(error)
    if "RESOURCE_EXHAUSTED" not in text:
        return None
    # "... HLO temporaries (26.92G) exceeds ...", or "Total hbm usage >= 16.04G:"
    temporaries = re.search(r"temporaries \(([0-9.]+)([KMGT])\) exceeds", text)
    found = temporaries or re.search(r"hbm usage >= ([0-9.]+)([KMGT])", text)
    if not found:
        return None
    return int(float(found.group(1)) * 1024 ** "KMGT".index(found.group(2)) * 1024), temporaries is not None


def argument_bytes(args) -> int:
    """Bytes of a program's arguments (placed shapes) on its most loaded device, from their
    shardings alone: what a refused program's temporaries come on top of."""
    import jax

    total = 0
    for leaf in jax.tree.leaves(args):
        if not isinstance(leaf, jax.ShapeDtypeStruct):
            continue
        shape = leaf.shape if leaf.sharding is None else leaf.sharding.shard_shape(leaf.shape)
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


def flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def check(
    config_name,
    slice_name: str,
    mesh_text: str | None = None,
    *,
    programs=PROGRAMS,
    impl: str | None = None,
    size: tuple[int, int] | None = None,
    frames: int | None = None,
    out=None,
    label: str | None = None,
) -> list[Record]:
    """Compiles `programs` of a config (a variant name at its released size, or a MagiConfig
    named `label`) for a slice and mesh; prints (to `out`, default stdout) and returns one record each."""
    out = out or sys.stdout

    unknown = set(programs) - set(CHOICES)
    if unknown:
        raise AotError(f"unknown program(s) {', '.join(sorted(unknown))}; choose from {', '.join(CHOICES)}")
    from magi_jax import sharding
    from magi_jax.memory_plan import MemoryPlanError, choose_mesh, plan_memory

    if isinstance(config_name, str):
        config = released_config(config_name, size, frames)
    else:  # a MagiConfig, used as it is
        config, config_name = config_name, label or "config"
    devices, hbm = topology(slice_name)
    impl = impl or ("pallas" if devices[0].platform == "tpu" else None)
    if impl is None:
        from magi_jax import attention

        impl = attention.implementation(config.model.dtype)
    if mesh_text == "auto":  # as generate --mesh auto chooses it, for this slice's chips
        try:
            sizes, _ = choose_mesh(config, len(devices), 0, hbm, HEADROOM, impl, devices[0].platform)
        except MemoryPlanError as e:
            raise NoMeshFits(f"{config_name} on {slice_name}: {e}") from None
        mesh_text = sharding.describe_mesh(sizes) if len(devices) > 1 else None
    mesh, _ = slice_mesh(slice_name, mesh_text, (devices, hbm))
    mesh_label = sharding.describe_mesh(dict(mesh.shape))
    rt = config.runtime
    print(
        f"# {config_name} {rt.video_size_h}x{rt.video_size_w}, {rt.num_frames} frames on {slice_name} "
        f"({len(devices)} x {devices[0].device_kind}, {hbm / GiB:.0f} GiB HBM each), mesh {mesh_label}, "
        f"attention {impl}",
        file=out,
        flush=True,
    )
    todo: list[Program] = []
    if {"window", "largest_window", "prefix"} & set(programs):
        made = sampler_programs(config, mesh, impl, prefix_frames=None if "prefix" in programs else 0)
        windows = [p for p in made if p.name.startswith("window")]
        if "largest_window" in programs and "window" not in programs:
            windows = [max(windows, key=lambda p: p.chunks)]
        todo += [p for p in made if p.name.startswith("prefix") and "prefix" in programs]
        todo += windows if {"window", "largest_window"} & set(programs) else []
    if "vae_decode" in programs:
        todo.append(vae_program(config, devices[0]))
    if "t5_encode" in programs:
        todo.append(t5_program(config, mesh))
    records = []
    for p in todo:
        planned = None
        if p.window is not None:  # the plan of the run's steps of this window
            planned = plan_memory(config, dict(mesh.shape), p.prefix_frames, impl, p.window, devices[0].platform).total
        elif p.plan is not None:
            planned = p.plan.total
        try:
            compiled, seconds = compile_program(p, mesh, impl)
        except Exception as e:  # the TPU compiler refuses a program that cannot fit the chip
            refused = _refused_bytes(e)
            if refused is None:
                raise
            needed, alone = refused
            compiled, seconds, work = None, float("nan"), float("nan")
            # the named temporaries come on top of the arguments; the step's outputs are its
            # donated state and take the arguments' memory
            a, t = (argument_bytes(p.args), needed) if alone else (0, 0)
            total, o = needed + a, 0
        else:
            total, a, o, t = device_bytes(compiled)
            work = flops(compiled)
        fits = compiled is not None and total <= HEADROOM * hbm
        records.append(
            Record(config_name, slice_name, mesh_label, p.name, total, a, o, t, planned, hbm, fits, work, seconds)
        )
        print(records[-1].line(), file=out, flush=True)
        del compiled
    return records


def main(argv=None) -> int:
    from magi_jax.config import VARIANTS, ConfigError, parse_size

    ap = argparse.ArgumentParser(
        prog="python -m magi_jax.aot",
        description="Compile a config's programs for a TPU slice without a TPU and report per-device memory.",
    )
    ap.add_argument(
        "--config", action="append", help=f"a variant ({', '.join(VARIANTS)}) or 'released' (all but tiny); repeatable"
    )
    ap.add_argument(
        "--topology",
        action="append",
        help=f"a slice ({', '.join(TOPOLOGIES)}), a topology like v5e:2x4, or host (this machine); repeatable",
    )
    ap.add_argument(
        "--mesh",
        help="mesh axes, e.g. model=2,seq=4, or auto: per config and slice, the mesh with the fewest devices on "
        "model whose memory plan fits the chip (default: every device on seq)",
    )
    ap.add_argument(
        "--programs",
        default=",".join(PROGRAMS),
        help=f"comma-separated subset of {','.join(CHOICES)} (default: all but largest_window)",
    )
    ap.add_argument("--attention", help="attention implementation to trace (default: pallas, as on a TPU)")
    ap.add_argument("--size", help="HxW in pixels (default: the released size, 4.5B 720x720, 24B 720x1280)")
    ap.add_argument("--num_frames", type=int, help=f"frames (default {RELEASED_FRAMES})")
    ap.add_argument("--json", help="write one record per (config, topology, program) to this file")
    args = ap.parse_args(argv)

    configs = [
        c
        for name in (args.config or ["4.5B_distill"])
        for c in ([v for v in VARIANTS if v != "tiny"] if name == "released" else [name])
    ]
    for c in configs:
        if c not in VARIANTS:
            ap.error(f"--config {c!r}: not a variant; use one of {', '.join(VARIANTS)} or 'released'")
    size = None
    if args.size:
        try:
            size = parse_size(args.size)
        except ConfigError as e:
            ap.error(str(e))
    programs = tuple(p.strip() for p in args.programs.split(",") if p.strip())
    records, unfit = [], 0
    try:
        for slice_name in args.topology or ["v5e-8"]:
            for c in configs:
                try:
                    records += check(
                        c,
                        slice_name,
                        args.mesh,
                        programs=programs,
                        impl=args.attention,
                        size=size,
                        frames=args.num_frames,
                    )
                except NoMeshFits as e:  # said, and the other configs and slices still answered
                    print(f"error: {e}", file=sys.stderr)
                    unfit += 1
    except AotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        from pathlib import Path

        path = Path(args.json)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps([dataclasses.asdict(r) for r in records], indent=1))
        tmp.replace(path)
    return 2 if unfit else 0


if __name__ == "__main__":
    sys.exit(main())
