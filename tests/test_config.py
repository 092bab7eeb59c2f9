"""pipeline.config: ``--set`` reaches list entries and null sections; every error names its
source (the YAML file, with line and column for a syntax error, or the ``--set`` override) and
the key, as one message without a chained traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict

from pipeline.config import load_config


class Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str
    weight: float = 1.0


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k: int = 0


class Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seed: int = 0
    files: list[Entry] = []
    section: Section | None = None


@pytest.fixture()
def yaml_file(tmp_path: Path) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text("seed: 1\nfiles:\n  - {path: a.csv}\n  - {path: b.csv}\nsection: null\n")
    return path


def error_of(path: Path | None, overrides: list[str]) -> ValueError:
    with pytest.raises(ValueError) as info:
        load_config(Cfg, path, overrides)
    # one readable message: no chained pydantic/YAML traceback behind it
    exc = info.value
    assert exc.__cause__ is None and (exc.__context__ is None or exc.__suppress_context__)
    return info.value


def test_set_reaches_list_entries_and_null_sections(yaml_file: Path) -> None:
    cfg = load_config(Cfg, yaml_file, ["files.1.path=x.csv", "files.0.weight=2", "section.k=3"])
    assert [f.path for f in cfg.files] == ["a.csv", "x.csv"] and cfg.files[0].weight == 2.0
    assert cfg.section == Section(k=3)


def test_set_past_a_list_or_through_a_value(yaml_file: Path) -> None:
    msg = str(error_of(yaml_file, ["files.2.path=x"]))
    assert msg == "--set files.2.path=x: files is a list of 2 entries; '2' is not an index in 0..1"
    msg = str(error_of(yaml_file, ["seed.x=1"]))
    assert msg.startswith("--set seed.x=1: seed is a value (1), not a section")


def test_errors_blame_the_override_not_the_file(yaml_file: Path) -> None:
    msg = str(error_of(yaml_file, ["seed=abc"]))
    assert "--set seed=abc: seed: Input should be a valid integer" in msg
    assert str(yaml_file) not in msg
    assert "--set nope=1: nope: unknown key" in str(error_of(yaml_file, ["nope=1"]))
    assert "--set files.0.colour=red: files.0.colour: unknown key" in str(error_of(yaml_file, ["files.0.colour=red"]))
    msg = str(error_of(yaml_file, ["seed=[1,"]))
    assert msg.startswith("--set seed=[1,: value is not valid YAML")
    assert str(error_of(yaml_file, ["seed"])) == "--set seed: not of the form key=value"


def test_errors_in_the_file_name_the_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("seed: 1\nfiles:\n  - {path: a.csv, weight: heavy}\n")
    msg = str(error_of(path, ["seed=2"]))
    assert f"{path}: files.0.weight: Input should be a valid number" in msg and "--set" not in msg
    path.write_text("seed: 1\nfiles: [{path: a.csv}\n")
    msg = str(error_of(path, []))
    assert msg.startswith(f"{path}: invalid YAML at line ") and "column" in msg
    path.write_text("- 1\n")
    assert str(error_of(path, [])) == f"{path}: top level must be a mapping, got list"
    assert str(error_of(tmp_path / "none.yaml", [])) == f"{tmp_path / 'none.yaml'}: config file not found"
