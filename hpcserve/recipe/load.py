"""Recipe loading: YAML (with line numbers) + cluster profile + --set overrides + sweep -> Recipe(s).

Every failure is a RecipeError whose message is one line: ``file:line key.path: problem (fix)``.
"""

from __future__ import annotations

import copy
import difflib
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from hpcserve.errors import RecipeError
from hpcserve.recipe.schema import ClusterSpec, Recipe

PROFILE_DIRS = ("slurm/clusters",)


@dataclass(frozen=True)
class Source:
    """Where values came from, for error messages: file name + key path -> line."""

    file: str
    lines: dict[tuple, int]

    def where(self, path: tuple) -> str:
        p = tuple(path)
        while p and p not in self.lines:
            p = p[:-1]
        line = self.lines.get(p)
        return f"{self.file}:{line}" if line else self.file


def _lines(node: yaml.Node, path: tuple = ()) -> dict[tuple, int]:
    out: dict[tuple, int] = {}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = k.value
            out[path + (key,)] = k.start_mark.line + 1
            out.update(_lines(v, path + (key,)))
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out[path + (i,)] = v.start_mark.line + 1
            out.update(_lines(v, path + (i,)))
    return out


def read_yaml(path: Path) -> tuple[dict, Source]:
    try:
        text = path.read_text()
    except OSError as e:
        raise RecipeError(f"{path}: cannot read ({e.strerror}); check the path") from None
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"{path}{line}: invalid YAML: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}:1: expected a mapping of keys at the top level")
    return data, Source(str(path), _lines(node) if node is not None else {})


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the sub-model that a validation error location points into."""
    cur: Any = model
    for part in loc[:-1]:
        if isinstance(part, int) or not (isinstance(cur, type) and issubclass(cur, BaseModel)):
            return []
        field = cur.model_fields.get(part)
        if field is None:
            return []
        ann = field.annotation
        args = [a for a in getattr(ann, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
        cur = args[0] if args else ann
    if isinstance(cur, type) and issubclass(cur, BaseModel):
        return list(cur.model_fields)
    return []


def format_error(err: ValidationError | dict, model: type[BaseModel], src: Source, prefix: tuple = ()) -> str:
    """A validation error (the first one, or the given error dict) as one line with location, key and fix."""
    e = err.errors()[0] if isinstance(err, ValidationError) else err
    loc = tuple(p for p in e["loc"] if p != "__root__")
    key = ".".join(str(p) for p in prefix + loc) or "(top level)"
    where = src.where(prefix + loc)
    if e["type"] == "extra_forbidden":
        choices = _fields_at(model, loc)
        near = difflib.get_close_matches(str(loc[-1]), choices, n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else f" (allowed: {', '.join(choices)})" if choices else ""
        return f"{where} {key}: unknown key{hint}"
    if e["type"] == "missing":
        return f"{where} {key}: required key is missing; add it"
    msg = e["msg"].removeprefix("Value error, ")
    m = re.match(r"^([A-Za-z_]+(?:\.[A-Za-z_-]+)*): (.*)$", msg)
    if m and (not loc or m.group(1).startswith(".".join(map(str, loc)) + ".")):   # a check that names its key
        kp = tuple(m.group(1).split("."))
        return f"{src.where(prefix + kp)} {m.group(1)}: {m.group(2)}"
    if e["type"] not in ("value_error", "assertion_error") and "input" in e:
        msg += f" (got {e['input']!r})"
    return f"{where} {key}: {msg}"


def _error_key(err: dict) -> tuple[str, ...]:
    """The key path an error is about: its location, or the key a whole-recipe check names in its message
    ("router.port: port 99999 is outside ...")."""
    loc = tuple(str(p) for p in err["loc"] if p != "__root__")
    m = re.match(r"^([A-Za-z_]+(?:\.[A-Za-z_-]+)*): ", err["msg"].removeprefix("Value error, "))
    if m and (not loc or m.group(1).startswith(".".join(loc) + ".")):
        return tuple(m.group(1).split("."))
    return loc


def _resolve_profile(ref: str, recipe_dir: Path) -> Path:
    candidates = [recipe_dir / ref, Path.cwd() / ref]
    candidates += [Path.cwd() / d / ref for d in PROFILE_DIRS]
    for c in candidates:
        if c.is_file():
            return c
    raise RecipeError(f"cluster profile {ref!r} not found (looked next to the recipe and in "
                      f"{', '.join(PROFILE_DIRS)}); fix the path")


def load_profile(path: Path) -> dict:
    data, src = read_yaml(path)
    try:
        ClusterSpec.model_validate(data)
    except ValidationError as e:
        raise RecipeError(format_error(e, ClusterSpec, src)) from None
    return data


def parse_set(item: str) -> tuple[tuple[str, ...], Any]:
    if "=" not in item:
        raise RecipeError(f"--set {item!r}: expected key.path=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    path = tuple(p for p in key.strip().split("."))
    if not all(path):
        raise RecipeError(f"--set {item!r}: empty key segment")
    return path, value


def set_path(data: dict, path: tuple[str, ...], value: Any) -> None:
    cur = data
    for part in path[:-1]:
        nxt = cur.get(part)
        if nxt is None:
            nxt = cur[part] = {}
        if not isinstance(nxt, dict):
            raise RecipeError(f"--set {'.'.join(path)}: {part!r} is not a mapping")
        cur = nxt
    cur[path[-1]] = value


def _has_path(model: type[BaseModel], path: tuple[str, ...]) -> bool:
    """A sweep key must name a schema field or an existing free-form entry (args/env)."""
    cur_model: Any = model
    for part in path:
        if isinstance(cur_model, type) and issubclass(cur_model, BaseModel):
            if part not in cur_model.model_fields:
                return False
            ann = cur_model.model_fields[part].annotation
            subs = [a for a in getattr(ann, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
            cur_model = subs[0] if subs else (ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None)
        else:   # inside a free-form dict: accept any key (args are open by design)
            cur_model = None
    return True


@dataclass(frozen=True)
class LoadedRecipe:
    recipe: Recipe
    raw: dict          # resolved (profile inlined, overrides applied), what recipe.resolved.yaml holds
    point: dict        # sweep values of this point ({} when not a sweep)
    source: Source
    notes: tuple[str, ...] = ()   # what the user should know about how the recipe was resolved


def cluster_override_notes(recipe_cluster, profile: dict, ref: str) -> tuple[str, ...]:
    """--cluster replaces a recipe's own cluster section: name every setting of it that changes, so a
    01:00:00 limit does not silently become the profile's 00:30:00."""
    if not isinstance(recipe_cluster, dict):
        return ()
    changed = [f"{k} {recipe_cluster[k]!r} -> {profile.get(k)!r}" for k in recipe_cluster
               if profile.get(k) != recipe_cluster[k]]
    return (f"--cluster {ref} replaces the recipe's own cluster settings: {', '.join(changed)}",) if changed else ()


def load_recipe(path: str | Path, overrides: list[str] = (), cluster: str | None = None) -> list[LoadedRecipe]:
    """Load, resolve and validate a recipe; a sweep gives one LoadedRecipe per point, in order."""
    path = Path(path)
    data, src = read_yaml(path)
    data = copy.deepcopy(data)
    notes: tuple[str, ...] = ()
    if cluster is not None:
        own = data.get("cluster")
        data["cluster"] = cluster
        if isinstance(own, dict):
            notes = cluster_override_notes(own, load_profile(_resolve_profile(cluster, path.parent)), cluster)
    if isinstance(data.get("cluster"), str):
        data["cluster"] = load_profile(_resolve_profile(data["cluster"], path.parent))
    for item in overrides:
        key, value = parse_set(item)
        if key[0] == "cluster" and isinstance(data.get("cluster"), str):
            data["cluster"] = load_profile(_resolve_profile(data["cluster"], path.parent))
        set_path(data, key, value)
        try:
            Recipe.model_validate({k: v for k, v in data.items() if k != "sweep"} | {"sweep": {}})
        except ValidationError as e:
            for err in e.errors():
                if _error_key(err)[: len(key)] == key:   # the override's value is at fault, not the file
                    msg = format_error(err, Recipe, Source("--set", {})).split(": ", 1)[1]
                    raise RecipeError(f"--set {item}: {msg}") from None
    batch = data.get("batch")
    if isinstance(batch, dict):   # batch files are relative to the recipe, like cluster profiles
        for k in ("input", "output"):
            if isinstance(batch.get(k), str) and not Path(batch[k]).is_absolute():
                batch[k] = str((path.parent / batch[k]).resolve())
    sweep = data.get("sweep") or {}
    if not isinstance(sweep, dict):
        raise RecipeError(f"{src.where(('sweep',))} sweep: expected a mapping of dotted keys to lists")
    points: list[dict] = [{}]
    if sweep:
        for key, values in sweep.items():
            kpath = tuple(str(key).split("."))
            if not _has_path(Recipe, kpath) or kpath[0] == "sweep":
                raise RecipeError(f"{src.where(('sweep', key))} sweep.{key}: no such recipe key; "
                                  f"sweep over an existing key such as prefill.args.chunked-prefill-size")
            if not isinstance(values, list) or not values:
                raise RecipeError(f"{src.where(('sweep', key))} sweep.{key}: expected a non-empty list of values")
        keys = list(sweep)
        points = [dict(zip(keys, combo)) for combo in itertools.product(*(sweep[k] for k in keys))]
    out = []
    for point in points:
        d = copy.deepcopy(data)
        d.pop("sweep", None)
        for key, value in point.items():
            set_path(d, tuple(str(key).split(".")), value)
        try:
            recipe = Recipe.model_validate(d)
        except ValidationError as e:
            suffix = f" [sweep point {point}]" if point else ""
            raise RecipeError(format_error(e, Recipe, src) + suffix) from None
        if point and recipe.serve.continuous:
            raise RecipeError(f"{src.where(('serve', 'continuous'))} serve.continuous: a sweep's points end one "
                              f"after another; remove the sweep or set serve.continuous: false")
        out.append(LoadedRecipe(recipe=recipe, raw=d, point=point, source=src, notes=notes))
    return out


def point_name(index: int, point: dict) -> str:
    return f"point-{index:02d}" if point else ""
