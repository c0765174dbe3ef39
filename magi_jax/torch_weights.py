"""Released PyTorch-format weights as one lazy tensor store, without torch.

`open_torch_weights` understands
  * a single `.safetensors` file (or `.safetensors.zst`);
  * a folder with `model.safetensors.index.json` (shards listed in its weight_map, each
    optionally `.zst`-compressed as upstream's release does);
  * a folder holding exactly one `*.safetensors[.zst]` file;
  * PyTorch `.bin` state dicts (a file, or a folder with `pytorch_model.bin.index.json`),
    read without torch by torch_bin.py.
Tensors are read one at a time (convert.py walks them), so a converter never holds a
second copy of a 24B model. Our own converted checkpoints (orbax) are checkpoint.py's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from magi_jax.safetensors_io import SafetensorsFile
from magi_jax.tensor_file import CheckpointError, TensorInfo
from magi_jax.torch_bin import TorchBinFile

INDEX_NAME = "model.safetensors.index.json"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"


class TorchWeights:
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
                # Name what the index expected from the broken shard, so the user knows what is lost.
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


def open_torch_weights(src: str | os.PathLike) -> TorchWeights:
    """Opens a safetensors file, a sharded folder with an index, or a folder with one file."""
    src = Path(src)
    if not src.exists():
        raise CheckpointError(
            f"{src}: no such file or folder (expected a .safetensors file or a folder with {INDEX_NAME})"
        )
    if src.is_file():
        if not _is_weights(src):
            raise CheckpointError(f"{src}: not a .safetensors, .safetensors.zst or torch .bin file")
        return TorchWeights([src])
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
        return TorchWeights(files, key_to_file, index)
    found = sorted(p for p in src.iterdir() if _is_safetensors(p))
    found = found or sorted(p for p in src.iterdir() if p.name.endswith(".bin"))
    if len(found) != 1:
        raise CheckpointError(
            f"{src}: expected {INDEX_NAME} (or {BIN_INDEX_NAME}) or exactly one weights file, found {len(found)}"
        )
    return TorchWeights(found)
