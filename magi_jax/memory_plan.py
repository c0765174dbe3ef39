"""How much device memory a generation needs, per device, before anything is allocated.

Three parts dominate: the DiT's parameters, the KV cache (every layer's keys and values for
every token of the video) and the working set of the largest window the sampler runs
(the batched caption / null-caption pass: residual stream, q/k/v with the cache window,
one attention score tile, the MLP's hidden layer, and the per-chunk captions). Sharding
divides each part by the mesh axes its dimensions are split over, following
sharding.RULES, so the plan for a mesh is the plan of one device of it.

`check_fits` compares the plan with the device's memory and refuses with the numbers when
it does not fit, so a run that cannot work stops before loading 24B parameters.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from magi_jax import sharding
from magi_jax.attention import K_BLOCK, Q_BLOCK
from magi_jax.config import MagiConfig
from magi_jax.kv_cache import KVCache


class MemoryPlanError(MemoryError):
    """The plan does not fit the device; the message has the numbers and what to change."""


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


@dataclass(frozen=True)
class MemoryPlan:
    params: int  # bytes per device
    kv_cache: int
    activations: int  # the largest window's working set, inputs of the step included
    mesh: dict

    @property
    def total(self) -> int:
        return self.params + self.kv_cache + self.activations

    def describe(self) -> str:
        return (
            f"parameters {gib(self.params)} + KV cache {gib(self.kv_cache)} + activations {gib(self.activations)} "
            f"= {gib(self.total)} per device (mesh {self.mesh})"
        )


def _shard_factor(logical, shape, mesh) -> int:
    spec = sharding.spec(tuple(logical), tuple(shape), mesh)
    return int(np.prod([mesh.shape[a] for a in spec if a is not None], dtype=np.int64))


def _bytes(shape, dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * jnp.dtype(dtype).itemsize


def plan_memory(config: MagiConfig, mesh_sizes: dict | None = None, prefix_frames: int = 0) -> MemoryPlan:
    """The per-device plan for `config`'s video on a mesh ({axis: size}, default one device)."""
    from magi_jax.dit_weights import abstract_dit
    from magi_jax.sampler import layout, plan

    sizes = dict.fromkeys(sharding.MESH_AXES, 1) | (mesh_sizes or {})
    mesh = jax.sharding.AbstractMesh(tuple(sizes[a] for a in sharding.MESH_AXES), sharding.MESH_AXES)
    m, rt = config.model, config.runtime

    params = 0
    for _, var in nnx.to_flat_state(nnx.state(abstract_dit(config))):
        v = var.get_value()
        params += _bytes(v.shape, v.dtype) // _shard_factor(var.get_metadata()["out_sharding"], v.shape, mesh)

    lay = layout(config, prefix_frames)
    cache_shape = (m.num_layers, lay.chunk_num * lay.chunk_tokens, m.num_query_groups, m.kv_channels)
    cache = 2 * _bytes(cache_shape, m.dtype) // _shard_factor(KVCache.AXES, cache_shape, mesh)

    seq = sizes["seq"]
    pd = jnp.dtype(m.dtype).itemsize
    d, h, g, hd = m.hidden_size, m.num_attention_heads, m.num_query_groups, m.kv_channels
    ffn = m.ffn_hidden_size * (2 if m.gated_linear_unit else 1)
    length, cc, dx = m.caption_max_length, m.caption_channels, m.xattn_size
    rows = 2 if rt.cfg_number == 3 else 1  # the caption and null-caption passes run batched
    model_split = sizes["model"]
    c, t, hh, ww = lay.latent_shape
    inputs = 4 * (2 * c * t * hh * ww) + 4 * 2 * lay.chunk_num * length * (cc + 1)  # latents, prefix, captions
    largest = 0
    for stage in plan(config, lay):
        for group in stage.groups:
            call = group.window
            r = call.chunks + int(call.near_clean_copy)
            n = lay.chunk_tokens
            s = r * n // seq  # tokens of this device
            window = min(call.cache_window or cache_shape[1], cache_shape[1])
            keys = window + r * n
            carry = 2 * rows * s * d * pd
            kv = rows * 2 * keys * g * hd * pd // model_split + 2 * window * g * hd * pd // model_split
            qkv = rows * s * (2 * h + 2 * g) * hd * pd // model_split
            tile = rows * (h // model_split or 1) * min(n, Q_BLOCK) * min(keys, K_BLOCK) * 4 * 2
            cross = rows * r * length * 2 * g * hd * pd // model_split + rows * h * min(n, Q_BLOCK) * length * 8
            proj = rows * s * (2 * h * hd * pd // model_split + 3 * d * 4)
            mlp = rows * s * ffn * (pd + 4) // model_split
            caption_row = r * length * cc * 4  # one guidance row's captions for the window
            captions = (2 + (3 if rows == 2 else 1)) * caption_row + rows * r * length * dx * (4 + pd)
            working = carry + kv + qkv + max(tile, cross, proj, mlp) + captions
            largest = max(largest, working)
    return MemoryPlan(params, cache, largest + inputs, sizes)


def device_capacity(device=None) -> int | None:
    """Bytes the device can hold: the accelerator's limit, or the host's memory for CPU."""
    device = device or jax.devices()[0]
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    if device.platform == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            return None
    return None


def check_fits(plan: MemoryPlan, capacity: int | None = None, headroom: float = 0.9):
    """Raises MemoryPlanError (with the numbers) when the plan exceeds headroom x capacity."""
    capacity = device_capacity() if capacity is None else capacity
    if capacity is None or plan.total <= headroom * capacity:
        return
    raise MemoryPlanError(
        f"this run needs about {plan.describe()}, but a device holds {gib(capacity)}; use more devices "
        f"(--mesh), a smaller --size or fewer --num_frames, or the fp8 / distilled variant"
    )


def compiled_step_memory(config: MagiConfig, prefix_frames: int = 0) -> int:
    """XLA's own account of the sampler's largest step: bytes of its arguments (parameters,
    KV cache, inputs), temporaries and outputs, from compiling on abstract shapes (nothing
    is allocated). The reference `plan_memory` is checked against."""
    from magi_jax.dit_weights import abstract_dit
    from magi_jax.forward_call import Captions
    from magi_jax.sampler import Program, RunInputs, SamplerState, advance, layout, plan

    m = config.model
    lay = layout(config, prefix_frames)
    groups = [g for stage in plan(config, lay) for g in stage.groups]
    big = max(groups, key=lambda g: g.window.chunks + g.window.near_clean_copy)
    graphdef, params = nnx.split(abstract_dit(config))
    sds = jax.ShapeDtypeStruct
    rows = lay.chunk_num * lay.chunk_tokens
    cache = KVCache(*(sds((m.num_layers, rows, m.num_query_groups, m.kv_channels), m.dtype) for _ in range(2)))
    state = SamplerState(sds(lay.latent_shape, jnp.float32), cache)
    run = RunInputs(
        Captions(
            sds((2, lay.chunk_num, m.caption_max_length, m.caption_channels), jnp.float32),
            sds((2, lay.chunk_num, m.caption_max_length), jnp.float32),
        ),
        sds(lay.latent_shape, jnp.float32),
        sds((), jnp.int32),
    )
    group = jax.tree.map(lambda a: sds(np.shape(a), np.asarray(a).dtype), big)
    step = jax.jit(advance, static_argnums=0, donate_argnums=2)
    abstract = jax.tree.map(lambda a: sds(a.shape, a.dtype), params)
    compiled = step.lower(Program(graphdef, config), abstract, state, run, group).compile()
    ma = compiled.memory_analysis()
    return ma.argument_size_in_bytes + ma.temp_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
