"""The documentation stays true: the site builds strictly, the recipe reference matches the schema, the README
stays short with the two set-up commands first, and every shell block is run by a named test or marked as
needing a GPU cluster."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hpcserve.recipe.reference import BEGIN, END, markdown, rows
from hpcserve.recipe.schema import Recipe

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
RUN_BY = re.compile(r"<!-- run-by: (tests/[\w/]+\.py)::(\w+) -->|<!-- run-by: (tests/run\.sh) -->")
GPU_MARK = "<!-- needs: gpu-cluster -->"
SHELL_LANGS = {"bash", "sh", "shell", "console"}
SHELL_STARTS = ("$ ", "python -m", "hpcserve ", "eval ", "curl ", "pip ", "bash ", "sbatch ")


def fenced_blocks(text: str) -> list[tuple[int, str, list[str]]]:
    """(line number of the opening fence, language, body lines) of every fenced block."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = re.match(r"^```(\w*)", lines[i])
        if m:
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            out.append((i + 1, m.group(1), lines[i + 1:j]))
            i = j
        i += 1
    return out


def is_shell(lang: str, body: list[str]) -> bool:
    first = next((line.strip() for line in body if line.strip()), "")
    return lang in SHELL_LANGS or (lang == "" and first.startswith(SHELL_STARTS))


def test_reference_block_matches_schema():
    page = (REPO / "docs/recipes.md").read_text()
    start, end = page.index(BEGIN), page.index(END) + len(END)
    assert page[start:end] == markdown(), "regenerate: python -m hpcserve.recipe.reference"


def test_every_schema_field_documented():
    page = (REPO / "docs/recipes.md").read_text()
    keys = [k for k, _, _ in rows(Recipe)]
    assert "prefill.args" in keys and "cluster.gpus_per_node" in keys and "router.prefill_policy" in keys
    missing = [key for key in keys if f"| `{key}` |" not in page]
    assert not missing, f"not documented in docs/recipes.md: {missing}"


def test_readme_is_short_and_starts_with_the_two_setup_commands():
    assert len(README.splitlines()) <= 200
    first_block = README.split("```bash", 1)[1].split("```", 1)[0].strip().splitlines()
    assert len(first_block) == 2
    assert "hpcserve up recipes/local-demo.yaml" in first_block[0]
    assert first_block[1].startswith("bash tests/run.sh")


def test_readme_links_resolve():
    broken = [link for link in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
              if not link.startswith("http") and not (REPO / link).exists()]
    assert not broken, f"README links to missing files: {broken}"


def test_every_shell_block_is_run_by_a_test_or_marked():
    unmarked, dangling = [], []
    for page in PAGES:
        text = page.read_text()
        lines = text.splitlines()
        for lineno, lang, body in fenced_blocks(text):
            if not is_shell(lang, body):
                continue
            above = "\n".join(lines[max(0, lineno - 3):lineno - 1])
            where = f"{page.relative_to(REPO)}:{lineno}"
            if GPU_MARK in above:
                continue
            marks = RUN_BY.findall(above)
            if not marks:
                unmarked.append(where)
            for path, name, script in marks:   # a test function, or the test command itself (CI runs it)
                if script:
                    if not (REPO / script).exists():
                        dangling.append(f"{where} -> {script}")
                    continue
                test_file = REPO / path
                if not test_file.exists() or not re.search(rf"^(async )?def {name}\(", test_file.read_text(), re.M):
                    dangling.append(f"{where} -> {path}::{name}")
    assert not unmarked, f"shell blocks with neither a run-by nor a gpu-cluster mark: {unmarked}"
    assert not dangling, f"run-by marks naming no test: {dangling}"


def test_fenced_block_parser_sees_shell_blocks():
    text = "a\n```bash\nls\n```\n```\n$ hpcserve up x\n```\n```\nplain diagram\n```\n"
    blocks = fenced_blocks(text)
    assert [(n, lang) for n, lang, _ in blocks] == [(2, "bash"), (5, ""), (8, "")]
    assert [is_shell(lang, body) for _, lang, body in blocks] == [True, True, False]


def test_mkdocs_build_strict(tmp_path):
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    assert mkdocs, "mkdocs is installed by tests/run.sh (test extra)"
    res = subprocess.run([mkdocs, "build", "--strict", "-d", str(tmp_path / "site")], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").exists()
    assert (tmp_path / "site" / "recipes" / "index.html").exists()


@pytest.mark.parametrize("page", ["getting-started.md", "index.md"])
def test_setup_commands_agree_across_pages(page):
    first = README.split("```bash", 1)[1].split("```", 1)[0].strip()
    assert first in (REPO / "docs" / page).read_text()
