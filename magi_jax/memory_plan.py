"""How much device memory a generation needs, per device, before anything is allocated.

Three parts dominate: the DiT's parameters, the KV cache (every layer's keys and values for
the ring of tokens the schedule can still read, sampler_plan.cache_rows: the same for any video
length) and the working set of the largest window the sampler runs
(the batched caption / null-caption pass: residual stream, q/k/v with the cache window,
one attention score tile, one chunk's MLP hidden layer, and the per-chunk captions). Sharding
divides each part by the mesh axes its dimensions are split over, following
sharding.RULES, so the plan for a mesh is the plan of one device of it.

`check_fits` compares the plan with the device's memory and refuses with the numbers when
it does not fit, so a run that cannot work stops before loading 24B parameters; `choose_mesh`
(`--mesh auto`) picks the mesh whose plan fits.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from magi_jax import attention, sharding
from magi_jax.attention import K_BLOCK, Q_BLOCK, self_key_block
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
            f"= {gib(self.total)} per device (mesh {sharding.describe_mesh(self.mesh)})"
        )


def _shard_factor(logical, shape, mesh) -> int:
    spec = sharding.spec(tuple(logical), tuple(shape), mesh)
    return int(np.prod([mesh.shape[a] for a in spec if a is not None], dtype=np.int64))


def _abstract_mesh(mesh_sizes: dict | None):
    """({axis: size} for every mesh axis, the AbstractMesh of those sizes)."""
    sizes = dict.fromkeys(sharding.MESH_AXES, 1) | (mesh_sizes or {})
    return sizes, jax.sharding.AbstractMesh(tuple(sizes[a] for a in sharding.MESH_AXES), sharding.MESH_AXES)


def _shares(module, mesh):
    """(logical axes, value, devices it is split over) of each of an abstract module's variables."""
    for _, var in nnx.to_flat_state(nnx.state(module)):
        v, logical = var.get_value(), var.get_metadata()["out_sharding"]
        yield logical, v, _shard_factor(logical, v.shape, mesh)


def _bytes(shape, dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * jnp.dtype(dtype).itemsize


@dataclass(frozen=True)
class _AttentionShape:
    """One layer's attention as the plan sees it (per device)."""

    rows: int  # guidance rows of the pass
    heads: int  # query heads
    n: int  # tokens per chunk
    keys: int  # rows of the key buffer (cache window + the pass's tokens)
    window: int  # of which the cache window's
    span: int  # rows a chunk's slice reads (Window.kv_span)
    length: int  # caption tokens
    kv_row: int  # bytes of one key row (G x D in the params dtype)
    kv_heads_dim: int  # G x D per device (kv_row / kv_heads_dim: bytes per element)
    tokens: int  # query tokens of one chunk on this device (padded to split over seq)
    head_dim: int


def _attention_bytes(impl: str, a: _AttentionShape) -> tuple[int, int, int]:
    """(keys, self-attention scores, cross-attention scores) of one layer, in bytes.

    keys: what the implementation reads keys and values from, beyond the cache window and
    the call's own keys. All but pallas join them in one buffer per guidance row
    (attention.key_buffer), then xla reads a (G, K, D) copy of it; cudnn and dpa a copy padded
    by `span` rows. pallas reads the window and the call's keys where they lie
    (attention.KeyParts), from (G, ., D) copies: the window's shared by the rows.
    Scores: xla, per row one float32 tile, Q_BLOCK queries x one key block (the probabilities
    are computed into it); dpa, a chunk's whole scores (the portable path does not tile);
    cudnn, only the softmax statistics reach memory; pallas, scores and statistics stay on
    chip, and the query rows regrouped by key head, and the output, are copies."""
    q = min(a.n, Q_BLOCK)
    joined = a.rows * 2 * a.keys * a.kv_row
    if impl == "xla":
        kb = self_key_block(a.n, a.keys)
        score = a.rows * a.heads * q * 4 * 2
        return 2 * joined, score * kb, score * min(K_BLOCK, a.length)
    if impl == "pallas":
        item = a.kv_row // a.kv_heads_dim
        regrouped = 2 * a.rows * a.tokens * a.heads * a.head_dim * item  # one chunk at a time
        heads_first = 2 * a.window * a.kv_row + a.rows * 2 * (a.keys - a.window) * a.kv_row
        return heads_first, regrouped, regrouped
    padded = joined + a.rows * 2 * (a.keys + a.span) * a.kv_row
    if impl == "dpa":
        item = a.kv_row // a.kv_heads_dim  # bytes of an input element
        # float32 scores and probabilities; 16-bit inputs add the scores and probabilities in
        # their dtype and the boolean mask
        per = a.rows * a.heads * a.n * (4 * 2 + (2 * item + 1 if item < 4 else 0))
        return padded, per * a.span, per * a.length
    return padded, a.rows * a.heads * a.n * 4 * 2, a.rows * a.heads * a.n * 4 * 2


def plan_memory(
    config: MagiConfig,
    mesh_sizes: dict | None = None,
    prefix_frames: int = 0,
    impl: str | None = None,
    only_window=None,
    platform: str | None = None,
) -> MemoryPlan:
    """The per-device plan for `config`'s video on a mesh ({axis: size}, default one device),
    with the attention implementation `impl` (default: the one this backend runs): the
    largest step's, or with `only_window` (a ForwardCall Window) the steps of that window's.
    `platform` (default: this process's backend) is where it runs: XLA:CPU copies layers'
    slices of the stacked weights out of the stacks inside the layer loop, and a small window's
    temporaries are those copies rather than its activations (measured: the tiny variant's
    64x64 step holds 2.0 MB of temporaries, two layers' weights, against 1.2 MB of activations;
    at 128x128 the activations are the larger, and the copies reuse their memory), so on CPU
    the working set is at least two layers' weights. On CPU, programs over 16-bit weights
    compile so that no float32 copy of the whole stacks is made (compile_cache.program_options)."""
    from magi_jax.dit_weights import abstract_dit
    from magi_jax.sampler_plan import cache_rows, cache_shape, latent_slots, layout, plan, prefix_call

    sizes, mesh = _abstract_mesh(mesh_sizes)
    m, rt = config.model, config.runtime
    impl = impl or attention.implementation(m.dtype)

    params = stacked = 0
    for logical, v, split in _shares(abstract_dit(config), mesh):
        here = _bytes(v.shape, v.dtype) // split
        params += here
        stacked += here if logical and logical[0] == "layers" else 0
    layer_copies = 2 * stacked // m.num_layers if (platform or jax.default_backend()) == "cpu" else 0

    lay = layout(config, prefix_frames)
    ring_rows = cache_rows(config, lay)
    allocated = cache_shape(config, lay, split=sharding.split_count("kv_seq", mesh=mesh))
    cache = 2 * _bytes(allocated, m.dtype) // _shard_factor(KVCache.AXES, allocated, mesh)

    seq = sizes["seq"]
    pd = jnp.dtype(m.dtype).itemsize
    d, h, g, hd = m.hidden_size, m.num_attention_heads, m.num_query_groups, m.kv_channels
    ffn = m.ffn_hidden_size * (2 if m.gated_linear_unit else 1)
    length, cc, dx = m.caption_max_length, m.caption_channels, m.xattn_size
    rows = 2 if rt.cfg_number == 3 else 1  # the caption and null-caption passes run batched
    model_split = sizes["model"]
    c, _, hh, ww = lay.latent_shape
    slots = latent_slots(config, lay) * lay.chunk_width
    window = min(rt.window_size, lay.chunk_num)
    # latents and prefix in the slots; both caption rows of a window's chunks and the null caption
    # the re-encoded clean chunk reads
    inputs = 4 * (2 * c * slots * hh * ww) + 4 * (2 * window + 1) * length * (cc + 1)
    windows = [group.window for stage in plan(config, lay) for group in stage.groups]
    if lay.clean_chunks:  # a V2V run first encodes its clean prefix chunks in one call
        windows.append(prefix_call(config, lay).window)
    largest = 0
    for call in windows:
        if only_window is not None and call != only_window:
            continue
        r = call.chunks + int(call.near_clean_copy)
        n = lay.chunk_tokens
        per_chunk = -(-n // seq)  # a chunk's tokens on this device (padded to split, dit.token_multiple)
        s = r * per_chunk
        window = min(call.cache_window or ring_rows, ring_rows)
        keys = window + r * n
        carry = 2 * rows * s * d * pd
        kv_row = g * hd * pd // model_split
        kv = 2 * window * kv_row  # the cache window, read once for the guidance rows
        if seq > 1:  # the call's keys and values gathered from every device, padding and all
            kv += rows * 2 * r * per_chunk * seq * kv_row
        qkv = rows * s * (2 * h + 2 * g) * hd * pd // model_split
        span = min(call.kv_span or keys, keys)
        shape = _AttentionShape(
            rows, h // model_split or 1, n, keys, window, span, length, kv_row, g * hd // model_split, per_chunk, hd
        )
        key_bytes, tile, cross = _attention_bytes(impl, shape)
        kv += key_bytes
        cross += rows * r * length * 2 * kv_row  # the chunks' caption keys and values
        # the output projection and the MLP run one chunk at a time (dit._by_chunk)
        proj = rows * per_chunk * (2 * h * hd * pd // model_split + 3 * d * 4)
        mlp = rows * per_chunk * ffn * (pd + 4) // model_split
        # the window's projected captions (float32, then params_dtype), held through the layers
        captions = rows * r * length * dx * (4 + pd)
        # base models project the null caption's chunks too: their float32 tokens live only
        # while projected, before the layers, so XLA reuses that memory for the layers' own
        caption_tokens = (rows // 2) * r * length * cc * 4
        # the chunk loop's stacked output and its copy of the layer input: two more of the
        # window's residual streams while the tail runs (measured on the TPU programs)
        loop = carry if r > 1 else 0  # dit._by_chunk runs a 1-chunk window without the loop
        working = carry + kv + qkv + max(tile, cross, proj, mlp, caption_tokens) + captions + loop
        working = max(working, layer_copies)
        largest = max(largest, working)
    return MemoryPlan(params, cache, largest + inputs, sizes)


def choose_mesh(
    config: MagiConfig,
    devices: int,
    prefix_frames: int = 0,
    capacity: int | None = None,
    headroom: float = 0.9,
    impl: str | None = None,
    platform: str | None = None,
) -> tuple[dict[str, int], MemoryPlan]:
    """`--mesh auto`: of the model x seq meshes over `devices`, the one with the fewest devices
    on `model` whose plan fits headroom x capacity (default: this device's memory), and its
    plan. Sequence parallelism is preferred: it splits the activations and the KV cache and
    moves only keys and values between devices, where `model` splits the weights and moves
    every layer's activations; `model` is added only as far as memory needs. Raises
    MemoryPlanError with every mesh's plan when none fits."""
    capacity = device_capacity() if capacity is None else capacity
    m = config.model
    tried = []
    for sizes in sharding.mesh_candidates(devices, (m.num_attention_heads, m.num_query_groups)):
        plan = plan_memory(config, sizes, prefix_frames, impl, platform=platform)
        if _fits(plan, capacity, headroom):
            return sizes, plan
        tried.append(f"{sharding.describe_mesh(sizes)} {gib(plan.total)}")
    raise MemoryPlanError(
        f"no mesh of {devices} devices fits {gib(capacity)} per device (at most {headroom:.0%} of it is used): "
        f"{'; '.join(tried)}; use more devices, {_SMALLER}"
    )


def device_capacity(device=None) -> int | None:
    """Bytes the device can hold: the accelerator's limit, or the host's memory for CPU."""
    device = device or jax.local_devices()[0]  # on a pod only this host's devices answer
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
    if _fits(plan, capacity, headroom):
        return
    raise MemoryPlanError(
        f"this run needs about {plan.describe()}, but a device holds {gib(capacity)}; use more devices "
        f"(--mesh; --mesh auto picks one that fits), {_SMALLER}"
    )


_SMALLER = "a smaller --size or fewer --num_frames, or the fp8 / distilled variant"


def _fits(plan: MemoryPlan, capacity: int | None, headroom: float) -> bool:
    return capacity is None or plan.total <= headroom * capacity


# ----------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainMemoryPlan:
    """Per-device bytes of a training step (train.Trainer), parts as XLA holds them."""

    params: int  # the model's weights in params_dtype (frozen base, or the forward copy)
    trainable: int  # master copy, gradients and AdamW moments of the trainable parameters
    activations: int  # saved layer inputs + one layer's forward/backward working set + the batch
    mesh: dict

    @property
    def total(self) -> int:
        return self.params + self.trainable + self.activations

    def describe(self) -> str:
        return (
            f"parameters {gib(self.params)} + optimizer {gib(self.trainable)} + activations {gib(self.activations)} "
            f"= {gib(self.total)} per device (mesh {sharding.describe_mesh(self.mesh)})"
        )


def plan_training_memory(
    config: MagiConfig,
    chunks: int,
    mesh_sizes: dict | None = None,
    lora=None,
    clips_per_device: int = 1,
    master_dtype: str = "float32",
    remat: bool = True,
    flash_attention: bool | None = None,
) -> TrainMemoryPlan:
    """The per-device plan of one training step on clips of `chunks` chunks at the config's size.

    lora: a lora.LoRAConfig (adapters train, the base is frozen) or None (full fine-tune).
    flash_attention: the attention keeps O(tokens) residuals for its backward (cuDNN / Pallas
    kernels: GPUs and TPUs, 16-bit); otherwise (the XLA path: CPU, float32) the probabilities
    of every chunk of the layer being differentiated are kept. Default: by backend.
    """
    from magi_jax.dit_weights import abstract_dit

    sizes, mesh = _abstract_mesh(mesh_sizes)
    m, rt = config.model, config.runtime
    pd = jnp.dtype(m.dtype).itemsize
    if flash_attention is None:
        from magi_jax.attention import implementation

        flash_attention = implementation(m.dtype) in ("cudnn", "pallas")

    params, count = 0, 0
    for _, v, split in _shares(abstract_dit(config), mesh):
        params += _bytes(v.shape, v.dtype) // split
        count += int(np.prod(v.shape, dtype=np.int64)) // split
    d, h, g, hd = m.hidden_size, m.num_attention_heads, m.num_query_groups, m.kv_channels
    ffn = m.ffn_hidden_size
    tp = sizes["model"]
    if lora is not None:
        shapes = {
            "q": (d, h * hd),
            "k": (d, g * hd),
            "v": (d, g * hd),
            "proj": (2 * h * hd, d),
            "qx": (d, h * hd),
            "kv_xattn": (m.xattn_size, 2 * g * hd),
            "fc1": (d, 2 * ffn if m.gated_linear_unit else ffn),
            "fc2": (ffn, d),
        }
        count = m.num_layers * sum((shapes[t][0] + shapes[t][1]) * lora.rank for t in lora.targets)
    master = 4 if master_dtype == "float32" else pd
    # master copy, gradient (same dtype), AdamW mu and nu; a full fine-tune also casts the
    # master copy to params_dtype for the forward (that copy is `params`)
    trainable = count * (master * 2 + 4 * 2 if master == 4 else master * 4)

    c = m.latent_channels
    hh, ww = rt.latent_hw
    frames = chunks * rt.chunk_width
    n = rt.chunk_width // m.t_patch_size * (hh // m.patch_size) * (ww // m.patch_size)
    s = chunks * -(-n // sizes["seq"])  # tokens a device holds (a chunk padded to split, dit.token_multiple)
    b = clips_per_device
    length = m.caption_max_length
    batch = b * (c * frames * hh * ww * 4 * 4 + chunks * length * (m.caption_channels + 1) * 4 * 2)
    captions = b * chunks * length * m.xattn_size * (4 + pd) + b * chunks * length * 2 * g * hd * pd * 2 // tp
    # one layer, forward values kept for its backward, and their gradients alongside
    layer = (
        b
        * s
        * (
            d * (pd * 6 + 4 * 4)  # residual stream, norms, gated residual (float32 inside)
            + (2 * h + 2 * g) * hd * (pd + 4) // tp  # q, qx, k, v (+ float32 norm/rope copies)
            + 2 * h * hd * pd * 2 // tp  # attention outputs [self | cross]
            + (2 if m.gated_linear_unit else 1) * ffn * (pd + 4) * 2 // tp  # MLP hidden before/after the activation
        )
    )
    if flash_attention:
        probs = b * s * h * 4 * 2 // tp
    else:  # every chunk's probabilities over its visible keys (block-causal: chunk c sees c + 1 chunks)
        probs = b * (h // tp or 1) * n * n * (chunks * (chunks + 1) // 2) * 4 // sizes["seq"]
        # plus one key block per query tile: the range's partial block, run after the loop
        # (attention._Tiles.split_edge), keeps its residuals apart from the loop's
        qb = min(Q_BLOCK, n)
        kb = self_key_block(n, chunks * n)
        probs += b * (h // tp or 1) * -(-n // qb) * qb * kb * chunks * 4 // sizes["seq"]
    probs += b * (h // tp or 1) * s * length * 4  # cross-attention probabilities
    saved = (m.num_layers if remat else 0) * b * s * d * pd
    working = (2 if remat else m.num_layers) * (layer + probs)
    return TrainMemoryPlan(params, trainable, saved + working + batch + captions, sizes)


def compiled_train_memory(config: MagiConfig, chunks: int, lora=None, master_dtype: str = "float32") -> int:
    """XLA's own account of a training step (one clip): arguments, temporaries and outputs,
    from compiling on abstract shapes. What `plan_training_memory` is checked against."""
    from magi_jax.dit import DiT
    from magi_jax.objective import Clip
    from magi_jax.train import TrainConfig, Trainer

    m, rt = config.model, config.runtime
    tcfg = TrainConfig(batch_size=1, lora=lora, master_dtype=master_dtype)
    trainer = Trainer(DiT(m, distill=config.engine.distill, rngs=nnx.Rngs(0)), config, tcfg)
    sds = jax.ShapeDtypeStruct
    state = jax.eval_shape(trainer.init_state)
    hh, ww = rt.latent_hw
    length = m.caption_max_length
    batch = Clip(
        sds((1, m.latent_channels, chunks * rt.chunk_width, hh, ww), jnp.float32),
        sds((1, chunks, length, m.caption_channels), jnp.float32),
        sds((1, chunks, length), jnp.float32),
    )
    frozen = jax.tree.map(lambda a: sds(a.shape, a.dtype), trainer.frozen)
    ma = trainer._step.lower(state, frozen, batch).compile().memory_analysis()
    return ma.argument_size_in_bytes + ma.temp_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes


# ----------------------------------------------------------------------------- VAE and T5


def plan_vae_decode(vae_cfg, latent_shape: tuple, tiles) -> MemoryPlan:
    """Per-device bytes of decoding one chunk's latents (z, t, h, w) on one device, as
    vae_runtime.Vae.decode_chunk runs it: the decoder's weights, the latents and the uint8 frames,
    every tile's decoded pixels (float32 while they are blended; they are all held until the
    chunk is assembled) and one tile's attention scores (float32, heads x tokens^2: the
    largest part, 0.6 GB for a 256 x 256 x 12 tile) and MLP hidden layer. Checked against
    XLA's account of the TPU program (aot.vae_program) in tests/test_aot.py."""
    from magi_jax.vae import VaeModel
    from magi_jax.vae_tiling import plan as tile_plan
    from magi_jax.weights import abstract_model

    abstract = abstract_model(lambda: VaeModel(vae_cfg))
    params = sum(_bytes(v.shape, v.dtype) for v in jax.tree.leaves(nnx.state(abstract.decoder)))
    zc, t, h, w = latent_shape
    axes = tile_plan(tiles, vae_cfg.patch_length, vae_cfg.patch_size, decode=True)
    extents = [[min(ax.size, n - s) for s in ax.starts(n)] for ax, n in zip(axes, (t, h, w))]
    # every tile's output, 3 x frames x height x width (a one-latent-frame tile gives one frame)
    tile_frames = sum(1 if lt == 1 else lt * vae_cfg.patch_length for lt in extents[0])
    pixels = 3 * tile_frames * sum(extents[1]) * sum(extents[2]) * vae_cfg.patch_size**2
    tokens = max(extents[0]) * max(extents[1]) * max(extents[2]) + 1  # the class token
    tile = vae_cfg.num_heads * tokens**2 * 4 + tokens * vae_cfg.mlp_hidden * 4
    frames = (1 if t == 1 else t * vae_cfg.patch_length) * h * w * vae_cfg.patch_size**2 * 3
    return MemoryPlan(params, 0, zc * t * h * w * 4 + frames + pixels * 4 + tile, {})


def plan_t5_encode(t5_cfg, prompts: int, length: int, devices: int, dtype=jnp.float32) -> MemoryPlan:
    """Per-device bytes of encoding `prompts` prompts of `length` tokens with the weights split
    over `devices` (t5.t5_shardings: heads and MLP width over all of them): the weights'
    share, and the position bias (N, H, L, L) split over heads like the scores, with one
    layer's scores, MLP hidden layer and residual stream. Checked like plan_vae_decode."""
    from magi_jax.t5 import abstract_t5

    _, mesh = _abstract_mesh({"model": devices})
    params = sum(_bytes(v.shape, v.dtype) // split for _, v, split in _shares(abstract_t5(t5_cfg, dtype), mesh))
    item = jnp.dtype(dtype).itemsize
    heads = prompts * t5_cfg.num_heads * length * length * item // devices  # the bias, or one layer's scores
    stream = prompts * length * t5_cfg.d_model * item
    layer = heads + 3 * prompts * length * t5_cfg.d_ff * item // devices + 2 * stream
    ids = 2 * prompts * length * 4
    return MemoryPlan(params, 0, ids + stream + heads + layer, {"model": devices})
