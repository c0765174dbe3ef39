"""A loaded MAGI-1 VAE as the generate command runs it: the model (vae.VaeModel) behind one
jitted call per input shape, and the tiled pixel pipeline of vae_tiling.py.
`vae_weights.load_vae(path) -> Vae`, `Vae.encode_pixels`, `Vae.encode_image`, `Vae.decode_chunk`
(device in, device out: what the generate pipeline uses) and `Vae.decode_latents` (numpy).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from magi_jax.compile_cache import SavedProgram
from magi_jax.vae import VaeConfig, VaeModel
from magi_jax.vae_tiling import (
    SCALE_FACTOR,
    TileConfig,
    check_latents,
    check_video,
    decode_tiles_traced,
    frames_to_model,
    tiled_encode,
    to_uint8_traced,
)

f32 = jnp.float32


class Vae:
    """A loaded VAE with the pixel pipeline the generate command uses.

    encode_pixels(video uint8 (T, H, W, 3)) -> latents (z, t, h, w), times scale_factor
    encode_image(image uint8 (H, W, 3))     -> latents (z, 1, h, w), times scale_factor
    decode_chunk(latents (z, t, h, w))      -> frames uint8 (T', H, W, 3), a device array
    decode_latents(latents (z, t, h, w))    -> the same frames as numpy
    Encoded latents are numpy in the model dtype (bfloat16, as upstream hands the prefix to
    the DiT); decode accepts any float dtype and an optional leading batch axis of 1.

    Tiles follow `TileConfig` (default: upstream's 256x256 px, 12 frames, overlap 0.25;
    use `TileConfig.for_fps(fps)`). Encoding runs one jitted call per tile and blends on
    the host. Decoding a chunk is one jitted program (compiled once per latent shape and
    tiling): tiles of one shape run in a loop, so only one tile's activations live on the
    device at a time, and blending and the uint8 mapping happen on the device - the host
    dispatches it and moves on, nothing waits until the frames are read.
    """

    def __init__(self, model: VaeModel, *, scale_factor: float = SCALE_FACTOR, tiles: TileConfig | None = None):
        self.config: VaeConfig = model.cfg
        self.dtype = jnp.dtype(model.encoder.dtype)
        self.scale_factor = scale_factor
        self.tiles = tiles or TileConfig()
        graphdef, self.state = nnx.split(model)
        self._graphdef = graphdef

        def call(method, state, x, *args):
            return getattr(nnx.merge(graphdef, state), method)(x, *args)

        self._jit = {m: jax.jit(functools.partial(call, m)) for m in ("moments", "encode")}
        self._jit["decode"] = jax.jit(functools.partial(call, "decode"), static_argnums=2)

        def chunk(state, latents, tiles: TileConfig, uint8: bool):
            model = nnx.merge(graphdef, state)
            cfg = model.cfg
            z = latents.astype(f32) / np.float32(self.scale_factor)
            with jax.named_scope("vae_decode_chunk"):  # tiles, blending (each tile's decoder: vae_decode)
                frames = decode_tiles_traced(z[None], model.decode, tiles, cfg.patch_length, cfg.patch_size)[0]
            if uint8:
                frames = to_uint8_traced(frames)
            return frames.transpose(1, 2, 3, 0)

        # saved to disk with the compilation cache (a warm start skips tracing the decoder)
        self._jit["decode_chunk"] = SavedProgram(
            chunk, "decode_chunk", identity=(graphdef, float(scale_factor)), static_argnums=(2, 3)
        )

    @property
    def model(self) -> VaeModel:
        return nnx.merge(self._graphdef, self.state)

    # untiled calls, (B, C, T, H, W) layout as upstream --------------------------------
    def moments(self, x) -> jax.Array:
        return self._jit["moments"](self.state, jnp.asarray(x))

    def encode(self, x) -> jax.Array:
        """x (B, 3, T, H, W) in [-1, 1] -> posterior mode (B, z, t, h, w), no tiling."""
        return self._jit["encode"](self.state, jnp.asarray(x))

    def decode(self, z, strided: bool = True) -> jax.Array:
        """z (B, z, t, h, w) (unscaled) -> (B, 3, T, H, W) in about [-1, 1], no tiling."""
        return self._jit["decode"](self.state, jnp.asarray(z), bool(strided))

    def _encode_tile(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.encode(x))

    # the pixel pipeline -----------------------------------------------------------------
    def _encode_tiled(self, video: np.ndarray, tiles: TileConfig | None) -> np.ndarray:
        """video uint8 (T, H, W, 3) -> tiled posterior mode (z, t, h, w) in the model dtype."""
        cfg = self.config
        video = check_video(video, cfg.patch_size, cfg.patch_length)
        x = frames_to_model(video, self.dtype)
        out = tiled_encode(x, self._encode_tile, tiles or self.tiles, cfg.patch_length, cfg.patch_size)
        return out[0]

    def encode_pixels(self, video: np.ndarray, tiles: TileConfig | None = None) -> np.ndarray:
        """Upstream's encode_prefix_video: video uint8 (T, H, W, 3) -> latents (z, t, h, w).

        T must be 1 or a multiple of 4, H and W multiples of 8 (the patch size); the result is
        the tiled posterior mode times `scale_factor`, rounded to the model dtype.
        """
        z = self._encode_tiled(video, tiles)
        return (z.astype(np.float32) * np.float32(self.scale_factor)).astype(z.dtype)

    def encode_image(self, image: np.ndarray, tiles: TileConfig | None = None) -> np.ndarray:
        """The i2v prefix: image uint8 (H, W, 3) or (1, H, W, 3) -> latents (z, 1, h, w)."""
        image = np.asarray(image)
        if image.ndim == 3:
            image = image[None]
        if image.ndim != 4 or image.shape[0] != 1:
            raise ValueError(f"expected one image (H, W, 3) or (1, H, W, 3), got shape {image.shape}")
        return self.encode_pixels(image, tiles)

    def decode_chunk(self, latents, tiles: TileConfig | None = None, *, uint8: bool = True) -> jax.Array:
        """Upstream's decode_chunk as one device program: latents (z, t, h, w) times
        scale_factor (numpy or a device array) -> frames (T', H, W, 3), uint8 (or the model
        dtype in about [-1, 1] with `uint8=False`), left on the device: reading them
        (`np.asarray`) is what waits. A tile of one latent frame yields one frame, so a chunk
        of t latent frames gives 4*t frames, or fewer when a temporal tile holds one.
        """
        lat = check_latents(latents, self.config.z_chans)
        if isinstance(lat, jax.Array):
            home = next(iter(jax.tree.leaves(self.state))).sharding
            if lat.sharding.device_set != home.device_set:  # e.g. latents sharded over a mesh
                lat = jax.device_put(lat, home)
        return self._jit["decode_chunk"](self.state, lat, tiles or self.tiles, uint8)

    def decode_float(self, latents, tiles: TileConfig | None = None) -> np.ndarray:
        """latents (z, t, h, w) times scale_factor -> frames (T', H, W, 3) in about [-1, 1],
        in the model dtype, as numpy."""
        return np.asarray(self.decode_chunk(latents, tiles, uint8=False))

    def decode_latents(self, latents, tiles: TileConfig | None = None) -> np.ndarray:
        """Upstream's decode_chunk: latents (z, t, h, w) times scale_factor -> uint8 (T', H, W, 3)."""
        return np.asarray(self.decode_chunk(latents, tiles))
