"""Fuzzing the recipe loader: any YAML text, and any structure near a valid recipe, gives either a Recipe or
the tool's own one-line RecipeError, never another exception."""

from __future__ import annotations

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hpcserve.errors import HpcserveError
from hpcserve.recipe.load import load_recipe

BASE = {"name": "f", "model": {"path": "/m"}, "engine": {"kind": "mock"},
        "cluster": {"backend": "local", "gpus_per_node": 8}, "prefill": {"tp": 4}, "decode": {"tp": 4}}
KEYS = ["name", "model", "path", "engine", "kind", "cluster", "gpus_per_node", "time", "prefill", "decode",
        "workers", "tp", "dp", "nodes", "replicas", "gpus", "args", "router", "port", "sweep", "ports", "base",
        "batch", "benchmark", "env", "sbatch", "timeouts", "mock", "torch", "restart", "critical", "x"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 70000), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["UNLIMITED", "01:00:00", "local", "slurm", "mock"]))
values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=3),
                                                   st.dictionaries(st.sampled_from(KEYS), c, max_size=4)),
                      max_leaves=12)


def _check(tmp_path, text: str, overrides=()) -> None:
    p = tmp_path / "fuzz.yaml"
    p.write_text(text)
    try:
        load_recipe(p, list(overrides))
    except HpcserveError as e:
        assert str(e) and "\n" not in str(e)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.sampled_from(list("abc:{}[]-, \n\t'\"#&*!|>%@`0123456789.=")), max_size=80))
def test_any_text(tmp_path, text):
    _check(tmp_path, text)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.lists(st.sampled_from(KEYS), min_size=1, max_size=3), value=values)
def test_mutations_of_a_valid_recipe(tmp_path, path, value):
    data = yaml.safe_load(yaml.safe_dump(BASE))
    cur = data
    for k in path[:-1]:
        nxt = cur.get(k)
        if not isinstance(nxt, dict):
            nxt = cur[k] = {}
        cur = nxt
    cur[path[-1]] = value
    _check(tmp_path, yaml.safe_dump(data))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.lists(st.sampled_from(KEYS), min_size=1, max_size=3).map(".".join),
       raw=st.text(alphabet=st.sampled_from(list("ab1[]{}:,.- '")), max_size=12))
def test_any_set_override(tmp_path, key, raw):
    _check(tmp_path, yaml.safe_dump(BASE), [f"{key}={raw}"])
