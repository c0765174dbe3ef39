"""Configuration: one frozen dataclass per upstream config section, and the named variants.

Field names and meanings are upstream's (`model_config`, `runtime_config`, `engine_config`
of MAGI-1's JSON files), so a released JSON loads as it is. The six released variants and
the TINY test variant live as upstream JSON files in `magi_jax/configs/` (installed with the
package; `configs/` at the top of the repository links to it) - the single source of their values;
`load_config("4.5B_base")` reads one by name, `load_config(path)` reads any file.

A few runtime fields are ours (upstream reads them from environment variables): the
special-token flags and the near-clean blend of distilled models. They are optional in a
JSON file, and the upstream environment variables still override them (`apply_env`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import jax.numpy as jnp

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # shipped in the package; `configs/` at the top points here
VARIANTS = ("4.5B_base", "4.5B_distill", "4.5B_distill_quant", "24B_base", "24B_distill", "24B_distill_quant", "tiny")

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


class ConfigError(ValueError):
    """A config file or value that cannot be used; the message names the field and the fix."""


def _ours(default, doc: str):
    """A field magi-jax adds to an upstream section: optional in JSON files."""
    return field(default=default, metadata={"ours": True, "doc": doc})


@dataclass(frozen=True)
class ModelConfig:
    """The DiT's architecture (upstream `model_config`)."""

    model_name: str = "videodit_ardf"
    num_layers: int = 34
    hidden_size: int = 3072
    ffn_hidden_size: int = 12288
    num_attention_heads: int = 24
    num_query_groups: int = 8  # GQA: key/value heads
    kv_channels: int = 128  # head dim
    layernorm_epsilon: float = 1e-6
    apply_layernorm_1p: bool = True  # stored gamma is gamma - 1 in the fused norms
    x_rescale_factor: float = 1.0
    half_channel_vae: bool = False  # 16 VAE channels duplicated to 32 model channels (24B)
    params_dtype: str = "bfloat16"
    patch_size: int = 2
    t_patch_size: int = 1
    in_channels: int = 16
    out_channels: int = 16
    cond_hidden_ratio: float = 0.25
    caption_channels: int = 4096
    caption_max_length: int = 800
    xattn_cond_hidden_ratio: float = 1.0
    cond_gating_ratio: float = 1.0
    gated_linear_unit: bool = False  # SwiGLU MLP (24B) instead of GELU

    @property
    def dtype(self):
        return jnp.dtype(self.params_dtype)

    @property
    def cond_size(self) -> int:
        return int(self.hidden_size * self.cond_hidden_ratio)

    @property
    def xattn_size(self) -> int:
        return int(self.hidden_size * self.xattn_cond_hidden_ratio)

    @property
    def rope_dim(self) -> int:
        # upstream sizes the rotary table from hidden/heads, not kv_channels
        return self.hidden_size // self.num_attention_heads

    @property
    def latent_channels(self) -> int:
        """Channels of the VAE latents the model reads and writes."""
        return 16 if self.half_channel_vae else self.in_channels


@dataclass(frozen=True)
class RuntimeConfig:
    """Sampling and video settings (upstream `runtime_config`)."""

    cfg_number: int = 3
    cfg_t_range: tuple = (0.0, 0.0217, 0.1, 0.3, 0.999)
    prev_chunk_scales: tuple = (1.5, 1.5, 1.5, 1.0, 1.0)
    text_scales: tuple = (7.5, 7.5, 7.5, 0.0, 0.0)
    noise2clean_kvrange: tuple = (5, 4, 3, 2)
    clean_chunk_kvrange: int = 1
    clean_t: float = 0.9999
    seed: int = 1234
    num_frames: int = 96
    video_size_h: int = 720
    video_size_w: int = 720
    num_steps: int = 64
    window_size: int = 4
    fps: int = 24
    chunk_width: int = 6
    t5_pretrained: str | None = None
    t5_device: str = "cpu"  # "cpu": the encoder on the host CPU; else on the accelerators (the mesh, split)
    vae_pretrained: str | None = None
    scale_factor: float = 0.18215
    temporal_downsample_factor: int = 4
    load: str | None = None
    # --- ours: upstream reads these from environment variables (names in ENV_FLAGS) ---
    pad_static: bool = _ours(False, "prepend the static-first-frames token (PAD_STATIC)")
    pad_dynamic: bool = _ours(False, "prepend the dynamic-first-frames token (PAD_DYNAMIC)")
    pad_borderness: bool = _ours(False, "prepend the borderness token (PAD_BORDERNESS)")
    pad_hq: bool = _ours(True, "prepend the high-quality token (PAD_HQ; on in upstream's run.sh)")
    pad_three_d_model: bool = _ours(False, "prepend the 3-D model token (PAD_THREE_D_MODEL)")
    pad_two_d_anime: bool = _ours(False, "prepend the 2-D anime token (PAD_TWO_D_ANIME)")
    pad_duration: bool = _ours(True, "prepend the chunks-remaining token (PAD_DURATION; on in run.sh)")
    neg_prompt: bool = _ours(False, "negative special tokens on the null caption (NEG_PROMPT)")
    prev_chunks_scale: float = _ours(0.7, "distill near-clean blend weight (prev_chunks_scale)")
    # --- ours: upstream hard-codes it (its VAE has 8x8 patches); the tiny variant's VAE has 4x4 ---
    spatial_downsample_factor: int = _ours(8, "pixels per latent along height and width (the VAE's patch)")

    @property
    def latent_hw(self) -> tuple[int, int]:
        """The latent grid's (height, width) of a frame at video_size_h x video_size_w."""
        f = self.spatial_downsample_factor
        return self.video_size_h // f, self.video_size_w // f


@dataclass(frozen=True)
class EngineConfig:
    """Execution settings (upstream `engine_config`). Parallelism fields are kept for file
    compatibility; magi-jax shards over a device mesh instead (see sharding.py)."""

    distributed_backend: str = "nccl"
    distributed_timeout_minutes: int = 15
    pp_size: int = 1
    cp_size: int = 1
    cp_strategy: str = "none"
    ulysses_overlap_degree: int = 1
    fp8_quant: bool = False
    distill_nearly_clean_chunk_threshold: float = 0.3
    shortcut_mode: str = "8,16,16"
    distill: bool = False
    kv_offload: bool = False  # read, no effect: the KV cache is a ring of the window's rows on the devices
    enable_cuda_graph: bool = False


# Upstream environment variables and the runtime field each one sets.
ENV_FLAGS = {
    "PAD_STATIC": "pad_static",
    "PAD_DYNAMIC": "pad_dynamic",
    "PAD_BORDERNESS": "pad_borderness",
    "PAD_HQ": "pad_hq",
    "PAD_THREE_D_MODEL": "pad_three_d_model",
    "PAD_TWO_D_ANIME": "pad_two_d_anime",
    "PAD_DURATION": "pad_duration",
    "NEG_PROMPT": "neg_prompt",
}
_TRUE = {"1", "true", "yes", "y", "on", "enabled"}


@dataclass(frozen=True)
class MagiConfig:
    model: ModelConfig
    runtime: RuntimeConfig
    engine: EngineConfig

    @property
    def model_config(self) -> ModelConfig:  # upstream's attribute names, for readers of both
        return self.model

    @property
    def runtime_config(self) -> RuntimeConfig:
        return self.runtime

    @property
    def engine_config(self) -> EngineConfig:
        return self.engine

    def replace(self, **sections) -> MagiConfig:
        """`cfg.replace(runtime=dict(num_steps=8))`: a copy with fields of sections changed."""
        new = {}
        for name, changes in sections.items():
            part = getattr(self, name)
            new[name] = dataclasses.replace(part, **changes) if isinstance(changes, dict) else changes
        out = dataclasses.replace(self, **new)
        validate(out)
        return out

    def apply_env(self, environ=None) -> MagiConfig:
        """Upstream's environment variables (PAD_HQ=1, prev_chunks_scale=0.5, ...) override fields."""
        environ = os.environ if environ is None else environ
        changes: dict[str, Any] = {}
        for var, name in ENV_FLAGS.items():
            if var in environ:
                changes[name] = str(environ[var]).lower() in _TRUE
        if "prev_chunks_scale" in environ:
            changes["prev_chunks_scale"] = float(environ["prev_chunks_scale"])
        return self.replace(runtime=changes) if changes else self

    def to_dict(self) -> dict:
        model = dataclasses.asdict(self.model)
        model["params_dtype"] = f"torch.{self.model.params_dtype}"
        listify = lambda d: {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}  # noqa: E731
        return {
            "model_config": model,
            "runtime_config": listify(dataclasses.asdict(self.runtime)),
            "engine_config": dataclasses.asdict(self.engine),
        }

    def to_json(self, path):
        Path(path).write_text(json.dumps(self.to_dict(), indent=4) + "\n")


_SECTIONS = (("model_config", ModelConfig), ("runtime_config", RuntimeConfig), ("engine_config", EngineConfig))


def _coerce(section: str, f: dataclasses.Field, value):
    where = f"{section}.{f.name}"
    if value is None:
        if f.name in ("t5_pretrained", "vae_pretrained", "load"):
            return None
        raise ConfigError(f"{where} is null; give it a value (see configs/4.5B_base.json)")
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if f.name == "params_dtype":
        name = str(value).removeprefix("torch.")
        if name not in _DTYPES:
            raise ConfigError(f"{where} is {value!r}; use one of torch.float32, torch.bfloat16, torch.float16")
        return _DTYPES[name]
    if kind == "tuple":
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return tuple(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if kind == "int":
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return int(value)
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if kind.startswith("str"):
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
    return value


def from_dict(d: dict, source: str = "config") -> MagiConfig:
    """Builds a MagiConfig from upstream's JSON layout, as strictly as upstream reads it."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a JSON object with model_config, runtime_config, engine_config")
    unknown = sorted(set(d) - {s for s, _ in _SECTIONS})
    if unknown:
        raise ConfigError(
            f"{source}: unknown section(s) {unknown}; a config has model_config, runtime_config, engine_config"
        )
    parts = {}
    for section, cls in _SECTIONS:
        if section not in d:
            raise ConfigError(f"{source}: missing section {section!r}; copy it from configs/4.5B_base.json")
        values = d[section]
        known = {f.name: f for f in fields(cls)}
        extra = sorted(set(values) - set(known))
        if extra:
            raise ConfigError(
                f"{source}: unknown field(s) {', '.join(f'{section}.{k}' for k in extra)}; "
                f"remove them (known fields: see configs/4.5B_base.json)"
            )
        missing = [n for n, f in known.items() if n not in values and not f.metadata.get("ours")]
        if missing:
            raise ConfigError(
                f"{source}: missing field(s) {', '.join(f'{section}.{k}' for k in missing)}; "
                f"add them (values of the released models: configs/4.5B_base.json)"
            )
        parts[section] = cls(**{n: _coerce(section, known[n], v) for n, v in values.items()})
    cfg = MagiConfig(parts["model_config"], parts["runtime_config"], parts["engine_config"])
    validate(cfg, source)
    return cfg


def validate(cfg: MagiConfig, source: str = "config"):
    """Upstream's post-validation plus the shape rules the model relies on."""
    m, r, e = cfg.model, cfg.runtime, cfg.engine
    if e.distill or e.fp8_quant:
        if r.cfg_number != 1:
            raise ConfigError(
                f"{source}: runtime_config.cfg_number is {r.cfg_number}, but distilled and fp8 models use one "
                f'guidance pass; set "cfg_number": 1'
            )
    elif r.cfg_number != 3:
        raise ConfigError(
            f"{source}: runtime_config.cfg_number is {r.cfg_number}, but base models use 3-way guidance; "
            f'set "cfg_number": 3 (or set engine_config.distill for a distilled model)'
        )
    if m.num_attention_heads % m.num_query_groups:
        raise ConfigError(
            f"{source}: model_config.num_attention_heads ({m.num_attention_heads}) must be a multiple of "
            f"num_query_groups ({m.num_query_groups})"
        )
    if (m.num_attention_heads * m.kv_channels) % 8:
        raise ConfigError(
            f"{source}: num_attention_heads*kv_channels ({m.num_attention_heads * m.kv_channels}) must be a "
            f"multiple of 8 (the attention output projection's layout)"
        )
    if m.half_channel_vae and m.in_channels != 32:
        raise ConfigError(f"{source}: half_channel_vae needs model_config.in_channels 32, got {m.in_channels}")
    if e.fp8_quant and m.num_layers < 3:
        raise ConfigError(f"{source}: fp8_quant keeps the first and last layer unquantised; num_layers must be >= 3")
    n = len(r.cfg_t_range)
    if len(r.prev_chunk_scales) != n or len(r.text_scales) != n:
        raise ConfigError(
            f"{source}: runtime_config.cfg_t_range, prev_chunk_scales and text_scales need the same length "
            f"(got {n}, {len(r.prev_chunk_scales)}, {len(r.text_scales)})"
        )
    if not math.isfinite(r.prev_chunks_scale):
        raise ConfigError(f"{source}: runtime_config.prev_chunks_scale must be a finite number")


def parse_size(text: str, flag: str = "--size") -> tuple[int, int]:
    """A command line's HEIGHTxWIDTH -> (height, width); ConfigError naming the flag otherwise."""
    try:
        h, w = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise ConfigError(f"{flag} {text!r} is not HEIGHTxWIDTH (e.g. 720x1280)") from None
    return h, w


def load_config(name_or_path: str | os.PathLike) -> MagiConfig:
    """A variant name (`4.5B_base`, ..., `tiny`) or the path of an upstream-style JSON file."""
    path = Path(name_or_path)
    if str(name_or_path) in VARIANTS:
        path = CONFIG_DIR / f"{name_or_path}.json"
    elif not path.exists():
        raise ConfigError(f"config {str(name_or_path)!r}: no such file, and not a variant name ({', '.join(VARIANTS)})")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror})") from e
    return from_dict(data, str(path))
