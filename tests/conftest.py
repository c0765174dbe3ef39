"""Test session setup, before JAX initialises.

* 8 host CPU devices for the whole session, so sharding tests build their meshes in process
  (tests on one device use the first and do not notice the others);
* parity fixtures are fp32 references: full-precision matmuls everywhere (the CPU default,
  but TPU/GPU default to bf16 passes).
"""

import os
from pathlib import Path

os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")


# Tests never read or write the user's compilation cache (the cache tests pass their own
# folder). A session-wide cache shared by the workers cut the summed test time by 14%, but it
# was backed out with the crashes XLA had in full runs of the issue 13 merge (see .wip/): a
# suite that compiles everything is the simpler thing to debug them in.
os.environ["MAGI_JAX_CACHE_DIR"] = "off"


# ---------------------------------------------------------------- parity report
# Every parity comparison (tests/parity.py `record`) rides on its test's report, so the
# summary also works under pytest-xdist, where tests run in worker processes.

import json  # noqa: E402

import pytest  # noqa: E402

_REPORT: list[dict] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if call.when == "call":
        import parity

        rep = outcome.get_result()
        for rec in parity.RECORDS:
            rep.user_properties.append(("parity", dict(rec, test=item.nodeid)))
        parity.RECORDS.clear()


def pytest_runtest_logreport(report):
    if report.when == "call":
        _REPORT.extend(value for name, value in report.user_properties if name == "parity")


def pytest_terminal_summary(terminalreporter):
    if not _REPORT:
        return
    rows = sorted(_REPORT, key=lambda r: -r["fraction"])
    tr = terminalreporter
    tr.section("parity: error as a fraction of the fixture's tolerance (worst first)")
    for r in rows:
        parts = "  ".join(f"{k[: -len('_fraction')]} {v:.3f}" for k, v in r.items() if k.endswith("_fraction"))
        tr.write_line(f"{r['fraction']:7.3f}  {r['what']}  ({parts})")
    path = os.environ.get("MAGI_PARITY_REPORT")
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(rows, indent=1))
        tr.write_line(f"parity report written to {path}")
