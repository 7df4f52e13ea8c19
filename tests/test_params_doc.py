"""docs/parameters.md is what the generator writes from the pydantic models."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from transferline import params_doc
from transferline.params import DataParams, FinetuneParams, Params

REPO = Path(__file__).resolve().parents[1]


def all_fields(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from all_fields(ann, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field


def test_committed_page_is_what_the_generator_writes():
    committed = (REPO / params_doc.PAGE).read_text(encoding="utf-8")
    assert committed == params_doc.render(), (
        "docs/parameters.md is out of date: run `python -m transferline.params_doc`"
    )


def test_a_changed_description_changes_the_page(monkeypatch):
    before = params_doc.render()
    field = FinetuneParams.model_fields["learning_rate"]
    monkeypatch.setattr(field, "description", "The learning rate at its highest.")
    after = params_doc.render()
    assert after != before
    assert (
        "| `finetune.learning_rate` | `1e-05` | number (> 0) | The learning rate at its highest. |"
        in after
    )


def test_every_key_has_a_description_and_a_row():
    page = params_doc.render()
    for key, field in all_fields(Params):
        assert field.description, f"{key} has no description in params.py"
        assert f"| `{key}` |" in page


@pytest.mark.parametrize(
    ("key", "accepted"),
    [
        ("data.layout", "`auto` or `class_folders` or `presplit` or `filename` or `csv`"),
        ("seed", "integer (≥ 0, ≤ 4,294,967,295)"),
        ("finetune.augment.zoom", "number (≥ 0, < 1)"),
        ("data.labels.label_column", "string or list of strings or `null`"),
        ("split.max_per_class", "integer or `null` (≥ 1)"),
    ],
)
def test_accepted_values_come_from_the_annotations(key, accepted):
    row = next(line for line in params_doc.render().splitlines() if line.startswith(f"| `{key}` |"))
    assert row.split(" | ")[2] == accepted


def test_the_required_key_says_so():
    assert DataParams.model_fields["dataset"].is_required()
    row = next(line for line in params_doc.render().splitlines() if "`data.dataset`" in line[:20])
    assert row.split(" | ")[1] == "required"


def test_main_writes_the_page(tmp_path):
    target = tmp_path / "parameters.md"
    assert params_doc.main([str(target)]) == 0
    assert target.read_text(encoding="utf-8") == params_doc.render()
