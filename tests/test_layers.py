"""The import direction of the packages, read from their source, and what a pure statistics report loads.

store (bottom) <- sim <- tasks (sim, store); store <- vla (never sim, tasks or harness: it sees observations as
arrays and strings); harness (tasks, vla, store, sim) <- bench <- scripts. Imports inside functions count too.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OURS = {"store", "sim", "tasks", "vla", "harness", "bench"}
ALLOWED = {  # what each package may import of ours besides itself
    "store": set(),
    "sim": set(),
    "tasks": {"sim", "store"},
    "vla": {"store"},
    "harness": {"store", "sim", "tasks", "vla"},
    "bench": {"store", "sim", "tasks", "vla", "harness"},
    "scripts": OURS,
}


def imported_packages(path: Path) -> set[str]:
    """Our top-level packages that the module at ``path`` imports anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & OURS


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_follow_the_layers(package):
    wrong = {str(path.relative_to(REPO)): sorted(imported_packages(path) - ALLOWED[package] - {package})
             for path in sorted((REPO / package).rglob("*.py"))}
    assert not {path: names for path, names in wrong.items() if names}


def test_a_statistics_report_loads_neither_torch_nor_transformers():
    code = "import sys, tasks.report, tasks.metrics; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"
