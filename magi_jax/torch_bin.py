"""Reading PyTorch `.bin` state dicts (zip + pickle) without torch, and without executing code.

Some released checkpoints (DeepFloyd's t5-v1_1-xxl) ship only as `pytorch_model-*.bin`
shards. Such a file is a zip archive: `<name>/data.pkl` pickles an OrderedDict of tensors,
each rebuilt by `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` from
a storage named through pickle's persistent ids and stored raw in `<name>/data/<key>`.

Unpickling arbitrary data can run code, so the unpickler here resolves only the handful
of globals a state dict needs (the tensor rebuild function, the storage classes,
OrderedDict) and refuses everything else. Tensors are read lazily, one at a time, with
the same interface as a safetensors file (`keys`, `info`, `get`).
"""

from __future__ import annotations

import collections
import pickle
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np

from magi_jax.tensor_file import CheckpointError, TensorInfo

STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}


class _StorageType:
    def __init__(self, name):
        self.dtype = STORAGE_DTYPES[name]


class _Storage:
    def __init__(self, dtype, key):
        self.dtype, self.key = dtype, key


class _Tensor:
    """A tensor's recipe: read from `storage` at `offset` with `size` / `stride` (elements)."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)


def _rebuild_tensor(storage, offset, size, stride, *unused):
    return _Tensor(storage, offset, size, stride)


def _rebuild_parameter(tensor, *unused):
    return tensor


class _StateDictUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a plain state dict")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        kind = pid[1]
        if not isinstance(kind, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {kind!r}")
        return _Storage(kind.dtype, str(pid[2]))


class TorchBinFile:
    """One torch `.bin` state dict, read lazily tensor by tensor."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            self._zip = zipfile.ZipFile(self.path)
        except zipfile.BadZipFile:
            raise CheckpointError(
                f"{self.path}: not a zip-format torch checkpoint (legacy pickle .bin files are not supported; "
                f"re-save with torch.save or convert to safetensors)"
            ) from None
        pkl = [n for n in self._zip.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            raise CheckpointError(f"{self.path}: expected one data.pkl in the archive, found {len(pkl)}")
        self._prefix = pkl[0][: -len("data.pkl")]
        try:
            state = _StateDictUnpickler(self._zip.open(pkl[0])).load()
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{self.path}: {e}") from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{self.path}: does not hold a state dict")
        self._tensors = {}
        for key, t in state.items():
            if not isinstance(t, _Tensor):
                raise CheckpointError(f"{self.path}: entry {key!r} is not a tensor")
            self._tensors[key] = t
        self.metadata = {}

    def keys(self) -> list[str]:
        return list(self._tensors)

    def info(self, key: str) -> TensorInfo:
        t = self._tensors[key]
        return TensorInfo(key, t.size, t.storage.dtype, self.path)

    def get(self, key: str) -> np.ndarray:
        t = self._tensors[key]
        raw = self._zip.read(f"{self._prefix}data/{t.storage.key}")
        flat = np.frombuffer(raw, dtype=t.storage.dtype)
        itemsize = t.storage.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[t.offset :], shape=t.size, strides=tuple(s * itemsize for s in t.stride), writeable=False
        )
        return np.ascontiguousarray(view)

    def close(self):
        self._zip.close()
