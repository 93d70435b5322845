"""The recipe reference in docs/recipes.md, generated from the schema (a test keeps the page in sync with it)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from hpcserve.recipe.schema import Recipe

BEGIN, END = "<!-- recipe-reference:begin -->", "<!-- recipe-reference:end -->"


def _sub_model(ann: Any) -> type[BaseModel] | None:
    for a in (ann, *getattr(ann, "__args__", ())):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


def _default(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    if field.default_factory is not None:
        v = field.default_factory()
        return "{}" if isinstance(v, BaseModel) else repr(v)
    return repr(field.default)


def rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str]]:
    out = []
    for name, field in model.model_fields.items():
        key = prefix + name
        sub = _sub_model(field.annotation)
        out.append((key, _default(field) if sub is None else "section", field.description or ""))
        if sub is not None:
            out += rows(sub, key + ".")
    return out


def markdown() -> str:
    lines = [BEGIN, "", "| key | default | meaning |", "| --- | --- | --- |"]
    for key, default, desc in rows(Recipe):
        lines.append(f"| `{key}` | {default.replace('|', '/')} | {desc.replace('|', '/')} |")
    return "\n".join(lines + ["", END])


if __name__ == "__main__":
    print(markdown())
