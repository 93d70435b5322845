"""Package layers (docs/architecture.md): a package may import only packages of a lower layer, so there are
no package cycles. Every import counts, including the ones inside functions (lazy imports keep the login node
light; they do not make a back-import legal)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Higher imports lower, never the reverse. Same rank: neither may import the other.
RANKS = {
    "__main__": 110, "cli": 100,
    "api": 90,
    "doctor": 85,
    "status": 80,
    "control": 75,
    "agent": 70,
    "backends": 60,
    "batch": 50, "bench": 50, "router": 50,
    "torchengine": 45,
    "mock": 42,
    "engine_shell": 40,
    "render": 35,
    "plan": 30,
    "stacks": 27, "containers": 27,
    "recipe": 20,
    "engines": 15,
    "cmdline": 10,
    "registry": 5, "http": 5, "rundir": 5,
    "errors": 0, "aio": 0, "__init__": 0,
}


def package_imports(root: Path) -> dict[tuple[str, str], list[str]]:
    """(importing package, imported package) -> the files where that import is written."""
    name = root.name
    edges: dict[tuple[str, str], list[str]] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        src = rel.parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module] + [f"{node.module}.{a.name}" for a in node.names] if node.module == name else [node.module]
            else:
                continue
            for mod in mods:
                parts = mod.split(".")
                if parts[0] == name and len(parts) > 1 and parts[1] != src:
                    edges.setdefault((src, parts[1]), []).append(f"{rel}:{node.lineno}")
    return edges


def violations(root: Path, ranks: dict[str, int]) -> list[str]:
    out = []
    packages = {p.name.removesuffix(".py") for p in root.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    out += [f"{pkg}: no layer assigned in tests/project/test_layers.py RANKS" for pkg in sorted(packages - set(ranks))]
    for (src, dst), where in sorted(package_imports(root).items()):
        if src in ranks and dst in ranks and ranks[src] <= ranks[dst]:
            out.append(f"{src} -> {dst} (layer {ranks[src]} may not import layer {ranks[dst]}): {', '.join(where)}")
    return out


def test_hpcserve_packages_import_only_lower_layers():
    assert violations(REPO / "hpcserve", RANKS) == []


def test_a_back_import_is_caught(tmp_path):
    pkg = tmp_path / "demo"
    for sub, body in {"low": "X = 1\n", "high": "from demo.low import X\n"}.items():
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text(body)
    (pkg / "__init__.py").write_text("")
    ranks = {"high": 2, "low": 1, "__init__": 0}
    assert violations(pkg, ranks) == []
    (pkg / "low" / "late.py").write_text("def f():\n    from demo.high import thing\n")
    assert violations(pkg, ranks) == ["low -> high (layer 1 may not import layer 2): low/late.py:2"]
    (pkg / "new").mkdir()
    (pkg / "new" / "__init__.py").write_text("")
    assert "new: no layer assigned in tests/project/test_layers.py RANKS" in violations(pkg, ranks)
