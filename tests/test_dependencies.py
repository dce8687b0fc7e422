"""Dependency bounds: pyproject.toml states ranges, constraints.txt (the tested set) lies inside them,
constraints-lowest.txt pins every floor (the `lowest` CI stage runs the suite with it), and an installed
version outside a range fails `import mmloom` with one clear message."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from mmloom import dependencies

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11 (CI); 3.10 has no TOML reader in the stdlib
ROOT = Path(__file__).resolve().parents[1]


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]


def pins(name: str) -> dict[str, Version]:
    out = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", line
            out[canonicalize_name(requirement.name)] = Version(spec.version)
    return out


def test_every_bound_has_a_floor_and_excludes_the_next_major():
    for requirement in declared():
        operators = {spec.operator for spec in requirement.specifier}
        assert ">=" in operators and "<" in operators, f"{requirement}: floor and upper bound"


def test_lowest_constraints_pin_every_floor_and_the_tested_set_fits():
    lowest, tested = pins("constraints-lowest.txt"), pins("constraints.txt")
    for requirement in declared():
        name = canonicalize_name(requirement.name)
        floor = next(Version(s.version) for s in requirement.specifier if s.operator == ">=")
        assert lowest.get(name) == floor, f"constraints-lowest.txt must pin {name}=={floor}"
        assert requirement.specifier.contains(tested[name], prereleases=True), f"{name} {tested[name]} not in {requirement}"
    assert list(lowest)[0] == "torch" and tested["torch"] == lowest["torch"]  # torch pinned, installed first


def test_installed_versions_are_supported():
    assert dependencies.problems() == []


def test_an_unsupported_version_fails_with_one_clear_message(monkeypatch):
    real = metadata.version
    monkeypatch.setattr(dependencies.metadata, "version",
                        lambda name: "4.49.0" if canonicalize_name(name) == "transformers" else real(name))
    with pytest.raises(dependencies.UnsupportedDependencyError) as info:
        dependencies.check_installed()
    message = str(info.value)
    assert "transformers 4.49.0 is installed, mmloom supports transformers" in message and "<6" in message
    assert "make install" in message
    monkeypatch.setenv("MMLOOM_SKIP_VERSION_CHECK", "1")
    dependencies.check_installed()


def test_import_mmloom_refuses_an_unsupported_version(tmp_path):
    """A real interpreter whose `transformers` reports 4.49.0: `import mmloom` stops with the message."""
    (tmp_path / "sitecustomize.py").write_text(
        "from importlib import metadata\n"
        "_real = metadata.version\n"
        "metadata.version = lambda n: '4.49.0' if n.lower() == 'transformers' else _real(n)\n")
    proc = subprocess.run([sys.executable, "-c", "import mmloom"], capture_output=True, text=True,
                          env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "mmloom.dependencies.UnsupportedDependencyError: transformers 4.49.0 is installed")
