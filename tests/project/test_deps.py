"""Every package in pyproject's [project] dependencies is imported somewhere in hpcserve/ (a dependency
installed on every login node must earn its place). Distribution names map to import names through
importlib.metadata.packages_distributions(); imports are read with ast, including those inside functions."""

from __future__ import annotations

import ast
import re
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(pyproject: Path) -> list[str]:
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    return [_norm(re.match(r"[A-Za-z0-9._-]+", d.strip()).group(0)) for d in deps]


def imported(root: Path) -> set[str]:
    """Top-level module names imported by any .py file under ``root`` (absolute imports only)."""
    names = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def unused(dists: list[str], modules: set[str], dist_of: dict[str, list[str]]) -> list[str]:
    """The declared distributions none of whose import names appears in ``modules``."""
    used = {_norm(d) for m in modules for d in dist_of.get(m, [])}
    return [d for d in dists if d not in used]


def test_every_declared_dependency_is_imported_by_the_package():
    dists = declared(REPO / "pyproject.toml")
    mapping = packages_distributions()
    installed = {_norm(d) for ds in mapping.values() for d in ds}
    missing = [d for d in dists if d not in installed]
    assert not missing, f"declared but not installed here (pip install -e .): {missing}"
    bad = unused(dists, imported(REPO / "hpcserve"), mapping)
    assert not bad, f"declared in pyproject.toml but imported nowhere in hpcserve/: {bad}; use them or remove them"


def test_the_check_catches_an_unused_dependency(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("import yaml\n\ndef f():\n    from prometheus_client import parser\n")
    mods = imported(tmp_path / "pkg")
    assert mods == {"yaml", "prometheus_client"}
    mapping = {"yaml": ["PyYAML"], "prometheus_client": ["prometheus_client"], "submitit": ["submitit"]}
    assert unused(["pyyaml", "prometheus-client", "submitit"], mods, mapping) == ["submitit"]
