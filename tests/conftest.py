"""Test session setup, before JAX initialises.

* 8 host CPU devices for the whole session, so sharding tests build their meshes in process
  (tests on one device use the first and do not notice the others);
* parity fixtures are fp32 references: full-precision matmuls everywhere (the CPU default,
  but TPU/GPU default to bf16 passes);
* programs are compiled for compile speed (below).
"""

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

# The suite is mostly XLA compilation of tiny models whose programs then run for
# milliseconds, so tests compile with XLA's backend optimisations off and, on CPU, without
# the MLIR fusion emitters: the full suite took 19:53 on 2 cores, 8:40 this way. The
# programs are the same; results differ from optimised ones by float rounding only (every
# parity fixture passes either way, at about the same fraction of its tolerance).
# MAGI_TEST_COMPILE=optimized runs the suite compiled as users' runs are. The flags go to
# subprocesses too (the command-line tests) through the environment; one this XLA does not
# know would abort it, so each is tried once (in the controller; xdist workers inherit it).
# They are the options random-weight initialisers compile with (compile_cache.RUN_ONCE_OPTIONS).
from magi_jax.compile_cache import RUN_ONCE_OPTIONS  # noqa: E402  (imports no jax)

FAST_COMPILE = tuple(f"--{k}={str(v).lower()}" for k, v in RUN_ONCE_OPTIONS.items())


def _fast_compile():
    flags = os.environ.get("XLA_FLAGS", "")
    if os.environ.get("MAGI_TEST_COMPILE") == "optimized" or all(f in flags.split() for f in FAST_COMPILE):
        return

    def known(*extra):
        env = {**os.environ, "XLA_FLAGS": " ".join([flags, *extra]), "JAX_PLATFORMS": "cpu"}
        probe = [sys.executable, "-c", "import jax; jax.devices()"]
        return subprocess.run(probe, env=env, capture_output=True).returncode == 0

    use = list(FAST_COMPILE) if known(*FAST_COMPILE) else [f for f in FAST_COMPILE if known(f)]
    os.environ["XLA_FLAGS"] = " ".join([flags, *use]).strip()


_fast_compile()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")


# ---------------------------------------------------------------- compilation cache
# Tests never read or write the user's compilation cache. They share one of their own, new
# for each session and removed after it: the xdist workers, and the generate commands they
# run, compile a program once (most TINY runs are the same few programs). The cache tests
# pass their own folder. The folder is named after xdist's run id, which the controller picks
# here and hands to its workers. (A segfault in an executable's serialization once took this
# out: SavedProgram then re-serialized executables JAX's cache had served, which XLA:CPU does
# without part of their machine code; it no longer does.)

SESSION_CACHE: Path | None = None


def pytest_configure(config):
    global SESSION_CACHE
    from magi_jax import compile_cache

    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")  # in a worker: the controller's id
    if run is None:  # the controller, or a session without workers
        run = config.option.testrunuid = getattr(config.option, "testrunuid", None) or uuid.uuid4().hex
    folder = Path(tempfile.gettempdir()) / f"magi-jax-tests-{run}"
    if not folder.exists():  # the session's first process (the controller) owns it
        folder.mkdir(mode=0o700)
        SESSION_CACHE = folder
    os.environ["MAGI_JAX_CACHE_DIR"] = str(folder)
    compile_cache.enable()


def pytest_unconfigure(config):
    # only the process that made the folder removes it, after every worker has stopped: a
    # worker, or a pytest run inside a test (the parity notebook's), inherits the run id and
    # would remove it under the others
    if SESSION_CACHE is not None:
        shutil.rmtree(SESSION_CACHE, ignore_errors=True)


# ---------------------------------------------------------------- parity report
# Every parity comparison (tests/parity.py `record`) rides on its test's report, so the
# summary also works under pytest-xdist, where tests run in worker processes.

import json  # noqa: E402

import pytest  # noqa: E402

_REPORT: list[dict] = []


@pytest.fixture(autouse=True)
def _bounded_mappings():
    """A test worker compiles hundreds of programs, and every one stays mapped in JAX's
    caches: past compile_cache.MAPPINGS_HIGH regions they are dropped after a test (and
    before a SavedProgram compiles), before the process reaches Linux's limit (XLA's next
    compile would then crash)."""
    yield
    from magi_jax import compile_cache

    compile_cache.relieve_mappings()


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
