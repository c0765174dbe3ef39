"""The parity harness itself: fixture discovery, integrity checks and de-duplication.

A harness that silently finds nothing, or reads a corrupted file, would let every parity
test pass by accident; these tests hold it to failing loudly instead.
"""

import json
import shutil

import numpy as np
import parity
import pytest

SMALL_KIND = "schedules"  # a fixture without weights: cheap to copy and to alter


def _copy_fixture(dst, kind=SMALL_KIND):
    """Copy one bundled fixture of `kind` and a manifest listing only it into `dst`."""
    top = json.loads((parity.BUNDLED / "manifest.json").read_text())
    entry = next(e for e in top["fixtures"] if e["kind"] == kind)
    dst.mkdir(parents=True, exist_ok=True)
    for name in entry["files"].values():
        shutil.copy(parity.BUNDLED / name, dst / name)
    (dst / "manifest.json").write_text(json.dumps({"fixtures": [entry]}))
    return entry


def _env_roots(monkeypatch, path):
    monkeypatch.setenv(parity.ENV_VAR, str(path))
    return parity.roots()


def test_env_dir_without_fixtures_is_an_error(tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("no manifest here")
    with pytest.raises(parity.FixtureError, match=parity.ENV_VAR):
        parity.collect(_env_roots(monkeypatch, tmp_path))


def test_env_path_that_is_not_a_folder_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv(parity.ENV_VAR, str(tmp_path / "missing"))
    with pytest.raises(parity.FixtureError, match="not a folder"):
        parity.roots()


def test_t5_root_is_accepted(tmp_path, monkeypatch):
    shutil.copytree(parity.BUNDLED / "t5", tmp_path / "t5root")
    found = parity.discover(tmp_path / "t5root", "env:")
    bundled = {fx.name for fx in parity.discover(parity.BUNDLED) if fx.kind.startswith("t5")}
    assert {fx.name for fx in found} == bundled and bundled
    # identical content: each runs once, not twice
    everything = parity.collect(_env_roots(monkeypatch, tmp_path / "t5root"))
    assert sorted(fx.name for fx in everything if fx.kind.startswith("t5")) == sorted(bundled)


def test_same_json_other_arrays_is_kept(tmp_path, monkeypatch):
    entry = _copy_fixture(tmp_path)
    npz = tmp_path / entry["files"]["npz"]
    arrays = dict(np.load(npz))
    first = sorted(arrays)[0]
    arrays[first] = arrays[first] + 1  # the JSON stays byte-identical
    np.savez(npz, **arrays)
    entry["sha256"]["npz"] = parity._sha256(npz)
    entry["bytes"]["npz"] = npz.stat().st_size
    (tmp_path / "manifest.json").write_text(json.dumps({"fixtures": [entry]}))
    found = [fx for fx in parity.collect(_env_roots(monkeypatch, tmp_path)) if fx.kind == SMALL_KIND]
    assert [fx.id for fx in found] == [entry["name"], f"env:{entry['name']}"]


def test_identical_copy_runs_once(tmp_path, monkeypatch):
    entry = _copy_fixture(tmp_path)
    found = [fx for fx in parity.collect(_env_roots(monkeypatch, tmp_path)) if fx.kind == SMALL_KIND]
    assert [fx.id for fx in found] == [entry["name"]]


@pytest.mark.parametrize("role", ["json", "npz"])
def test_corrupted_file_fails_loudly(tmp_path, role):
    entry = _copy_fixture(tmp_path)
    path = tmp_path / entry["files"][role]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit, same size
    path.write_bytes(bytes(data))
    with pytest.raises(parity.FixtureError, match=f"{path.name}: sha256"):
        parity.discover(tmp_path)


def test_truncated_file_fails_loudly(tmp_path):
    entry = _copy_fixture(tmp_path)
    path = tmp_path / entry["files"]["npz"]
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(parity.FixtureError, match="bytes"):
        parity.discover(tmp_path)


def test_missing_file_fails_loudly(tmp_path):
    entry = _copy_fixture(tmp_path)
    (tmp_path / entry["files"]["npz"]).unlink()
    with pytest.raises(parity.FixtureError, match="missing"):
        parity.discover(tmp_path)


def test_check_array_records_fraction_of_tolerance():
    parity.RECORDS.clear()
    ref = np.zeros(4)
    parity.check_array(ref + 0.5, ref, {"atol": 1.0, "rms_atol": 2.0}, "demo")
    rec = parity.RECORDS.pop()
    assert rec["what"] == "demo" and rec["max_abs_fraction"] == 0.5 and rec["rms_fraction"] == 0.25
    with pytest.raises(AssertionError, match="demo"):
        parity.check_array(ref + 3.0, ref, {"atol": 1.0, "rms_atol": 2.0}, "demo")
    assert parity.RECORDS.pop()["fraction"] == 3.0  # a failing comparison is reported too
