"""The suite runs d2v2 as installed: no top-level folder of the repository (kernels/, models/, engine/,
bench/) shadows an installed distribution of the same name, in the test process or in the Pythons it starts.

transformers imports Hugging Face's ``kernels`` distribution; with the repository root on sys.path,
``import kernels`` found the repository's folder instead and every Hugging Face export test failed.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL = ("kernels", "models", "engine", "bench")
WHERE = """
import importlib.util, json, sys
spec = importlib.util.find_spec(sys.argv[1])
print(json.dumps(None if spec is None else spec.origin or list(spec.submodule_search_locations or [])))
"""


def _in_repository(location) -> bool:
    paths = location if isinstance(location, list) else [location] if location else []
    return any(Path(p).resolve().is_relative_to(ROOT) for p in paths if p not in ("built-in", "frozen"))


def _where(name: str):
    spec = importlib.util.find_spec(name)
    return None if spec is None else spec.origin or list(spec.submodule_search_locations or [])


@pytest.mark.parametrize("name", TOP_LEVEL)
def test_top_level_name_does_not_resolve_into_the_repository(name):
    location = _where(name)
    assert not _in_repository(location), f"`import {name}` resolves into the repository ({location}): sys.path = {sys.path}"


@pytest.mark.parametrize("name", TOP_LEVEL)
def test_an_installed_distribution_of_that_name_is_the_one_imported(name):
    owners = importlib.metadata.packages_distributions().get(name)
    if not owners:
        pytest.skip(f"no installed distribution provides a top-level `{name}`")
    files = {Path(f.locate()).resolve() for d in owners for f in importlib.metadata.distribution(d).files or ()}
    location = _where(name)
    folders = [Path(p).resolve() for p in (location if isinstance(location, list) else [Path(location).parent])]
    assert any(f.is_relative_to(folder) for f in files for folder in folders), (
        f"`import {name}` resolves to {location}, not to the installed distribution {', '.join(owners)}"
    )


@pytest.mark.skipif(sys.version_info < (3, 11), reason="PYTHONSAFEPATH needs Python 3.11")
@pytest.mark.parametrize("flag", ["-c", "-m"])
def test_a_python_started_at_the_root_does_not_see_the_folders(flag, tmp_path):
    """The tests start Pythons with the repository root as working directory (`python -m d2v2...`)."""
    if flag == "-m":
        (tmp_path / "where_probe.py").write_text(WHERE)
        argv = [sys.executable, "-m", "where_probe", "kernels"]
        env = dict(os.environ, PYTHONPATH=str(tmp_path))
    else:
        argv, env = [sys.executable, "-c", WHERE, "kernels"], dict(os.environ)
    run = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    location = json.loads(run.stdout)
    assert not _in_repository(location), f"a child Python at the root resolves `kernels` to {location}"
