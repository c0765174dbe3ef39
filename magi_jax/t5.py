"""The T5 v1.1 text encoder MAGI-1 conditions on: tokenizer, encoder, weights, prompt cache.

Data path: prompt -> caption cleaning (text_clean.py) -> SentencePiece ids, truncated to
max_length - 1, `</s>` appended, padded with 0 -> token embedding -> layers (stacked,
scanned) -> final RMS norm -> (L, D) embeddings for every position (T5 does not zero the
padded ones) and the attention mask.

A layer: h = x + o(attention(rms(x))), then h + wo(gelu_tanh(wi_0(rms(h))) * wi_1(rms(h))).
T5 specifics: RMS norm without mean or bias (eps 1e-6), no 1/sqrt(d) on the logits, a
learned relative-position bias (block 0's table, shared by every layer) added to the
logits, padded keys masked with the dtype's lowest value, queries never masked.

Precision follows Hugging Face's T5 at the weights' dtype: in bfloat16 the RMS statistics
and the softmax are float32 and everything else rounds to bfloat16 (MAGI-1 itself runs
the encoder in float32).

Shapes: N prompts, L tokens, D d_model, H heads, Dk d_kv, F d_ff.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from magi_jax import sharding
from magi_jax.compile_cache import SavedProgram
from magi_jax.layers import matmul, param, precision, scan_layers, stack_layers
from magi_jax.text_clean import clean_caption
from magi_jax.weights import abstract_model, build_model, convert_torch, expected_leaves

f32 = jnp.float32
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
SPECIAL_LITERALS = ("<pad>", "</s>", "<unk>")
SENTINELS = 100  # <extra_id_0> .. <extra_id_99>


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class T5Config:
    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    num_heads: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> T5Config:
        """From a Hugging Face T5 config.json (gated-gelu v1.1 encoders only)."""
        act = hf.get("feed_forward_proj", "gated-gelu")
        if act != "gated-gelu":
            raise ValueError(f"{source}: feed_forward_proj {act!r} is not T5 v1.1's gated-gelu")
        try:
            return cls(
                vocab_size=hf["vocab_size"],
                d_model=hf["d_model"],
                d_kv=hf["d_kv"],
                num_heads=hf["num_heads"],
                d_ff=hf["d_ff"],
                num_layers=hf["num_layers"],
                num_buckets=hf.get("relative_attention_num_buckets", 32),
                max_distance=hf.get("relative_attention_max_distance", 128),
                eps=hf.get("layer_norm_epsilon", 1e-6),
            )
        except KeyError as e:
            raise ValueError(f"{source}: missing field {e.args[0]!r}") from None


XXL = T5Config()
TINY = T5Config(vocab_size=640, d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2)


# ----------------------------------------------------------------------------- tokenizer


class Tokenizer:
    """T5's tokenizer over a `spiece.model`, as MAGI-1 calls it.

    Literal special-token strings inside a text (`<pad>`, `</s>`, `<unk>`, `<extra_id_N>`)
    become their ids, as the Hugging Face tokenizer does; the text between them is encoded
    by SentencePiece (which normalises whitespace and adds the word-start marker).
    """

    def __init__(self, spiece_model):
        import sentencepiece

        from magi_jax.storage import location

        path = location(spiece_model)  # a converted checkpoint's copy may be in a bucket
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no spiece.model (the T5 tokenizer's SentencePiece model)")
        self.sp = sentencepiece.SentencePieceProcessor(model_proto=path.read_bytes())
        n = self.sp.get_piece_size()
        self.special = {"<pad>": PAD_ID, "</s>": EOS_ID, "<unk>": UNK_ID}
        self.special.update({f"<extra_id_{i}>": n + SENTINELS - 1 - i for i in range(SENTINELS)})
        # longest literal first so that <extra_id_10> is not read as <extra_id_1>
        alternatives = sorted(self.special, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(a) for a in alternatives) + ")")

    def ids(self, text: str) -> list[int]:
        out = []
        for part in self._split.split(text):
            if part in self.special:
                out.append(self.special[part])
            elif part:
                out.extend(self.sp.encode(part))
        return out

    def __call__(self, texts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        """ids, mask (N, max_length) int32: content truncated to max_length - 1, then </s>, then 0s."""
        ids = np.zeros((len(texts), max_length), np.int32)
        mask = np.zeros((len(texts), max_length), np.int32)
        for row, text in enumerate(texts):
            tokens = self.ids(text)[: max_length - 1] + [EOS_ID]
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
        return ids, mask


# ----------------------------------------------------------------------------- encoder


def relative_position_buckets(length: int, cfg: T5Config) -> np.ndarray:
    """(2L-1,) bucket of relative position r = key - query at index r + L - 1 (bidirectional).

    Computed in float32 as Hugging Face does, since the log's rounding decides bucket edges.
    """
    half = cfg.num_buckets // 2
    exact = half // 2
    r = np.arange(-(length - 1), length)
    bucket = np.where(r > 0, half, 0)
    n = np.abs(r)
    scaled = np.log(np.maximum(n, 1).astype(np.float32) / np.float32(exact)) / np.float32(
        math.log(cfg.max_distance / exact)
    )
    large = exact + (scaled * np.float32(half - exact)).astype(np.int64)
    large = np.minimum(large, half - 1)
    return (bucket + np.where(n < exact, n, large)).astype(np.int32)


def rms_norm(x, weight, eps):
    """HF T5LayerNorm: statistics in float32; for 16-bit weights the normalised x rounds first."""
    var = jnp.mean(jnp.square(x.astype(f32)), axis=-1, keepdims=True)
    y = x.astype(f32) * jax.lax.rsqrt(var + eps)
    if weight.dtype != f32:
        return weight * y.astype(weight.dtype)
    return weight * y


def gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


def _dense(x, w):
    return matmul(x, w, x.dtype)


class T5Layer(nnx.Module):
    def __init__(self, cfg: T5Config, dtype, rngs=None):
        d, inner = cfg.d_model, cfg.num_heads * cfg.d_kv
        self.ln_attn = param(None, (d,), dtype, ("t5_embed",), init="ones")
        self.q = param(rngs, (d, inner), dtype, ("t5_embed", "t5_heads"), scale=d**-0.5)
        self.k = param(rngs, (d, inner), dtype, ("t5_embed", "t5_heads"), scale=d**-0.5)
        self.v = param(rngs, (d, inner), dtype, ("t5_embed", "t5_heads"), scale=d**-0.5)
        self.o = param(rngs, (inner, d), dtype, ("t5_heads", "t5_embed"), scale=inner**-0.5)
        self.ln_ff = param(None, (d,), dtype, ("t5_embed",), init="ones")
        self.wi_0 = param(rngs, (d, cfg.d_ff), dtype, ("t5_embed", "t5_mlp"), scale=d**-0.5)
        self.wi_1 = param(rngs, (d, cfg.d_ff), dtype, ("t5_embed", "t5_mlp"), scale=d**-0.5)
        self.wo = param(rngs, (cfg.d_ff, d), dtype, ("t5_mlp", "t5_embed"), scale=cfg.d_ff**-0.5)
        self.heads, self.d_kv, self.eps = cfg.num_heads, cfg.d_kv, cfg.eps

    def __call__(self, x, bias):
        """x (N, L, D); bias (N, H, L, L) position bias + key mask."""
        n, length, _ = x.shape
        h = rms_norm(x, self.ln_attn[...], self.eps)
        split = lambda t: t.reshape(n, length, self.heads, self.d_kv)  # noqa: E731
        q, k, v = (split(_dense(h, w[...])) for w in (self.q, self.k, self.v))
        at = precision(x.dtype)
        scores = jnp.einsum("nqhd,nkhd->nhqk", q, k, preferred_element_type=f32, precision=at).astype(x.dtype)
        scores = scores + bias.astype(x.dtype)
        probs = jax.nn.softmax(scores.astype(f32), axis=-1).astype(x.dtype)
        ctx = jnp.einsum("nhqk,nkhd->nqhd", probs, v, preferred_element_type=f32, precision=at).astype(x.dtype)
        x = x + _dense(ctx.reshape(n, length, -1), self.o[...])
        h = rms_norm(x, self.ln_ff[...], self.eps)
        gated = gelu_tanh(_dense(h, self.wi_0[...]).astype(f32)).astype(x.dtype) * _dense(h, self.wi_1[...])
        return x + _dense(gated, self.wo[...])


class T5Encoder(nnx.Module):
    def __init__(self, cfg: T5Config, dtype=jnp.float32, rngs=None):
        self.cfg = cfg
        self.embedding = param(rngs, (cfg.vocab_size, cfg.d_model), dtype, ("t5_vocab", "t5_embed"), scale=1.0)
        self.position_bias = param(rngs, (cfg.num_buckets, cfg.num_heads), dtype, (None, "t5_heads"), scale=1.0)
        self.layers = stack_layers(lambda r: T5Layer(cfg, dtype, rngs=r), cfg.num_layers, rngs)
        self.final_norm = param(None, (cfg.d_model,), dtype, ("t5_embed",), init="ones")

    def __call__(self, ids, mask, return_hidden: bool = False):
        """ids, mask (N, L) -> last hidden state (N, L, D) in the weights' dtype
        (and, with return_hidden, the residual stream entering each layer (num_layers, N, L, D))."""
        cfg = self.cfg
        dtype = self.embedding.get_value().dtype
        length = ids.shape[1]
        with jax.named_scope("t5_embed"):
            x = jnp.take(self.embedding[...], ids, axis=0)
        # (H, 2L-1): each head's bias per relative position key - query (from -(L-1) on)
        by_offset = jnp.take(self.position_bias[...], jnp.asarray(relative_position_buckets(length, cfg)), axis=0).T
        # query q reads offsets L-1-q .. 2L-2-q. Not one gather of L * L positions: XLA lays
        # that out (L * L, heads), and a TPU pads a device's few heads to 128 lanes (0.3 GiB at XXL)
        bias = jax.vmap(lambda q: jax.lax.dynamic_slice_in_dim(by_offset, length - 1 - q, length, 1), out_axes=1)(
            jnp.arange(length)
        )[None]
        lowest = jnp.finfo(dtype).min
        bias = bias + jnp.where(mask[:, None, None, :] > 0, 0.0, lowest).astype(dtype)

        x, hidden = scan_layers(self.layers, lambda layer, h, _: (layer(h, bias), h), x, name="t5_layer")
        out = rms_norm(x, self.final_norm[...], cfg.eps)
        return (out, hidden) if return_hidden else out


# ----------------------------------------------------------------------------- the text path


class TextEncoder:
    """Prompts -> (embeddings float32 (N, L, D), mask int32 (N, L)), as MAGI-1 encodes them.

    Each prompt is cleaned, tokenized to `max_length` (the DiT's caption_max_length) and
    encoded; results are cached per (prompt, max_length) so a prompt is encoded once per
    run. `close()` drops the weights (the XXL encoder is ~9.5 GB in bfloat16), e.g. before
    the DiT starts. `placement` (see `t5_shardings`): a Device holding all of it (the host
    CPU while the DiT uses the accelerator: upstream's `t5_device: cpu`), a Mesh over whose
    devices the heads and MLP are split, or None (the default device).
    """

    def __init__(self, model: T5Encoder, tokenizer: Tokenizer, placement=None):
        self.tokenizer = tokenizer
        self.placement = placement
        graphdef, state = nnx.split(model)  # its weights already placed (build_t5)
        self._graphdef, self._state = graphdef, state
        everywhere = _replicated(placement)

        def run(s, ids, m):
            with jax.named_scope("t5_encoder"):  # one block in a profile
                out = nnx.merge(graphdef, s)(ids, m)
            # on a mesh: every device (every host of a pod) gets the whole embeddings
            return out if everywhere is None else jax.lax.with_sharding_constraint(out, everywhere)

        self._encode = SavedProgram(run, "t5_encode", identity=graphdef)  # kept with the compilation cache
        self.cache: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
        self.calls = 0  # encoder invocations (cache misses)

    @property
    def config(self) -> T5Config:
        return nnx.merge(self._graphdef, self._state).cfg

    def encode(self, prompts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        missing = [p for p in dict.fromkeys(prompts) if (p, max_length) not in self.cache]
        if missing:
            if self._state is None:
                raise RuntimeError("this TextEncoder was closed; load it again to encode new prompts")
            ids, mask = self.tokenizer([clean_caption(p) for p in missing], max_length)
            if self.placement is not None:
                where = _replicated(self.placement) or self.placement
                ids, mask = jax.device_put(ids, where), jax.device_put(mask, where)
            embs = self._encode(self._state, ids, mask)
            embs = np.asarray(embs if embs.is_fully_addressable else embs.addressable_data(0)).astype(np.float32)
            self.calls += 1
            for i, p in enumerate(missing):
                self.cache[(p, max_length)] = (embs[i], np.asarray(mask[i]))
        rows = [self.cache[(p, max_length)] for p in prompts]
        return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])

    def close(self):
        """Frees the weights; cached prompt embeddings stay available."""
        self._state = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def hf_folder(path) -> Path:
    """The folder holding config.json / spiece.model: `path` or its `t5-v1_1-xxl` child
    (upstream's t5_pretrained points at the parent)."""
    from magi_jax.storage import local

    path = local(path, "T5")
    for candidate in (path, path / "t5-v1_1-xxl"):
        if (candidate / "config.json").exists():
            return candidate
    raise FileNotFoundError(f"{path}: no T5 config.json here or in {path / 't5-v1_1-xxl'} (upstream layout)")


def load_config_json(folder) -> T5Config:
    p = Path(folder) / "config.json"
    return T5Config.from_hf(json.loads(p.read_text()), str(p))


# ----------------------------------------------------------------------------- weights

TIED_KEY = "encoder.embed_tokens.weight"  # the same tensor as shared.weight; older .bin files store both


def t5_rules(cfg: T5Config) -> list:
    from magi_jax.convert import IDENTITY, LINEAR, Rule

    layers = range(cfg.num_layers)
    block = "encoder.block.{i}.layer"
    rules = [
        Rule("shared.weight", ("embedding",), IDENTITY),
        Rule("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", ("position_bias",), IDENTITY),
        Rule("encoder.final_layer_norm.weight", ("final_norm",), IDENTITY),
        Rule(f"{block}.0.layer_norm.weight", ("layers", "ln_attn"), IDENTITY, layers),
        Rule(f"{block}.1.layer_norm.weight", ("layers", "ln_ff"), IDENTITY, layers),
    ]
    for name in ("q", "k", "v", "o"):
        rules.append(Rule(f"{block}.0.SelfAttention.{name}.weight", ("layers", name), LINEAR, layers))
    for name in ("wi_0", "wi_1", "wo"):
        rules.append(Rule(f"{block}.1.DenseReluDense.{name}.weight", ("layers", name), LINEAR, layers))
    return rules


def ignored_t5_key(key: str) -> bool:
    """Keys a full T5 checkpoint holds that the encoder does not use (on purpose)."""
    return key == TIED_KEY or key.startswith("decoder.") or key.startswith("lm_head.")


def abstract_t5(cfg: T5Config, dtype=jnp.float32) -> T5Encoder:
    """The encoder's structure with shapes and dtypes only: nothing is allocated."""
    return abstract_model(lambda: T5Encoder(cfg, dtype))


def convert_t5(src, cfg: T5Config, dtype=jnp.float32, progress=None) -> dict:
    """HF T5 weights (safetensors or torch .bin, single or sharded) -> {our path: array}."""
    return convert_torch(src, t5_rules(cfg), abstract_t5(cfg, dtype), ignore=ignored_t5_key, progress=progress)


def t5_shardings(module_or_state, placement) -> dict:
    """{param path: Sharding} for the encoder's weights on `placement`: a Device (all there) or
    a Mesh, whose devices all split the heads and the MLP width (the encoder runs once per
    prompt: sharded for memory, not speed; XXL's 19 GB in float32 fit no 16 GB chip whole)."""
    state = module_or_state if isinstance(module_or_state, nnx.State) else nnx.state(module_or_state)
    if isinstance(placement, jax.sharding.Mesh):
        return sharding.shardings(state, encoder_mesh(placement))
    one = jax.sharding.SingleDeviceSharding(placement)
    return {p: one for p, _ in nnx.to_flat_state(state)}


def encoder_mesh(mesh: jax.sharding.Mesh) -> jax.sharding.Mesh:
    """The mesh's devices, all on the `model` axis."""
    return sharding.make_mesh({"model": mesh.devices.size}, list(mesh.devices.flat))


def _replicated(placement):
    """A whole copy on every device of a mesh placement; None for a device or the default."""
    if not isinstance(placement, jax.sharding.Mesh):
        return None
    return jax.sharding.NamedSharding(encoder_mesh(placement), jax.sharding.PartitionSpec())


def build_t5(cfg: T5Config, arrays: dict, dtype=jnp.float32, placement=None) -> T5Encoder:
    """The encoder with `arrays` ({path: host array}) as weights, each put straight into its
    place (`t5_shardings`); no device holds a whole copy on the way."""
    abstract = abstract_t5(cfg, dtype)
    return build_model(abstract, arrays, None if placement is None else t5_shardings(abstract, placement))


def weights_source(folder: Path) -> Path:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).exists():
            return folder
    found = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if len(found) == 1:
        return found[0]
    raise FileNotFoundError(f"{folder}: no T5 weights (model.safetensors, a sharded index or pytorch_model*.bin)")


def host_device():
    """This process's host CPU, where the T5 is read and converted (on a pod,
    jax.devices("cpu")[0] is process 0's, which no other process can address)."""
    return jax.local_devices(backend="cpu")[0]


def load_text_encoder(path, dtype=jnp.float32, placement=None) -> TextEncoder:
    """MAGI-1's text encoder from upstream's t5_pretrained folder (or the t5-v1_1-xxl folder in
    it), or from a magi-jax checkpoint of it; MAGI-1 runs the encoder in float32. The weights
    are read on the host and go straight to `placement` (see TextEncoder)."""
    from magi_jax import checkpoint
    from magi_jax.storage import location

    path = location(path)
    if checkpoint.is_checkpoint(path):
        meta = checkpoint.read_meta(path)
        cfg = T5Config(**meta["config"])
        stored = jnp.dtype(meta.get("dtype", "float32"))
        abstract = abstract_t5(cfg, stored)
        expected = expected_leaves(abstract)
        tokenizer = Tokenizer(path / "spiece.model")
        if stored == jnp.dtype(dtype):  # read straight into place
            where = None if placement is None else t5_shardings(abstract, placement)
            arrays = checkpoint.restore(path, expected, "t5", where)
            return TextEncoder(build_model(abstract, arrays), tokenizer, placement)
        host = jax.sharding.SingleDeviceSharding(host_device())  # converted here, then placed
        arrays = checkpoint.restore(path, expected, "t5", dict.fromkeys(expected, host))
        arrays = {p: np.asarray(a).astype(dtype) for p, a in arrays.items()}
    else:
        folder = hf_folder(path)
        cfg = load_config_json(folder)
        arrays = convert_t5(weights_source(folder), cfg, dtype)
        tokenizer = Tokenizer(folder / "spiece.model")
    return TextEncoder(build_t5(cfg, arrays, dtype, placement), tokenizer, placement)
