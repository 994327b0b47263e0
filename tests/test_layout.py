"""Guard the house: arrows between layers point one way, no import cycle, no own-``__init__``
import, no oversized function or module, a cheap configuration import, and no test module
imported by another test or a benchmark (what they share lives in helper and harness modules).

The layer order is docs/architecture.md's picture; moving a module across it is a deliberate
change made here and there together.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO_ROOT

PACKAGES = ("dht", "node", "bootstrap")
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 500

# A module may import only from layers of a lower rank than its own (and from its own layer).
LAYER_RANK = {
    "dht": 0,
    "node._version": 0,
    "node.run_config": 1,
    "node.model_files": 1,  # the "hf" family's files and digests, checked as the run config loads
    "node.model_config": 1,  # [run.model], part of the run config
    "node.config": 2,
    "node.model": 3,
    "node.model_hf": 3,
    "node.model_lora": 3,
    "node.tokens": 3,
    "node.data": 3,
    "node.sketch": 3,
    "node.wire_meter": 3,
    "node.runtime": 3,
    "node.ledger": 3,  # receipts and contributor rows; the DHT summary is dht/ledger.py
    "node.capacity": 4,
    "node.secagg": 4,
    "node.aggregation": 5,
    "node.training": 6,
    "node.sharding": 7,  # its trainer writes the training report (node/training/report.py)
    "node.metrics": 7,  # fed by the training report
    "node.progress": 7,  # shows the training report
    "node.demo": 8,
    "node.export": 8,
    "node.generate": 8,
    "node.cli": 9,
    "node": 10,  # the package map imports only __version__
    "bootstrap": 1,  # imports dht only
}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO_ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every absolute import of our packages in a file, type-only ones included: (line, module)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            targets = [name for name in names if name in MODULES] or [node.module]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            continue
        found += [(node.lineno, target) for target in targets if target.split(".")[0] in PACKAGES]
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "node":
        return parts[0]
    return "node" if len(parts) == 1 else f"node.{parts[1]}"


def test_every_module_has_a_layer() -> None:
    """A new top-level module of ``node`` is placed in the layer order on purpose."""
    # Assert
    assert sorted({_layer(m) for m in MODULES} - set(LAYER_RANK)) == []


def test_imports_point_down_the_layers() -> None:
    """cli -> training / sharding -> aggregation -> secagg -> config -> dht: never back up."""
    # Execute
    upward = [
        f"{MODULES[m].relative_to(REPO_ROOT)}:{line} imports {target}"
        for m in MODULES
        for line, target in _imports(MODULES[m])
        if LAYER_RANK[_layer(target)] > LAYER_RANK[_layer(m)]
        or (_layer(m) == "bootstrap" and _layer(target) != "bootstrap" and not target.startswith("dht"))
    ]

    # Assert
    assert upward == []


def test_no_import_cycle() -> None:
    """The module graph, type-only imports included, has no cycle."""
    # Prepare
    graph = {
        m: {t if t in MODULES else t.rsplit(".", 1)[0] for _, t in _imports(p)} & MODULES.keys()
        for m, p in MODULES.items()
    }
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module] - {module}):
            if target == module.split(".")[0]:
                continue  # importing one's own package face is the next test's concern
            if state.get(target) == 1:
                cycles.append([*stack[stack.index(target) :], target] if target in stack else [module, target])
            elif target not in state:
                visit(target, [*stack, target])
        state[module] = 2

    # Execute
    for module in sorted(graph):
        if module not in state:
            visit(module, [module])

    # Assert
    assert cycles == []


def test_no_module_imports_its_own_package_face() -> None:
    """Modules import from modules, never from their own package's ``__init__``."""
    # Execute
    offenders = [
        f"{path.relative_to(REPO_ROOT)}:{line} imports {target}"
        for module, path in MODULES.items()
        for line, target in _imports(path)
        if path.name != "__init__.py"
        and module.startswith(f"{target}.")
        and MODULES.get(target, path).name == "__init__.py"
    ]

    # Assert
    assert offenders == []


def test_no_test_module_is_imported_by_tests_or_benchmarks() -> None:
    """Tests and benchmarks share ``helpers``, ``conftest`` and the ``*_harness`` modules, never a ``test_*`` one."""
    # Prepare
    sources = sorted((REPO_ROOT / "tests").glob("*.py")) + sorted((REPO_ROOT / "benchmarks").glob("*.py"))

    # Execute
    offenders = [
        f"{path.relative_to(REPO_ROOT)}:{node.lineno} imports {name}"
        for path in sources
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Import | ast.ImportFrom)
        for name in ([node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names])
        if name.split(".")[0].startswith("test_")
    ]

    # Assert
    assert offenders == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_functions_and_modules_stay_small(module: str) -> None:
    """No function over 80 lines, no module over 500 (split by concept when one grows)."""
    # Prepare
    source = MODULES[module].read_text()

    # Execute
    long_functions = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and (node.end_lineno or node.lineno) - node.lineno + 1 > MAX_FUNCTION_LINES
    ]

    # Assert
    assert long_functions == []
    assert len(source.splitlines()) <= MAX_MODULE_LINES


def test_loading_the_config_does_not_import_hivemind_or_torch() -> None:
    """``import node.config`` stays cheap: the CLI checks a config file before the network stack loads."""
    # Execute
    result = subprocess.run(
        [sys.executable, "-c", "import sys, node.config; print('hivemind' in sys.modules, 'torch' in sys.modules)"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=60,
    )

    # Assert
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]
