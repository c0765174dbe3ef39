"""Lazy reading of PyTorch checkpoints stored as safetensors, without torch.

Why our own reader: the `safetensors` package hands numpy/flax arrays only for dtypes
numpy knows, and the released fp8 checkpoints hold `float8_e4m3fn` tensors (it fails on
them). The format is an 8-byte little-endian header length, a JSON header, then raw
bytes; we memory-map the file and view each tensor on demand with `ml_dtypes`, so a
converter touches one tensor at a time and never holds a second copy of a 24B model.

Sources understood by `open_checkpoint`:
  * a single `.safetensors` file (or `.safetensors.zst`);
  * a folder with `model.safetensors.index.json` (shards listed in its weight_map, each
    optionally `.zst`-compressed as upstream's release does);
  * a folder holding exactly one `*.safetensors[.zst]` file;
  * PyTorch `.bin` state dicts (a file, or a folder with `pytorch_model.bin.index.json`),
    read without torch by torch_bin.py.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_CODES = {v: k for k, v in _DTYPES.items()}
FLOAT_DTYPES = frozenset(_DTYPES[k] for k in ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"))

INDEX_NAME = "model.safetensors.index.json"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"


class CheckpointError(ValueError):
    """A checkpoint file or folder is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class TensorInfo:
    key: str
    shape: tuple[int, ...]
    dtype: np.dtype
    file: Path


class SafetensorsFile:
    """One memory-mapped safetensors file; `get(key)` returns a read-only numpy view."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._tmp = None
        self._mm = None
        source = self.path
        if source.name.endswith(".zst"):
            source = self._decompress(source)
        size = os.path.getsize(source)
        with open(source, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{self.path}: too short to be a safetensors file")
            (n,) = struct.unpack("<Q", raw)
            if 8 + n > size:
                raise CheckpointError(
                    f"{self.path}: header claims {n} bytes but the file has {size}: the file is truncated or not "
                    "safetensors (download it again)"
                )
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{self.path}: unreadable safetensors header ({e})") from e
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 8 + n else None
        self._base = 8 + n
        self.metadata = header.pop("__metadata__", None) or {}
        self._entries = {}
        for key, e in header.items():
            if e.get("dtype") not in _DTYPES:
                raise CheckpointError(
                    f"{self.path}: tensor {key!r} has dtype {e.get('dtype')}, which the converter does not know "
                    f"(known: {', '.join(_DTYPES)}); re-save it in one of these"
                )
            self._entries[key] = (tuple(e["shape"]), _DTYPES[e["dtype"]], tuple(e["data_offsets"]))
        self._check_layout(size - self._base)

    def _check_layout(self, data_bytes: int):
        """Every tensor's byte range inside the data section, sized by its shape, none overlapping.

        Checked once from the header, so that a truncated download or a header that lies about
        offsets is an error naming the tensor before any data is read (not garbage weights, nor
        a numpy error deep inside the converter)."""
        spans = []
        for key, (shape, dtype, offsets) in self._entries.items():
            count = int(np.prod(shape, dtype=np.int64))
            if len(offsets) != 2 or not 0 <= offsets[0] <= offsets[1]:
                raise CheckpointError(f"{self.path}: tensor {key!r} has invalid data_offsets {list(offsets)}")
            start, end = offsets
            if end - start != count * dtype.itemsize:
                raise CheckpointError(
                    f"{self.path}: tensor {key!r} spans {end - start} bytes but its shape {list(shape)} of "
                    f"{dtype} needs {count * dtype.itemsize}: the header is corrupt"
                )
            if end > data_bytes:
                raise CheckpointError(
                    f"{self.path}: tensor {key!r} ends at byte {end} of the data, which holds {data_bytes}: the file "
                    "is truncated (download it again)"
                )
            if end > start:
                spans.append((start, end, key))
        spans.sort()
        for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
            if start_b < end_a:
                raise CheckpointError(f"{self.path}: tensors {a!r} and {b!r} overlap: the header is corrupt")

    def _decompress(self, path: Path) -> Path:
        # Streamed to a temporary file so that the shard can be memory-mapped like any other.
        import zstandard

        fd, tmp = tempfile.mkstemp(suffix=".safetensors", prefix="magi_zst_")
        self._tmp = Path(tmp)
        try:
            with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
                zstandard.ZstdDecompressor().copy_stream(src, out)
        except zstandard.ZstdError as e:
            self._tmp.unlink(missing_ok=True)
            raise CheckpointError(f"{path}: does not decompress as zstd ({e}); download the shard again") from None
        return self._tmp

    def keys(self) -> list[str]:
        return list(self._entries)

    def info(self, key: str) -> TensorInfo:
        shape, dtype, _ = self._entries[key]
        return TensorInfo(key, shape, dtype, self.path)

    def get(self, key: str) -> np.ndarray:
        shape, dtype, (start, end) = self._entries[key]  # ranges were checked when the file was opened
        count = int(np.prod(shape, dtype=np.int64))
        if count == 0:
            return np.zeros(shape, dtype)
        return np.frombuffer(self._mm, dtype=dtype, count=count, offset=self._base + start).reshape(shape)

    def close(self):
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass  # a caller still holds a view; the map closes when that view dies
        if self._tmp is not None and self._tmp.exists():
            self._tmp.unlink()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class Checkpoint:
    """All tensors of a (possibly sharded) checkpoint, opened one shard at a time."""

    def __init__(self, files: list[Path], key_to_file: dict[str, Path] | None = None, index_path=None):
        self.files = files
        self.index_path = index_path
        self._open: dict[Path, SafetensorsFile] = {}
        self._key_to_file: dict[str, Path] = {}
        self.duplicates: list[tuple[str, Path, Path]] = []
        for path in files:
            try:
                sf = self._file(path)
            except CheckpointError as e:
                held = sorted(k for k, p in (key_to_file or {}).items() if p == path)
                if not held:
                    raise
                more = f" and {len(held) - 3} more" if len(held) > 3 else ""
                raise CheckpointError(f"{e} [the index puts {', '.join(map(repr, held[:3]))}{more} in it]") from None
            for k in sf.keys():
                if k in self._key_to_file:
                    self.duplicates.append((k, self._key_to_file[k], path))
                    continue
                self._key_to_file[k] = path
        if key_to_file is not None:
            for k, path in key_to_file.items():
                if k not in self._key_to_file:
                    raise CheckpointError(
                        f"{index_path}: lists {k!r} in {path.name}, but that shard has no such tensor"
                    )
            extra = sorted(set(self._key_to_file) - set(key_to_file))
            if extra:
                raise CheckpointError(f"{index_path}: shards hold tensors the index does not list: {extra[:5]}")

    def _file(self, path: Path):
        if path not in self._open:
            if path.name.endswith(".bin"):
                from magi_jax.torch_bin import TorchBinFile

                self._open[path] = TorchBinFile(path)
            else:
                self._open[path] = SafetensorsFile(path)
        return self._open[path]

    def keys(self) -> list[str]:
        return list(self._key_to_file)

    def __contains__(self, key: str) -> bool:
        return key in self._key_to_file

    def info(self, key: str) -> TensorInfo:
        return self._file(self._key_to_file[key]).info(key)

    def get(self, key: str) -> np.ndarray:
        return self._file(self._key_to_file[key]).get(key)

    def keys_by_file(self) -> Iterator[tuple[Path, list[str]]]:
        """Keys grouped per shard, in shard order (for progress over shards)."""
        for path in self.files:
            yield path, [k for k, p in self._key_to_file.items() if p == path]

    def release(self, path: Path):
        """Close one shard once its tensors were consumed (frees its decompressed copy)."""
        sf = self._open.pop(path, None)
        if sf is not None:
            sf.close()

    def close(self):
        for path in list(self._open):
            self.release(path)


def _is_safetensors(p: Path) -> bool:
    return p.name.endswith(".safetensors") or p.name.endswith(".safetensors.zst")


def _is_weights(p: Path) -> bool:
    return _is_safetensors(p) or p.name.endswith(".bin")


def open_checkpoint(src: str | os.PathLike) -> Checkpoint:
    """Opens a safetensors file, a sharded folder with an index, or a folder with one file."""
    src = Path(src)
    if not src.exists():
        raise CheckpointError(
            f"{src}: no such file or folder (expected a .safetensors file or a folder with {INDEX_NAME})"
        )
    if src.is_file():
        if not _is_weights(src):
            raise CheckpointError(f"{src}: not a .safetensors, .safetensors.zst or torch .bin file")
        return Checkpoint([src])
    index = src / INDEX_NAME
    if not index.exists() and (src / BIN_INDEX_NAME).exists():
        index = src / BIN_INDEX_NAME
    if index.exists():
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: has no weight_map")
        key_to_file = {}
        for key, name in weight_map.items():
            path = src / name
            if not path.exists() and (src / (name + ".zst")).exists():
                path = src / (name + ".zst")
            if not path.exists():
                raise CheckpointError(f"{index}: shard {name} (for {key!r}) is missing from {src}")
            key_to_file[key] = path
        files = sorted(set(key_to_file.values()), key=lambda p: p.name)
        return Checkpoint(files, key_to_file, index)
    found = sorted(p for p in src.iterdir() if _is_safetensors(p))
    found = found or sorted(p for p in src.iterdir() if p.name.endswith(".bin"))
    if len(found) != 1:
        raise CheckpointError(
            f"{src}: expected {INDEX_NAME} (or {BIN_INDEX_NAME}) or exactly one weights file, found {len(found)}"
        )
    return Checkpoint(found)


def save_file(tensors: dict[str, np.ndarray], path: str | os.PathLike, metadata: dict | None = None):
    """Writes numpy arrays (any dtype above, fp8 and bf16 included) as a safetensors file."""
    header, offset, blobs = {}, 0, []
    for key, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        data = arr.tobytes()
        header[key] = {
            "dtype": _CODES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        offset += len(data)
        blobs.append(data)
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for b in blobs:
            f.write(b)
