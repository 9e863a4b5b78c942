"""Declared = imported: every third-party import is a declared dependency, and every dependency is used."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from functools import cache
from importlib.metadata import packages_distributions
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIRST_PARTY = {"rbee_worker", "rbee_control", "tests", "bench"}
#: Imported only when present, to recognise huggingface_hub's own network errors (its 1.x HTTP layer).
GUARDED = {"httpx2"}
#: Used through uvicorn's httptools protocol (rbee_worker/app/connections.py), never imported by name.
USED_BY_NAME = {"httptools"}
#: Import names of distributions named otherwise, for those not installed in this venv.
ALIASES = {"llama_cpp": "llama-cpp-python", "yaml": "pyyaml", "ruamel": "ruamel.yaml"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _names(requirements: list[str]) -> set[str]:
    return {_norm(re.match(r"[A-Za-z0-9._-]+", r)[0]) for r in requirements}  # type: ignore[index]


def _project() -> dict:  # type: ignore[type-arg]
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _imports(*roots: str) -> set[str]:
    found: set[str] = set()
    for root in roots:
        for path in (REPO / root).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    found |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m not in FIRST_PARTY}


def _distributions(module: str) -> set[str]:
    """The distributions that may provide `module`: from this venv, else its usual name (not installed)."""
    return {_norm(name) for name in _installed().get(module, [ALIASES.get(module, module)])}


@cache
def _installed() -> dict[str, list[str]]:
    return dict(packages_distributions())


def _undeclared(modules: set[str], declared: set[str]) -> list[str]:
    return sorted(m for m in modules if not _distributions(m) & declared)


def test_the_packages_import_exactly_what_they_declare() -> None:
    project = _project()
    extras = project["optional-dependencies"]
    runtime = _names(project["dependencies"])
    optional = _names(extras["llama"]) | _names(extras["ctransformers"])
    modules = _imports("rbee_worker", "rbee_control") - GUARDED
    assert _undeclared(modules, runtime | optional) == [], "imported, never declared"
    provided = set().union(*(_distributions(m) for m in modules | USED_BY_NAME))
    assert sorted(runtime - provided) == [], "declared, never imported"


def test_tests_and_benchmarks_import_only_what_their_extras_install() -> None:
    project = _project()
    declared = _names(project["dependencies"]).union(
        *(_names(requirements) for requirements in project["optional-dependencies"].values())
    )
    bench_siblings = {"native_server", "relay", "worker_overhead"}  # bench/ run as scripts import these
    modules = _imports("tests", "bench") - bench_siblings
    assert _undeclared(modules, declared) == []
