"""The environment the suite runs in: dependency versions, and what a user sees on import."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]


def _declared_requirements() -> list[Requirement]:
    """pyproject.toml's runtime and test requirements (the ranges the suite was written for)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: read the installed metadata instead
        names = importlib.metadata.requires("rlhf_jax") or []
        reqs = [Requirement(r) for r in names]
        return [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": "test"})]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [
        Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]
    ]


def test_installed_versions_are_inside_the_declared_ranges():
    """A dependency outside its range is named here, instead of failing some assertion later."""
    problems = []
    for req in _declared_requirements():
        try:
            installed = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{req.name} is not installed (pyproject.toml asks for {req})")
            continue
        if not req.specifier.contains(installed, prereleases=True):
            problems.append(f"{req.name} {installed} is installed, outside {req}")
    assert not problems, (
        "the suite was written for the ranges in pyproject.toml; reinstall with "
        "`pip install -e '.[test]'`:\n  " + "\n  ".join(problems)
    )


_HIDE_TORCH = """
import importlib.util
_find = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a, **k: (
    None if name.split(".")[0] == "torch" else _find(name, *a, **k))
"""


def _stderr_of(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", _HIDE_TORCH + code], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_no_pytorch_advice_without_pytorch():
    """rlhf_jax uses transformers for tokenizers and configs only: its "PyTorch was not found"
    advice is not shown to users who installed without torch."""
    if "PyTorch was not found" not in _stderr_of("import transformers"):
        pytest.skip("this transformers does not warn about a missing PyTorch")
    err = _stderr_of("import rlhf_jax, transformers; transformers.AutoConfig")
    assert "PyTorch was not found" not in err, err
