"""Discovery of upstream parity fixtures and the per-array comparison they prescribe.

Fixtures live in `tests/fixtures/parity` (a copy of the shared set, so the suite needs
nothing outside the repo) and, when `MAGI_PARITY_DIR` is set, in that folder too. A root
is any folder holding
  * `manifest.json` listing the DiT / VAE / schedule / ... fixtures, and/or
  * `t5/*/manifest.json` or `*/manifest.json`: text-encoder fixtures, one folder each
    (so a T5 fixture root can be given directly).
Everything is dispatched on `kind`. A `MAGI_PARITY_DIR` that yields no fixture is an error:
a typo must not leave the suite green with nothing checked.

Every file a manifest lists with a sha256 (and byte count) is verified when the fixture is
discovered, before any test reads it. Fixtures are de-duplicated by the hashes of all their
files (JSON, arrays, weights, ...), so the same JSON beside other arrays still runs.

`check_array` records each comparison's error as a fraction of its tolerance; conftest.py
prints them at the end of the session (and writes them to `$MAGI_PARITY_REPORT` as JSON), so
an outlier shows even when it passes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

BUNDLED = Path(__file__).parent / "fixtures" / "parity"
ENV_VAR = "MAGI_PARITY_DIR"

# every comparison made in this process since conftest.py last moved them onto a test report
RECORDS: list[dict] = []


class FixtureError(RuntimeError):
    """A fixture root or file that cannot be trusted (missing, empty, corrupted)."""


def roots() -> list[tuple[str, Path]]:
    out = [("", BUNDLED)]
    extra = os.environ.get(ENV_VAR)
    if extra:
        path = Path(extra).expanduser().resolve()
        if not path.is_dir():
            raise FixtureError(f"{ENV_VAR}={extra} is not a folder")
        if path != BUNDLED.resolve():
            out.append(("env:", path))
    return out


@dataclass(frozen=True)
class Fixture:
    """One fixture: its JSON description, arrays and (optional) weights file."""

    name: str
    kind: str
    folder: Path
    files: dict = field(hash=False, compare=False)
    tag: str = ""  # "" for bundled fixtures, "env:" for MAGI_PARITY_DIR ones
    digest: str = ""  # sha256 over the sha256 of every file, in role order

    @property
    def id(self) -> str:
        return f"{self.tag}{self.name}"

    def path(self, role: str) -> Path:
        return self.folder / self.files[role]

    @functools.cached_property
    def meta(self) -> dict:
        return json.loads(self.path("json").read_text())

    @functools.cached_property
    def arrays(self):
        return np.load(self.path("npz"))

    @property
    def weights(self) -> Path | None:
        return self.path("safetensors") if "safetensors" in self.files else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _verified(folder: Path, files: dict, sha256: dict, sizes: dict, where: Path) -> str:
    """sha256 of every file (checked against the manifest's values); returns their joint digest."""
    joint = hashlib.sha256()
    for role in sorted(files):
        path = folder / files[role]
        if not path.is_file():
            raise FixtureError(f"{where}: lists {files[role]} ({role}), which is missing from {folder}")
        got = _sha256(path)
        if role in sizes and path.stat().st_size != sizes[role]:
            raise FixtureError(
                f"{path}: {path.stat().st_size} bytes, {where} says {sizes[role]}: the copy is truncated or "
                "corrupted; copy the fixture again"
            )
        if role in sha256 and got != sha256[role]:
            raise FixtureError(
                f"{path}: sha256 {got[:16]}... does not match {where} ({sha256[role][:16]}...): the file is "
                "corrupted or from another fixture set; copy the fixture again"
            )
        joint.update(f"{role}={got};".encode())
    return joint.hexdigest()


def discover(root: Path, tag: str = "") -> list[Fixture]:
    """Every fixture under one root, each file verified against its manifest."""
    found = []
    manifest = root / "manifest.json"
    if manifest.is_file():
        top = json.loads(manifest.read_text())
        for entry in top.get("fixtures", []):
            files = dict(entry["files"])
            digest = _verified(root, files, entry.get("sha256", {}), entry.get("bytes", {}), manifest)
            found.append(Fixture(entry["name"], entry["kind"], root, files, tag, digest))
        for entry in top.get("data_files", []):
            files = {"data": entry["file"]}
            _verified(root, files, {"data": entry["sha256"]}, {"data": entry["bytes"]}, manifest)
    subs = sorted({*root.glob("t5/*/manifest.json"), *root.glob("*/manifest.json")})
    for sub in subs:
        meta = json.loads(sub.read_text())
        if "kind" not in meta:
            continue
        files = {"json": "manifest.json", **{r: f for r, f in meta.get("files", {}).items() if isinstance(f, str)}}
        digest = _verified(sub.parent, files, meta.get("sha256", {}), meta.get("bytes", {}), sub)
        found.append(Fixture(sub.parent.name, meta["kind"], sub.parent, files, tag, digest))
    return found


def collect(where: list[tuple[str, Path]]) -> tuple[Fixture, ...]:
    """Fixtures of every root, de-duplicated by kind and content; a root without any is an error."""
    found, seen = [], set()
    for tag, root in where:
        here = discover(root, tag)
        if not here:
            label = f"{ENV_VAR}={root}" if tag else str(root)
            raise FixtureError(
                f"{label} holds no parity fixture (expected manifest.json, t5/*/manifest.json or */manifest.json); "
                "point it at a fixture folder or unset it"
            )
        for fx in here:
            key = (fx.kind, fx.digest)
            if key not in seen:
                seen.add(key)
                found.append(fx)
    return tuple(found)


@functools.cache
def _all() -> tuple[Fixture, ...]:
    return collect(roots())


def fixtures(kind: str) -> list[Fixture]:
    return [fx for fx in _all() if fx.kind == kind]


def data_file(name: str) -> Path:
    """A file listed under `data_files` of the bundled manifest (e.g. special_tokens.npz), verified."""
    _all()
    return BUNDLED / name


def cases(kind: str, lister) -> list:
    """pytest params, one per (fixture, case); `lister(fixture)` yields (case_name, case)."""
    params = []
    for fx in fixtures(kind):
        for case_name, case in lister(fx):
            params.append(pytest.param(fx, case, id=f"{fx.id}/{case_name}"))
    return params


def record(what: str, **errors_and_limits):
    """Note one comparison: pairs `name=(error, limit)`; the fraction error/limit is what the report shows."""
    fractions = {
        k: (e / lim if lim > 0 else (0.0 if e == 0 else float("inf"))) for k, (e, lim) in errors_and_limits.items()
    }
    RECORDS.append(
        {
            "what": what,
            "fraction": max(fractions.values()) if fractions else 0.0,
            **{f"{k}_fraction": f for k, f in fractions.items()},
            **{k: e for k, (e, _) in errors_and_limits.items()},
            **{f"{k}_limit": lim for k, (_, lim) in errors_and_limits.items()},
        }
    )
    return fractions


def check_array(got, ref, tol: dict, what: str):
    """The fixtures' criterion: max|got-ref| <= atol and rms(got-ref) <= rms_atol."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != reference {ref.shape}"
    assert np.all(np.isfinite(got)), f"{what}: non-finite values"
    diff = np.abs(got - ref)
    max_abs = float(diff.max()) if diff.size else 0.0
    rms = float(np.sqrt(np.mean(diff**2))) if diff.size else 0.0
    frac = record(what, max_abs=(max_abs, tol["atol"]), rms=(rms, tol["rms_atol"]))
    print(f"parity {what}: max {frac['max_abs']:.3f}x atol, rms {frac['rms']:.3f}x rms_atol")
    assert max_abs <= tol["atol"] and rms <= tol["rms_atol"], (
        f"{what}: max|diff| {max_abs:.3e} (atol {tol['atol']:.3e}), rms {rms:.3e} (rms_atol {tol['rms_atol']:.3e})"
    )


def check_max_abs(got, ref, limit: float, what: str):
    """max|got-ref| <= limit (the T5 fixtures' criterion, read from their manifests)."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != reference {ref.shape}"
    assert np.all(np.isfinite(got)), f"{what}: non-finite values"
    max_abs = float(np.abs(got - ref).max()) if got.size else 0.0
    frac = record(what, max_abs=(max_abs, limit))
    print(f"parity {what}: max {frac['max_abs']:.3f}x limit")
    assert max_abs <= limit, f"{what}: max|diff| {max_abs:.3e} > {limit:.3e}"
