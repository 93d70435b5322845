"""README stays true: the recipe reference matches the schema; the two set-up commands lead the file."""

from __future__ import annotations

from pathlib import Path

from hpcserve.recipe.reference import BEGIN, END, markdown, rows
from hpcserve.recipe.schema import Recipe

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_reference_block_matches_schema():
    start, end = README.index(BEGIN), README.index(END) + len(END)
    assert README[start:end] == markdown(), "regenerate: python -m hpcserve.recipe.reference"


def test_every_schema_field_documented():
    keys = [k for k, _, _ in rows(Recipe)]
    assert "prefill.args" in keys and "cluster.gpus_per_node" in keys and "router.prefill_policy" in keys
    for key in keys:
        assert f"| `{key}` |" in README, f"{key} is not documented in README"


def test_setup_commands_first():
    first_block = README.split("```bash", 1)[1].split("```", 1)[0].strip().splitlines()
    assert len(first_block) == 2
    assert "hpcserve up recipes/local-demo.yaml" in first_block[0]
    assert first_block[1].startswith("bash tests/run.sh")
