"""The package installs with its variants, and declares exactly what it imports."""

import ast
import re
import sys
import tomllib
from pathlib import Path

import pytest

from magi_jax import config

ROOT = Path(__file__).resolve().parent.parent
# import name -> distribution name, where they differ
DISTRIBUTION = {"bs4": "beautifulsoup4", "orbax": "orbax-checkpoint", "imageio_ffmpeg": "imageio-ffmpeg"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!\[; ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _requirements(section: str) -> list[str]:
    """The requirement lines of requirements.txt's `section`: "runtime" (up to the first
    optional section), "optional" (the pyproject extras' part) or "tests"."""
    out = {"runtime": [], "optional": [], "tests": []}
    part = "runtime"
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if line.startswith("# Optional"):
            part = "optional"
        elif line.startswith("# Tests"):
            part = "tests"
        elif line.strip() and not line.startswith("#"):
            out[part].append(line.split("#")[0].strip())
    return out[section]


def _imported_distributions() -> set[str]:
    found = set()
    for path in (ROOT / "magi_jax").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("magi_jax", "__future__"):
                    found.add(DISTRIBUTION.get(top, top).lower().replace("_", "-"))
    return found


def test_requirements_list_what_is_imported():
    """Runtime and optional requirements together are exactly what magi_jax imports."""
    listed = {_name(r) for r in _requirements("runtime") + _requirements("optional")}
    assert listed == _imported_distributions()


def test_pyproject_dependencies_equal_requirements():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["dependencies"] == _requirements("runtime")
    extras = project["optional-dependencies"]
    assert sorted(sum((v for k, v in extras.items() if k != "test"), [])) == sorted(_requirements("optional"))
    assert extras["test"] == _requirements("tests")
    assert any(r.startswith("jax>=0.7.1") for r in project["dependencies"]), "jax.set_mesh needs jax >= 0.7.1"


@pytest.mark.parametrize("name", config.VARIANTS)
def test_variants_ship_inside_the_package(name):
    path = config.CONFIG_DIR / f"{name}.json"
    assert path.is_file() and path.parent.parent == Path(config.__file__).parent
    assert config.load_config(name) == config.load_config(ROOT / "configs" / f"{name}.json")  # the top-level link


def _internal_imports(path: Path) -> set[str]:
    """magi_jax modules `path` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "magi_jax":
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("magi_jax."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("magi_jax.")}
    return found


def test_no_import_circles():
    graph = {p.stem: _internal_imports(p) for p in (ROOT / "magi_jax").glob("*.py")}
    state = {}  # 1 visiting, 2 done

    def visit(module, trail):
        if state.get(module) == 1:
            raise AssertionError("import circle: " + " -> ".join([*trail[trail.index(module) :], module]))
        if state.get(module) == 2:
            return
        state[module] = 1
        for dep in sorted(graph.get(module, ())):
            visit(dep, [*trail, module])
        state[module] = 2

    for module in sorted(graph):
        visit(module, [])
