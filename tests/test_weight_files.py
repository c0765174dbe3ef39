"""Damaged weight files: each is one error naming the file and the tensor, and nothing is written.

Every case starts from a fixture's real weights and breaks them the way downloads and tools
break them: a truncated shard, a header whose offsets lie, a .zst shard that does not
decompress, a dtype the converter does not know.
"""

import importlib.util
import json
import struct
from pathlib import Path

import numpy as np
import parity
import pytest

from magi_jax.config import from_dict
from magi_jax.safetensors_io import save_file
from magi_jax.torch_weights import open_torch_weights

ROOT = Path(__file__).resolve().parent.parent


def _cli_main():
    spec = importlib.util.spec_from_file_location("convert_torch_weights", ROOT / "convert_torch_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def source():
    fx = next(fx for fx in parity.fixtures("dit") if not fx.meta["config"]["engine_config"]["fp8_quant"])
    ck = open_torch_weights(fx.weights)
    tensors = {k: np.array(ck.get(k)) for k in ck.keys()}
    ck.close()
    return from_dict(fx.meta["config"], fx.name), tensors


def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _rewrite_header(path: Path, header: dict, data: bytes):
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _last_in_file(header: dict) -> str:
    return max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])


def truncated(folder: Path, tensors: dict) -> tuple[Path, str]:
    path = folder / "model.safetensors"
    save_file(tensors, path)
    header, _ = _header(path)
    path.write_bytes(path.read_bytes()[:-100])  # an interrupted download
    return path, _last_in_file(header)


def lying_offsets(folder: Path, tensors: dict) -> tuple[Path, str]:
    path = folder / "model.safetensors"
    save_file(tensors, path)
    header, data = _header(path)
    keys = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    victim = keys[len(keys) // 2]
    start, end = header[victim]["data_offsets"]
    header[victim]["data_offsets"] = [start - 8, end - 8]  # same size, now overlapping its neighbour
    _rewrite_header(path, header, data)
    return path, victim


def bad_zst_shard(folder: Path, tensors: dict) -> tuple[Path, str]:
    keys = sorted(tensors)
    good, broken = keys[::2], keys[1::2]
    save_file({k: tensors[k] for k in good}, folder / "model-00001-of-00002.safetensors")
    (folder / "model-00002-of-00002.safetensors.zst").write_bytes(b"\x28\xb5\x2f\xfd" + b"not zstd data" * 10)
    weight_map = {k: "model-00001-of-00002.safetensors" for k in good}
    weight_map.update({k: "model-00002-of-00002.safetensors" for k in broken})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder / "model-00002-of-00002.safetensors.zst", broken[0]


def unknown_header_dtype(folder: Path, tensors: dict) -> tuple[Path, str]:
    path = folder / "model.safetensors"
    save_file(tensors, path)
    header, data = _header(path)
    victim = sorted(k for k in header if k != "__metadata__")[0]
    header[victim]["dtype"] = "F4"  # a 4-bit float our reader has never heard of
    _rewrite_header(path, header, data)
    return path, victim


def integer_weight(folder: Path, tensors: dict) -> tuple[Path, str]:
    victim = sorted(k for k in tensors if k.endswith(".weight"))[0]
    changed = dict(tensors, **{victim: tensors[victim].astype(np.int32)})
    path = folder / "model.safetensors"
    save_file(changed, path)
    return path, victim


CASES = [truncated, lying_offsets, bad_zst_shard, unknown_header_dtype, integer_weight]


@pytest.mark.parametrize("damage", CASES, ids=[c.__name__ for c in CASES])
def test_damaged_weights_are_one_error_naming_file_and_tensor(source, tmp_path, capsys, damage):
    cfg, tensors = source
    src = tmp_path / "src"
    src.mkdir()
    bad_file, tensor = damage(src, tensors)
    cfg_path = tmp_path / "config.json"
    cfg.to_json(cfg_path)
    out = tmp_path / "out"
    code = _cli_main()(["--src", str(src), "--config", str(cfg_path), "--out", str(out)])
    err = capsys.readouterr().err
    message = err[err.find("error:") :]  # the converter's error lists its problems below the first line
    assert code == 2 and sum(line.startswith("error:") for line in err.splitlines()) == 1, err
    assert bad_file.name in message and repr(tensor) in message, message
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("out")], "nothing written"
