"""docs/dataset_config.md is the reference of every dataset-config field: generated from the
pydantic models by scripts/dataset_config_doc.py. A field added without a description, or a
model changed without regenerating the file, fails here."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from pydantic import BaseModel

from pipeline.config import load_config
from pipeline.datasets import DatasetConfig, _Strict

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def doc_script():
    spec = importlib.util.spec_from_file_location("dataset_config_doc", ROOT / "scripts" / "dataset_config_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def undocumented(models: list[type[BaseModel]]) -> list[str]:
    return [f"{m.__name__}.{name}" for m in models for name, f in m.model_fields.items() if not (f.description or "").strip()]


def test_every_field_of_every_model_has_a_description(doc_script) -> None:
    found = doc_script.models()
    assert DatasetConfig in found and len(found) >= 12  # every nested model is reached
    assert not undocumented(found), "fields without a description (a string literal under the field)"


def test_the_reference_is_current(doc_script) -> None:
    text = (ROOT / "docs" / "dataset_config.md").read_text()
    assert text == doc_script.render() + "\n", "docs/dataset_config.md is stale: run python scripts/dataset_config_doc.py"
    for m in doc_script.models():
        for name in m.model_fields:
            assert f"| `{name}` |" in text.split(f"## {m.__name__}\n", 1)[1], f"{m.__name__}.{name}"


class _NewSection(_Strict):
    documented: int = 0
    """Has a description."""
    added_later: int = 0


def test_a_new_field_without_a_description_is_caught(doc_script) -> None:
    class WithNewSection(DatasetConfig):
        new_section: _NewSection | None = None
        """A new section."""

    assert undocumented(doc_script.models(WithNewSection)) == ["_NewSection.added_later"]


def test_the_worked_example_in_the_reference_is_the_shipped_config() -> None:
    text = (ROOT / "docs" / "dataset_config.md").read_text()
    example = (ROOT / "configs" / "datasets" / "movielens.yaml").read_text().rstrip()
    assert f"```yaml\n{example}\n```" in text
    load_config(DatasetConfig, ROOT / "configs" / "datasets" / "movielens.yaml")  # valid as shipped
    assert "python -m pipeline preprocess --raw ml-latest-small --out data/movielens --config configs/datasets/movielens.yaml" in text
