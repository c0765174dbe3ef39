"""The safetensors file format: lazy reading without torch, and writing (for tests and tools).

Why our own reader: the `safetensors` package hands numpy/flax arrays only for dtypes
numpy knows, and the released fp8 checkpoints hold `float8_e4m3fn` tensors (it fails on
them). The format is an 8-byte little-endian header length, a JSON header, then raw
bytes; we memory-map the file and view each tensor on demand with `ml_dtypes`, so a
converter touches one tensor at a time and never holds a second copy of a 24B model.
Folders, shards and torch `.bin` files are put together by torch_weights.py.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np

from magi_jax.tensor_file import CheckpointError, TensorInfo

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


class SafetensorsFile:
    """One memory-mapped safetensors file; `get(key)` returns a read-only numpy view."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._tmp = None
        source = self.path
        if source.name.endswith(".zst"):
            source = self._decompress(source)
        with open(source, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{self.path}: too short to be a safetensors file")
            (n,) = struct.unpack("<Q", raw)
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{self.path}: unreadable safetensors header ({e})") from e
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.path.getsize(source) > 8 + n else None
        self._base = 8 + n
        self.metadata = header.pop("__metadata__", None) or {}
        self._entries = {}
        for key, e in header.items():
            if e["dtype"] not in _DTYPES:
                raise CheckpointError(f"{self.path}: tensor {key!r} has unsupported dtype {e['dtype']}")
            self._entries[key] = (tuple(e["shape"]), _DTYPES[e["dtype"]], tuple(e["data_offsets"]))

    def _decompress(self, path: Path) -> Path:
        # Streamed to a temporary file so that the shard can be memory-mapped like any other.
        import zstandard

        fd, tmp = tempfile.mkstemp(suffix=".safetensors", prefix="magi_zst_")
        with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
            zstandard.ZstdDecompressor().copy_stream(src, out)
        self._tmp = Path(tmp)
        return self._tmp

    def keys(self) -> list[str]:
        return list(self._entries)

    def info(self, key: str) -> TensorInfo:
        shape, dtype, _ = self._entries[key]
        return TensorInfo(key, shape, dtype, self.path)

    def get(self, key: str) -> np.ndarray:
        shape, dtype, (start, end) = self._entries[key]
        count = int(np.prod(shape, dtype=np.int64))
        if end - start != count * dtype.itemsize:
            raise CheckpointError(f"{self.path}: tensor {key!r} byte range does not match shape {shape}")
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
