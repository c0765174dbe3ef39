"""Discovery of upstream parity fixtures and the per-array comparison they prescribe.

Fixtures live in `tests/fixtures/parity` (a copy of the shared set, so the suite needs
nothing outside the repo) and, when `MAGI_PARITY_DIR` is set, in that folder too (same
layout). Everything is found through manifests and dispatched on `kind`:

  * `<root>/manifest.json` lists the DiT / VAE / schedule / ... fixtures;
  * `<root>/t5/*/manifest.json` are the text-encoder fixtures, one folder each.

A fixture present in both places with identical content runs once.
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


def roots() -> list[tuple[str, Path]]:
    out = [("", BUNDLED)]
    extra = os.environ.get(ENV_VAR)
    if extra:
        path = Path(extra).expanduser().resolve()
        if not path.is_dir():
            raise RuntimeError(f"{ENV_VAR}={extra} is not a folder")
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


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@functools.cache
def _all() -> tuple[Fixture, ...]:
    found, seen = [], set()
    for tag, root in roots():
        manifest = root / "manifest.json"
        if manifest.exists():
            for entry in json.loads(manifest.read_text())["fixtures"]:
                fx = Fixture(entry["name"], entry["kind"], root, dict(entry["files"]), tag)
                key = (fx.kind, _digest(fx.path("json")))
                if key not in seen:
                    seen.add(key)
                    found.append(fx)
        for sub in sorted(root.glob("t5/*/manifest.json")):
            meta = json.loads(sub.read_text())
            fx = Fixture(sub.parent.name, meta["kind"], sub.parent, {"json": "manifest.json"}, tag)
            key = (fx.kind, _digest(sub))
            if key not in seen:
                seen.add(key)
                found.append(fx)
    return tuple(found)


def fixtures(kind: str) -> list[Fixture]:
    return [fx for fx in _all() if fx.kind == kind]


def data_file(name: str) -> Path:
    """A file listed under `data_files` of the bundled manifest (e.g. special_tokens.npz)."""
    return BUNDLED / name


def cases(kind: str, lister) -> list:
    """pytest params, one per (fixture, case); `lister(fixture)` yields (case_name, case)."""
    params = []
    for fx in fixtures(kind):
        for case_name, case in lister(fx):
            params.append(pytest.param(fx, case, id=f"{fx.id}/{case_name}"))
    return params


def check_array(got, ref, tol: dict, what: str):
    """The fixtures' criterion: max|got-ref| <= atol and rms(got-ref) <= rms_atol."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != reference {ref.shape}"
    diff = np.abs(got - ref)
    assert np.all(np.isfinite(got)), f"{what}: non-finite values"
    max_abs = float(diff.max()) if diff.size else 0.0
    rms = float(np.sqrt(np.mean(diff**2))) if diff.size else 0.0
    assert max_abs <= tol["atol"] and rms <= tol["rms_atol"], (
        f"{what}: max|diff| {max_abs:.3e} (atol {tol['atol']:.3e}), rms {rms:.3e} (rms_atol {tol['rms_atol']:.3e})"
    )
