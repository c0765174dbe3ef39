"""Device meshes and where every array lives on them: one table, from a laptop to a pod.

Mesh axes:
  data   independent videos (replicas): parameters and one video's state are replicated
  model  tensor parallelism: attention heads and MLP width of every weight
  seq    context parallelism: the tokens of a window and the rows of the KV cache

Parameters carry logical axis names (`out_sharding` metadata on every nnx.Param), and so do
the KV cache (`KVCache.AXES`) and the DiT's token activations (`constrain`). `RULES` maps
each logical name to a mesh axis, or to None (replicated). A dimension the mesh axis does
not divide is replicated instead - 8 key/value heads on a 16-way model axis, a tiny test
model's odd sizes - so any mesh runs any config. Within one spec a mesh axis is used once.

Parameters are placed as they are created or restored: `shardings(abstract_module, mesh)`
gives the target layout from shapes alone, and checkpoint.restore reads straight into it.
The axes are `Auto`: XLA's partitioner inserts the collectives, so the sharded program is
the single-device one, numerically equal up to reduction order.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "model", "seq")

RULES: dict[str, str | None] = {
    # DiT
    "layers": None,
    "embed": None,
    "cond": None,
    "patch": None,
    "caption": None,
    "caption_len": None,
    "head_dim": None,
    "q_heads": "model",
    "kv_heads": "model",
    "mlp": "model",
    # activations and the KV cache
    "batch": "data",  # training clips (data parallelism)
    "tokens": "seq",
    "kv_seq": "seq",
    # T5
    "t5_vocab": None,
    "t5_embed": None,
    "t5_heads": "model",
    "t5_mlp": "model",
    # VAE (small next to the DiT; its tiles run one at a time)
    "vae_embed": None,
    "vae_qkv": None,
    "vae_heads": None,
    "vae_mlp": None,
    "vae_patch": None,
    "vae_latent": None,
}


class MeshError(ValueError):
    """A mesh description that does not fit the devices."""


def parse_mesh(text: str | None, devices: int | None = None) -> dict[str, int]:
    """'model=2,seq=4' (missing axes are 1) or 'MxS' (model x seq) -> {axis: size}.

    With no text, all devices go to the sequence axis (context parallelism needs no
    divisibility of weights and scales with video length). 'auto' is resolved by the caller,
    which knows the run (memory_plan.choose_mesh)."""
    devices = devices or jax.device_count()
    sizes = dict.fromkeys(MESH_AXES, 1)
    if not text:
        sizes["seq"] = devices
        return sizes
    try:
        if "=" in text:
            for part in text.split(","):
                name, value = part.split("=")
                if name.strip() not in sizes:
                    raise MeshError(f"unknown mesh axis {name.strip()!r}; axes are {', '.join(MESH_AXES)}")
                sizes[name.strip()] = int(value)
        else:
            model, seq = (int(v) for v in text.lower().split("x"))
            sizes.update(model=model, seq=seq)
    except ValueError as e:
        if isinstance(e, MeshError):
            raise
        raise MeshError(f"mesh {text!r}: write 'model=2,seq=4' or '2x4' (model x seq)") from None
    if int(np.prod(list(sizes.values()))) != devices:
        raise MeshError(f"mesh {text!r} needs {int(np.prod(list(sizes.values())))} devices, {devices} are present")
    return sizes


def mesh_candidates(devices: int, divides: tuple[int, ...] = ()) -> list[dict[str, int]]:
    """Every model x seq mesh over `devices`, fewest devices on `model` first (the all-`seq`
    default leads); `model` sizes that do not divide each of `divides` (head counts) are left
    out, since the rules table would replicate those weights rather than split them."""
    out = []
    for m in range(1, devices + 1):
        if devices % m == 0 and all(n % m == 0 for n in divides):
            out.append({**dict.fromkeys(MESH_AXES, 1), "model": m, "seq": devices // m})
    return out


def describe_mesh(sizes: dict[str, int]) -> str:
    """{axis: size} as --mesh takes it ('model=2,seq=4'; 'one device' when nothing splits)."""
    return ",".join(f"{a}={n}" for a, n in sizes.items() if n > 1) or "one device"


def make_mesh(sizes: dict[str, int], devices=None) -> jax.sharding.Mesh:
    """The mesh of `sizes` ({axis: size}, from parse_mesh) over `devices` (default: all)."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = tuple(sizes.get(a, 1) for a in MESH_AXES)
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def spec(logical: tuple, shape: tuple, mesh, rules=RULES) -> P:
    """The PartitionSpec for an array with these logical axis names and shape on `mesh`."""
    out, used = [], set()
    for name, size in zip(logical, shape):
        if name is not None and name not in rules:
            raise KeyError(f"logical axis {name!r} has no entry in sharding.RULES")
        axis = rules.get(name) if name is not None else None
        n = mesh.shape[axis] if axis is not None else 1
        if axis is None or n == 1 or axis in used or size % n:
            out.append(None)
        else:
            out.append(axis)
            used.add(axis)
    return P(*out)


def shardings(module_or_state, mesh, rules=RULES) -> dict[tuple, NamedSharding]:
    """{param path: NamedSharding} from each parameter's logical names (shapes only needed)."""
    state = module_or_state if isinstance(module_or_state, nnx.State) else nnx.state(module_or_state)
    out = {}
    for path, var in nnx.to_flat_state(state):
        value = var.get_value()
        names = var.get_metadata().get("out_sharding") or (None,) * len(value.shape)
        out[path] = NamedSharding(mesh, spec(tuple(names), value.shape, mesh, rules))
    return out


def place(module, mesh, rules=RULES):
    """Moves a built module's parameters into their shardings (in place); returns the module."""
    state = nnx.state(module)
    target = shardings(state, mesh, rules)
    flat = [(p, v.replace(value=jax.device_put(v.get_value(), target[p]))) for p, v in nnx.to_flat_state(state)]
    nnx.update(module, nnx.from_flat_state(flat))
    return module


def array_sharding(logical: tuple, shape: tuple, mesh, rules=RULES) -> NamedSharding:
    return NamedSharding(mesh, spec(logical, shape, mesh, rules))


def constrain(x, logical: tuple, rules=RULES):
    """Hints the layout of an activation inside jit when a mesh is active; no-op otherwise.
    A dimension the mesh axis does not divide is replicated: the DiT pads a chunk's tokens to
    a multiple of their split (`split_count`) so that they always divide."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, spec(logical, x.shape, mesh, rules))


def split_count(name: str, rules=RULES, mesh=None) -> int:
    """How many devices `mesh` (default: the active one) splits logical axis `name` over (1
    without a mesh)."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    axis = rules[name]
    return 1 if mesh.empty or axis is None else mesh.shape.get(axis, 1)


# ----------------------------------------------------------------------------- multi-host

DISTRIBUTED_ENV = "MAGI_DISTRIBUTED"
PROCESS_ENV = ("MAGI_NUM_PROCESSES", "MAGI_PROCESS_ID")  # where JAX cannot find them itself (CPU, GPU)


def maybe_initialize_distributed() -> bool:
    """Joins the other hosts of a pod (`jax.distributed.initialize`) when launched as one.

    On by `MAGI_DISTRIBUTED=1` (launch_tpu.sh sets it), or on a multi-host TPU slice
    (TPU_WORKER_HOSTNAMES lists more than one host). A TPU slice tells JAX where the other
    hosts are; elsewhere, give JAX_COORDINATOR_ADDRESS (host:port of process 0) and
    MAGI_NUM_PROCESSES / MAGI_PROCESS_ID. Returns whether it initialised.
    """
    hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    wanted = os.environ.get(DISTRIBUTED_ENV, "").lower() in {"1", "true", "yes"} or len(hosts) > 1
    if not wanted or jax.distributed.is_initialized():
        return False
    given = {}
    for name, key in zip(PROCESS_ENV, ("num_processes", "process_id")):
        text = os.environ.get(name)
        if text is not None:
            if not text.strip().isdigit():
                raise MeshError(f"{name}={text!r} is not a whole number")
            given[key] = int(text)
    try:
        jax.distributed.initialize(**given)
    except ValueError as e:  # nothing told JAX who the processes are
        raise MeshError(
            f"{DISTRIBUTED_ENV}=1 but this machine does not say where the other processes are ({e}); set "
            f"JAX_COORDINATOR_ADDRESS=host:port of process 0, {PROCESS_ENV[0]} and {PROCESS_ENV[1]} in every process"
        ) from None
    return True


def agreed(flag: bool) -> bool:
    """Process 0's `flag`, on every process: for choices that change which programs run."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(bool(flag))))


def is_writer() -> bool:
    """Only process 0 writes outputs; the others compute their shards and wait."""
    return jax.process_index() == 0
