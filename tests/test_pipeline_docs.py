"""docs/pipeline.md documents every project-file key."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from distillgate.pipeline.project import Project

DOC = (Path(__file__).resolve().parent.parent / "docs" / "pipeline.md").read_text()


def keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out += keys(annotation, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


def test_every_project_key_is_documented() -> None:
    missing = [k for k in keys(Project) if f"`{k}`" not in DOC and f"`{k}`," not in DOC]
    assert not missing, f"document these keys in docs/pipeline.md: {missing}"
