"""Cheap guards that keep the code's shape: thin script shells, no file past ~400 lines, no edits of the import
path (everything is imported from the installed packages)."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("store", "sim", "tasks", "vla", "harness")


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "scripts").glob("*.py")))
def test_a_script_is_a_thin_shell(script):
    lines = [line for line in (REPO / "scripts" / script).read_text().splitlines() if line.strip()]
    assert len(lines) <= 60, f"scripts/{script} has {len(lines)} non-blank lines; move the work into a package"


@pytest.mark.parametrize("package", PACKAGES)
def test_no_file_of_a_package_passes_400_lines(package):
    long = {str(p.relative_to(REPO)): n for p in sorted((REPO / package).rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"split these by concern: {long}"


def reads_the_import_path(path: Path) -> bool:
    return any(isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
               and node.value.id == "sys" for node in ast.walk(ast.parse(path.read_text())))


def test_nothing_edits_the_import_path():
    edits = [str(p.relative_to(REPO)) for folder in (*PACKAGES, "bench", "scripts", "tests")
             for p in sorted((REPO / folder).rglob("*.py")) if reads_the_import_path(p)]
    assert not edits
