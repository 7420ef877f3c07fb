"""Cheap guards that keep the code's shape: thin script shells, no file past ~400 lines, no edits of the import
path (everything is imported from the installed packages), and an install that fits CPU and CUDA users alike."""

import ast
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

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


def test_torch_is_a_range_that_a_cuda_build_meets_and_the_cpu_extra_pins_the_cpu_build():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    torch, = (Requirement(r) for r in project["dependencies"] if Requirement(r).name == "torch")
    assert Version("2.14.1") in torch.specifier and Version("2.13.0") in torch.specifier  # a range, not a pin
    cpu, = (Requirement(r) for r in project["optional-dependencies"]["cpu"])
    assert cpu.name == "torch" and str(cpu.specifier) == "==2.13.0"  # the CPU build on this machine's disk
    commands = re.findall(r"pip install -e (\S+) &&", (REPO / "README.md").read_text().split("## Layout")[0])
    ci = (REPO / ".ci" / "run").read_text()
    assert commands == ['".[cpu]"', '".[cpu,test]"'] and 'pip install -q -e ".[cpu,test]"' in ci
