"""Block-causal self-attention and per-chunk cross-attention.

MAGI-1's attention is organised by chunks. Self-attention: the queries of chunk c see the
keys whose global token position lies in `kv_range[c] = [start, end)` - earlier (cached)
chunks and the chunks of this call, never later ones, no causal mask inside. Keys are laid
out once per layer as one buffer indexed by global position (`key_buffer`: the cache window,
then this call's keys), so each chunk's visible keys are one contiguous run of rows: a
chunk reads a static-size slice (`span`, the widest range the schedule gives a chunk) at its
range's start, plus a length mask. Nothing is sorted, gathered or repeated per query head.
Cross-attention: each chunk sees only its own caption's leading unmasked tokens, and the
caller trims the padding every caption shares before projecting it (`used_caption_tokens`).

Numerics follow flash-attention, which upstream uses: float32 scores scaled by
1/sqrt(head_dim), float32 softmax statistics, and for 16-bit inputs the probabilities are
rounded to the input dtype before P @ V and normalised by the float32 row sum. A chunk
with no visible key gets zeros. GQA: query head h reads key/value head h // (H / G); the
kernels see the H / G query heads of a group as extra query rows of that group (so K/V are
never repeated).

Implementations (`implementation()` picks one per backend; MAGI_ATTENTION overrides it):
  xla     flash-style loops in XLA: per query chunk, key blocks from the range's start to its
          end only (a dynamic trip count, so masked keys cost nothing); the parity reference
          (CPU default; also every float32 run, which cuDNN does not take)
  cudnn   NVIDIA GPUs: cuDNN flash attention through jax.nn.dot_product_attention
  pallas  TPUs: our Pallas kernel (pallas_attention.py), which reads the cache window and this
          call's keys where they lie (`KeyParts`: no joined buffer is built) and walks only
          the key blocks of each chunk's range (Pallas's interpreter off TPU)
  dpa     jax.nn.dot_product_attention's portable XLA path with the layout cuDNN gets
cudnn and dpa take a key length, so they get, per chunk, the `span` rows starting at the
range's start (the buffer is padded by `span` rows so that slice always exists).

Shapes: queries come by chunk, (R, N, H, D): R chunks of N tokens (N may be padded past a
chunk's real tokens on a mesh, see dit.py), H query heads; G key/value heads, D head dim,
K key rows, L caption tokens.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from magi_jax.layers import precision
from magi_jax.sharding import constrain

IMPLEMENTATIONS = ("xla", "cudnn", "pallas", "dpa")
_BY_BACKEND = {"gpu": "cudnn", "cuda": "cudnn", "tpu": "pallas"}


def implementation(dtype=None) -> str:
    """The attention implementation for the default backend (and inputs of `dtype`)."""
    name = os.environ.get("MAGI_ATTENTION") or _BY_BACKEND.get(jax.default_backend(), "xla")
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"MAGI_ATTENTION={name!r}; use one of {', '.join(IMPLEMENTATIONS)}")
    if name in ("cudnn", "pallas") and dtype is not None and jnp.dtype(dtype) == jnp.float32:
        return "xla"  # the fused kernels take 16-bit inputs; float32 runs (parity) use the reference
    return name


@contextlib.contextmanager
def using(name: str | None):
    """Within the block, trace attention with implementation `name` (None: unchanged)."""
    old = os.environ.get("MAGI_ATTENTION")
    if name is not None:
        os.environ["MAGI_ATTENTION"] = name
        implementation()  # refuse an unknown name here
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MAGI_ATTENTION", None)
        else:
            os.environ["MAGI_ATTENTION"] = old


def available_implementations() -> list[str]:
    """Implementations compiled for this backend: the portable ones and its kernel (elsewhere
    the Pallas kernel runs only in Pallas's interpreter, which tests use)."""
    out = ["xla", "dpa"]
    backend = jax.default_backend()
    if backend in ("gpu", "cuda"):
        out.append("cudnn")
    if backend == "tpu":
        out.append("pallas")
    return out


# The xla path works on (Q_BLOCK query tokens x their H/G heads) x K_BLOCK key tiles with an
# online softmax, so memory holds one score tile per group whatever the chunk size. Key
# blocks are whole chunks when chunks are smaller than K_BLOCK (ranges end on chunk bounds, so
# nothing past a range is scored); larger chunks waste under K_BLOCK keys at a range's end.
Q_BLOCK = 512
K_BLOCK = 512
CAPTION_MULTIPLE = 16  # trimmed caption lengths are rounded up to this (fewer recompiles)
KEY_AXES = (None, "kv_heads", "head_dim")  # a key buffer on a mesh: all rows on every device


def used_caption_tokens(caption_mask, multiple: int = CAPTION_MULTIPLE) -> int:
    """Leading caption tokens any row uses (host-side, static): the last unmasked token + 1,
    rounded up to `multiple` (at most L). Padding past it is never read by cross-attention,
    so the caption projection is computed only over these tokens."""
    mask = np.asarray(caption_mask).astype(bool)
    length = mask.shape[-1]
    used = mask.reshape(-1, length).any(axis=0)
    last = int(np.nonzero(used)[0][-1]) + 1 if used.any() else 1
    return min(length, -(-last // multiple) * multiple)


def self_key_block(chunk_tokens: int, rows: int) -> int:
    """Key rows per block of the xla path's self-attention over a buffer of `rows` rows.
    Ranges are whole chunks, so blocks of whole chunks (when a chunk fits K_BLOCK) end exactly
    where a range does and none is partial."""
    return min(chunk_tokens * (K_BLOCK // chunk_tokens) if chunk_tokens <= K_BLOCK else K_BLOCK, rows)


class KeyBuffer(NamedTuple):
    """One layer's keys and values by global position: row i holds position `base + i`."""

    k: jax.Array  # (K, G, D)
    v: jax.Array  # (K, G, D)
    base: jax.Array  # () int32


def key_buffer(k_new, v_new, new_start, window=None) -> KeyBuffer:
    """The key buffer of one layer: the cache window, then this call's keys.

    k_new, v_new (S, G, D) this call's keys at positions new_start..; window: (k, v, start)
    cache rows start.. below new_start (rows at or past new_start zero, as read_window
    gives them). K = W + S rows."""
    if window is None:
        return KeyBuffer(k_new, v_new, jnp.asarray(new_start, jnp.int32))
    kw, vw, start = window
    at = jnp.asarray(new_start - start, jnp.int32)
    return KeyBuffer(_joined(kw, k_new, at), _joined(vw, v_new, at), jnp.asarray(start, jnp.int32))


def _joined(w, new, at, axis: int = 0):
    """Window rows w, then as many zero rows as `new` has, with `new` written from row `at`
    (along `axis`)."""
    buf = jnp.concatenate([w.astype(new.dtype), jnp.zeros_like(new)], axis=axis)
    return jax.lax.dynamic_update_slice_in_dim(buf, new, at, axis=axis)


class KeyParts(NamedTuple):
    """One layer's keys where they lie: `window` (k, v, start), the cache rows from `start`
    on (rows at or past `new_start` zero, as read_window gives them), or None; and this
    call's keys k, v (S, G, D) at positions new_start... `key_buffer` joins them; the Pallas
    kernel reads the two in place (the joined buffer, per guidance row, and its heads-first
    copy were a TPU step's largest temporaries: the window once more per row)."""

    k: jax.Array
    v: jax.Array
    new_start: jax.Array
    window: tuple | None

    def joined(self) -> KeyBuffer:
        return key_buffer(self.k, self.v, self.new_start, self.window)


@dataclass(frozen=True)
class _Tiles:
    """Static tiling of the xla path: query tiles of `q_block` tokens, key blocks of `k_block`
    rows, at most `blocks` key blocks per range (its span / k_block).
    split_edge: the blocks wholly inside a range skip the mask, and the range's one partial
    block runs after the loop (long ranges of many blocks: self-attention); otherwise every
    block is masked (short ranges of a block or two: captions - a differentiated loop then
    keeps one block's residuals per iteration, not two)."""

    q_block: int
    k_block: int
    blocks: int
    split_edge: bool = False


def _finite(m):
    return jnp.where(jnp.isfinite(m), m, 0.0)


def _flash(qt, kt, vt, lo, hi, tiles: _Tiles):
    """One query tile against keys [lo, hi) of its buffer, key blocks only over that range.

    qt (G, M, D); kt, vt (G, K, D); lo, hi () int32 with hi - lo <= tiles.blocks * k_block
    -> (G, M, D) float32 (zeros when lo >= hi). The loop has a static trip count (so it can
    be differentiated); blocks past the range are skipped by a conditional, not computed."""
    g, m, d = qt.shape
    kk = kt.shape[1]
    kb = min(tiles.k_block, kk)
    scale = jnp.float32(1.0 / math.sqrt(d))

    def compute(j, carry, masked: bool):
        mx, total, acc = carry
        first = lo + j * kb
        at = jnp.clip(first, 0, kk - kb)  # the last block may start early: its repeats are masked
        kk_ = jax.lax.dynamic_slice_in_dim(kt, at, kb, axis=1)
        vv = jax.lax.dynamic_slice_in_dim(vt, at, kb, axis=1)
        # unscaled scores: the scale (> 0) moves into the exp's fusion, so no pass over the
        # tile only multiplies; the running max is of unscaled scores
        s = jnp.einsum("gmd,gkd->gmk", qt, kk_, preferred_element_type=jnp.float32, precision=precision(qt.dtype))
        if masked:
            pos = at + jnp.arange(kb, dtype=jnp.int32)
            visible = (pos >= first) & (pos < hi)
            vv = jnp.where(visible[None, :, None], vv, jnp.zeros_like(vv))  # masked rows: 0 * NaN would be NaN
            s = jnp.where(visible[None, None, :], s, -jnp.inf)
        m_new = jnp.maximum(mx, jnp.max(s, axis=-1, keepdims=True))
        safe = _finite(m_new)
        p = jnp.exp((s - safe) * scale)
        rescale = jnp.exp((mx - safe) * scale)
        total = total * rescale + jnp.sum(p, axis=-1, keepdims=True)
        pv = jnp.einsum(
            "gmk,gkd->gmd", p.astype(vt.dtype), vv, preferred_element_type=jnp.float32, precision=precision(vt.dtype)
        )
        return m_new, total, acc * rescale + pv

    stats = jnp.full((g, m, 1), -jnp.inf, jnp.float32)
    init = (stats, jnp.zeros_like(stats), jnp.zeros((g, m, d), jnp.float32))
    span = jnp.maximum(hi - lo, 0)
    if tiles.split_edge:
        # masking passes over the score tile cost as much as the exp: the blocks wholly
        # inside the range (none reaches the buffer's end, so none is clipped back) go
        # unmasked, the partial block at the range's end (if any) is masked after the loop
        whole = span // kb

        def block(j, carry):
            return jax.lax.cond(j < whole, lambda c: compute(j, c, False), lambda c: c, carry)

        carry = jax.lax.fori_loop(0, tiles.blocks, block, init)
        _, total, acc = jax.lax.cond(span % kb > 0, lambda c: compute(whole, c, True), lambda c: c, carry)
    else:
        needed = (span + kb - 1) // kb

        def block(j, carry):
            return jax.lax.cond(j < needed, lambda c: compute(j, c, True), lambda c: c, carry)

        _, total, acc = jax.lax.fori_loop(0, tiles.blocks, block, init)
    return acc / jnp.where(total == 0, 1.0, total)


def _grouped(qc, groups: int, q_block: int):
    """qc (R, N, H, D) -> (R, T, G, rep * qb, D): T query tiles of qb tokens per chunk, the H/G
    heads of a group stacked as rows. Laid out once per layer."""
    r, n, h, d = qc.shape
    qb = min(q_block, n)
    t = -(-n // qb)
    if t * qb != n:
        qc = jnp.pad(qc, ((0, 0), (0, t * qb - n), (0, 0), (0, 0)))
    rep = h // groups
    q = qc.reshape(r, t, qb, groups, rep, d).transpose(0, 1, 3, 4, 2, 5)
    return q.reshape(r, t, groups, rep * qb, d), (n, qb, t, rep)


def _ungrouped(out, dims):
    """(R, T, G, rep * qb, D) -> (R, N, H, D), the inverse of `_grouped`."""
    n, qb, t, rep = dims
    r, _, g, _, d = out.shape
    out = out.reshape(r, t, g, rep, qb, d).transpose(0, 1, 4, 2, 3, 5).reshape(r, t * qb, g * rep, d)
    return out[:, :n]


def _xla(qc, k, v, lo, hi, tiles: _Tiles):
    """qc (R, N, H, D); k, v (K, G, D) shared by the chunks, or (R, K, G, D) one per chunk;
    lo, hi (R,) each chunk's visible rows. -> (R, N, H, D)."""
    g = k.shape[-2]
    qt, dims = _grouped(qc, g, tiles.q_block)
    chunks, t = qt.shape[:2]
    kt = jnp.swapaxes(k, -3, -2)  # (..., G, K, D): once per layer
    vt = jnp.swapaxes(v, -3, -2)
    per_chunk = k.ndim == 4

    def tile(a):
        i, qi = a
        c = i // t
        kc, vc = kt, vt
        if per_chunk:
            kc = jax.lax.dynamic_index_in_dim(kt, c, keepdims=False)
            vc = jax.lax.dynamic_index_in_dim(vt, c, keepdims=False)
        return _flash(qi, kc, vc, lo[c], hi[c], tiles)

    flat = qt.reshape(chunks * t, *qt.shape[2:])
    out = jax.lax.map(tile, (jnp.arange(chunks * t), flat))
    return _ungrouped(out.reshape(qt.shape), dims).astype(qc.dtype)


def _fused(qc, kc, vc, lengths, kind: str):
    """qc (R, N, H, D); kc, vc (R, K, G, D) each chunk's keys first; lengths (R,). -> (R, N, H, D)."""
    out = jax.nn.dot_product_attention(
        qc,
        kc,
        vc,
        key_value_seq_lengths=lengths.astype(jnp.int32),
        implementation="cudnn" if kind == "cudnn" else "xla",
    )
    return jnp.where(lengths[:, None, None, None] > 0, out, 0).astype(qc.dtype)  # no key: zeros


def _on_shards(kernel, qc, kvs, *scalars):
    """Runs a Pallas kernel, `kernel(qc, *kvs, *scalars)`, on each device's shard under a mesh
    (XLA cannot partition a Mosaic custom call itself): query and key/value heads over `model`
    where it divides both, query tokens over `seq` (padded to a multiple of it); each device
    reads its heads' whole key rows. qc (R, N, H, D); kvs: keys and values, each (G, K, D) or
    (R, G, K, D); scalars: per chunk, replicated. Without a mesh: the kernel as is."""
    mesh = jax.sharding.get_abstract_mesh()
    # 16-bit inputs multiply exactly in any precision; Mosaic refuses a float32 precision on
    # them, which a process-wide setting (JAX_DEFAULT_MATMUL_PRECISION=highest) would ask for
    with jax.default_matmul_precision("default"):
        if mesh.empty:
            return kernel(qc, *kvs, *scalars)
        from jax.sharding import PartitionSpec as P

        def axis(name, size):
            n = mesh.shape.get(name, 1)
            return name if n > 1 and size % n == 0 else None

        r, n, h, _ = qc.shape
        # a chunk's query tokens padded to a multiple of `seq`, so that they split rather than
        # run whole on every device (a 4.5B chunk at 720x720 is 12,150 tokens); the padded
        # queries' outputs are dropped, and no key is added
        seq = mesh.shape.get("seq", 1)
        padded = qc if n % seq == 0 else jnp.pad(qc, ((0, 0), (0, -n % seq), (0, 0), (0, 0)))
        heads = axis("model", kvs[0].shape[-3]) if axis("model", h) else None  # both head counts, or neither
        q_spec = P(None, axis("seq", padded.shape[1]), heads, None)
        kv_specs = [P(*[None] * (a.ndim - 3), heads, None, None) for a in kvs]
        specs = (q_spec, *kv_specs, *[P()] * len(scalars))
        out = jax.shard_map(kernel, mesh=mesh, in_specs=specs, out_specs=q_spec, check_vma=False)(
            padded, *kvs, *scalars
        )
        return out[:, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _pallas(qc, kt, vt, lo, hi, span: int):
    """Our block-sparse kernel (pallas_attention.py): qc (R, N, H, D); kt, vt (G, K, D) the
    key buffer, or (R, G, K, D) a buffer per chunk; each chunk reads its rows [lo, hi)."""
    from magi_jax.pallas_attention import ranged_attention

    return _on_shards(functools.partial(ranged_attention, span=span), qc, (kt, vt), lo, hi)


def _pallas_fwd(qc, kt, vt, lo, hi, span):
    return _pallas(qc, kt, vt, lo, hi, span), (qc, kt, vt, lo, hi)


def _pallas_bwd(span, saved, grad):
    # training differentiates Pallas's own flash-attention kernel, which has fused backward
    # kernels and keeps O(tokens) residuals: it recomputes the forward over each chunk's
    # `span` rows (a slice from its start, the rest masked by segment ids)
    qc, kt, vt, lo, hi = saved
    _, pullback = jax.vjp(lambda q, k, v: _flash_by_slices(q, k, v, lo, hi, span), qc, kt, vt)
    return (*pullback(grad), None, None)


_pallas.defvjp(_pallas_fwd, _pallas_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _pallas_parts(qc, kwt, vwt, knt, vnt, lo, hi, offset, span: int):
    """_pallas over the joined buffer [window; this call's keys] without building it: the
    window (G, W, D) and this call's keys (G, S, D) read in place, the call's keys from row
    `offset` of the joined buffer; lo, hi (R,) rows of the joined buffer, as for _pallas."""
    from magi_jax.pallas_attention import ranged_attention_over

    w, s = kwt.shape[1], knt.shape[1]
    # the window's rows below the call's (and inside the window: XLA clamps a start past it)
    lo_w, hi_w = lo, jnp.maximum(jnp.minimum(jnp.minimum(hi, offset), w), lo)
    lo_n = jnp.clip(lo - offset, 0, s)
    hi_n = jnp.clip(hi - offset, lo_n, s)
    spans = (min(span, w), min(span, s))

    def kernel(q, kw, vw, kn, vn, lo2, hi2):
        return ranged_attention_over(q, ((kw, vw), (kn, vn)), lo2, hi2, spans, span)

    return _on_shards(kernel, qc, (kwt, vwt, knt, vnt), jnp.stack([lo_w, lo_n]), jnp.stack([hi_w, hi_n]))


def _pallas_parts_fwd(qc, kwt, vwt, knt, vnt, lo, hi, offset, span):
    return _pallas_parts(qc, kwt, vwt, knt, vnt, lo, hi, offset, span), (qc, kwt, vwt, knt, vnt, lo, hi, offset)


def _pallas_parts_bwd(span, saved, grad):
    # training runs without a cache window; a backward through one is the joined buffer's,
    # built here for it
    qc, kwt, vwt, knt, vnt, lo, hi, offset = saved

    def joined(q, kw, vw, kn, vn):  # heads first: rows on axis 1
        return _pallas(q, _joined(kw, kn, offset, axis=1), _joined(vw, vn, offset, axis=1), lo, hi, span)

    _, pullback = jax.vjp(joined, qc, kwt, vwt, knt, vnt)
    return (*pullback(grad), None, None, None)


_pallas_parts.defvjp(_pallas_parts_fwd, _pallas_parts_bwd)


def _flash_by_slices(qc, kt, vt, lo, hi, span: int):
    """The same attention through Pallas's flash-attention kernel (differentiable): a per-chunk
    buffer is read whole with a length mask; the shared buffer one chunk at a time, its `span`
    rows (rounded up to the kernel's 128) from the range's start."""
    if kt.ndim == 4:  # lo is 0
        pad = ((0, 0), (0, 0), (0, -kt.shape[2] % 128), (0, 0))
        return _on_shards(_flash_tpu, qc, (jnp.pad(kt, pad), jnp.pad(vt, pad)), hi)
    return _by_chunk_slices(_flash_on_shards, qc, kt, vt, lo, hi, -(-span // 128) * 128, axis=1)


def _flash_on_shards(qc, kt, vt, lengths):
    return _on_shards(_flash_tpu, qc, (kt, vt), lengths)


def _by_chunk_slices(attend, qc, k, v, lo, hi, width: int, axis: int):
    """`attend(q, k, v, lengths)` one chunk at a time (no stacked copies) over its `width`
    key rows from its range's start: the rows of k, v along `axis`, padded by `width` so that
    every slice exists. qc (R, N, H, D); lo, hi (R,). -> (R, N, H, D)."""
    pad = [(0, 0)] * k.ndim
    pad[axis] = (0, width)
    k, v = jnp.pad(k, pad), jnp.pad(v, pad)

    def one(a):
        q1, start, length = a
        kc = jax.lax.dynamic_slice_in_dim(k, start, width, axis)[None]
        vc = jax.lax.dynamic_slice_in_dim(v, start, width, axis)[None]
        return attend(q1[None], kc, vc, length[None])[0]

    return jax.lax.map(one, (qc, lo, hi - lo))


def _flash_tpu(qc, kt, vt, lengths):
    """Pallas's TPU flash-attention kernel, which wants as many kv heads as query heads: each
    group's H/G query heads become extra query rows instead (K/V are not repeated)."""
    from jax.experimental.pallas.ops.tpu.flash_attention import SegmentIds, flash_attention

    r, n, h, d = qc.shape
    g, kk = kt.shape[1], kt.shape[2]
    rep = h // g
    q = qc.reshape(r, n, g, rep, d).transpose(0, 2, 3, 1, 4).reshape(r, g, rep * n, d)
    q = jnp.pad(q, ((0, 0), (0, 0), (0, -q.shape[2] % 128), (0, 0)))
    kv_ids = (jnp.arange(kk)[None, :] < lengths[:, None]).astype(jnp.int32)
    ids = SegmentIds(q=jnp.ones((r, q.shape[2]), jnp.int32), kv=kv_ids)
    out = flash_attention(q, kt, vt, segment_ids=ids, sm_scale=1.0 / math.sqrt(d))
    out = out[:, :, : rep * n].reshape(r, g, rep, n, d).transpose(0, 3, 1, 2, 4).reshape(r, n, h, d)
    return jnp.where(lengths[:, None, None, None] > 0, out, 0).astype(qc.dtype)  # no key: zeros


def _ranges(kv_range, base, rows: int, span: int):
    """Each chunk's visible rows [lo, hi) of a buffer starting at `base` (at most `span`)."""
    lo = jnp.clip(kv_range[:, 0] - base, 0, rows)
    hi = jnp.clip(kv_range[:, 1] - base, lo, rows)
    return lo, jnp.minimum(hi, lo + span)


def chunk_self_attention(
    qc, keys: KeyBuffer | KeyParts, kv_range, chunk_tokens: int, span: int | None = None, impl=None
):
    """qc (R, Nq, H, D) each chunk's queries; keys: the layer's `key_buffer` (K rows by global
    position, N = `chunk_tokens` a chunk), or its KeyParts (joined here, except by the Pallas
    kernel, which reads them in place); kv_range (R, 2) global [start, end) per query chunk;
    span: static bound on a chunk's visible keys (None: K); a wider range is cut to its first
    `span` keys. Nq may exceed N (a chunk's queries padded for a mesh, the DiT drops their
    outputs). Returns (R, Nq, H, D)."""
    impl = impl or implementation(qc.dtype)
    if isinstance(keys, KeyParts):
        if impl == "pallas" and keys.window is not None:
            return _self_parts(qc, keys, kv_range, span)
        keys = keys.joined()
    k, v, base = keys
    # on a mesh every device attends its own query tokens over all their visible keys: the key
    # rows are gathered (heads stay split over `model`), so no softmax sum crosses devices -
    # nothing to combine afterwards, and a run's numbers do not depend on how its devices
    # are spread over hosts
    k, v = constrain(k, KEY_AXES), constrain(v, KEY_AXES)
    rows = k.shape[0]
    span = rows if span is None else min(span, rows)
    lo, hi = _ranges(kv_range.astype(jnp.int32), base, rows, span)
    if impl == "xla":
        kb = self_key_block(chunk_tokens, rows)
        return _xla(qc, k, v, lo, hi, _Tiles(Q_BLOCK, kb, -(-span // kb), split_edge=True))
    if impl == "pallas":  # the buffer read in place, each chunk's range only (block-sparse)
        kt, vt = jnp.swapaxes(k, 0, 1), jnp.swapaxes(v, 0, 1)  # (G, K, D), laid out once per layer

        def chunk(a):  # one chunk at a time: its queries regrouped (and split over seq) alone
            q1, lo1, hi1 = a
            return _pallas(q1[None], kt, vt, lo1[None], hi1[None], span)[0]

        return jax.lax.map(chunk, (qc, lo, hi))
    # cudnn and dpa take a key length: each chunk its `span` rows from its range's start
    fused = functools.partial(_fused, kind=impl)
    return _by_chunk_slices(fused, qc, k, v, lo, hi, span, axis=0)


def _self_parts(qc, keys: KeyParts, kv_range, span: int | None):
    """The Pallas path over the cache window and this call's keys, each read in place: the
    same rows and ranges as over their joined buffer (cache rows from the window's start, the
    call's keys from new_start)."""
    kw, vw, start = keys.window
    k, v = constrain(keys.k, KEY_AXES), constrain(keys.v, KEY_AXES)
    rows = kw.shape[0] + k.shape[0]
    span = rows if span is None else min(span, rows)
    start = jnp.asarray(start, jnp.int32)
    lo, hi = _ranges(kv_range.astype(jnp.int32), start, rows, span)
    offset = jnp.asarray(keys.new_start, jnp.int32) - start
    # heads first, once per layer: the window's copy is shared by the guidance rows
    kwt, vwt = (jnp.swapaxes(constrain(a.astype(k.dtype), KEY_AXES), 0, 1) for a in (kw, vw))
    knt, vnt = jnp.swapaxes(k, 0, 1), jnp.swapaxes(v, 0, 1)

    def chunk(a):  # one chunk at a time: its queries regrouped (and split over seq) alone
        q1, lo1, hi1 = a
        return _pallas_parts(q1[None], kwt, vwt, knt, vnt, lo1[None], hi1[None], offset, span)[0]

    return jax.lax.map(chunk, (qc, lo, hi))


def chunk_cross_attention(qc, k, v, caption_mask, block: int | None = None, impl: str | None = None):
    """qc (R, N, H, D) each chunk's queries; k, v (R, L, G, D) each chunk's caption;
    caption_mask (R, L) a prefix of valid tokens per chunk (tokens, then padding); block: the
    xla path's key block (None: all L at once). -> (R, N, H, D)."""
    lengths = caption_mask.astype(bool).sum(axis=1).astype(jnp.int32)
    impl = impl or implementation(qc.dtype)
    if impl == "xla":
        # with a fixed key block, blocks past a chunk's own tokens skipped, a chunk's result
        # does not depend on the padding of the call's longest caption (ForwardCall.Window)
        kb = min(block or K_BLOCK, k.shape[1])
        return _xla(qc, k, v, jnp.zeros_like(lengths), lengths, _Tiles(Q_BLOCK, kb, -(-k.shape[1] // kb)))
    if impl == "pallas":  # (R, G, L, D): each chunk's caption, its first `lengths` tokens
        kt, vt = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
        return _pallas(qc, kt, vt, jnp.zeros_like(lengths), lengths, k.shape[1])
    return _fused(qc, k, v, lengths, impl)
