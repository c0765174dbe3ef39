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
FLOAT_DTYPES = frozenset(_DTYPES[k] for k in ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"))


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
