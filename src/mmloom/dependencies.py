"""Installed dependency versions checked against the bounds mmloom declares (pyproject.toml).

``import mmloom`` calls :func:`check_installed`: a dependency outside its declared range (e.g.
transformers 4.x, whose models lack ``transformers.initialization``; or a next major release nobody
tested) fails at once with one message naming the package, the installed version, the supported
range and how to install the tested set, instead of a ``ModuleNotFoundError`` from a private module
deep inside a command. The bounds are read from the installed package's metadata, so pyproject.toml
stays the single place that states them. Set ``MMLOOM_SKIP_VERSION_CHECK=1`` to bypass the check.
"""

from __future__ import annotations

import os
from importlib import metadata

INSTALL_HINT = "install the tested set with `make install` (pip install -c constraints.txt -e .)"


class UnsupportedDependencyError(ImportError):
    """An installed dependency is outside the range mmloom declares; the message says which and how to fix."""


def problems(distribution: str = "mmloom") -> list[str]:
    """One line per declared dependency (extras excluded) that is missing or outside its range."""
    from packaging.requirements import Requirement

    try:
        requirements = metadata.requires(distribution) or []
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return []
    found = []
    for text in requirements:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        try:
            installed = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            found.append(f"{requirement.name} is not installed (mmloom needs {requirement})")
            continue
        if requirement.specifier and not requirement.specifier.contains(installed, prereleases=True):
            found.append(f"{requirement.name} {installed} is installed, mmloom supports {requirement}")
    return found


def check_installed(distribution: str = "mmloom") -> None:
    """Raise :class:`UnsupportedDependencyError` listing every dependency outside its declared range."""
    if os.environ.get("MMLOOM_SKIP_VERSION_CHECK") == "1":
        return
    found = problems(distribution)
    if found:
        raise UnsupportedDependencyError("; ".join(found) + f". {INSTALL_HINT}")
