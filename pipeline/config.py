"""The one config system: pydantic models loaded from YAML in ``configs/``, with dotted
``--set key.sub=value`` overrides on the command line. The resolved config is what gets
logged to MLflow with each run.

Example:
    >>> from pydantic import BaseModel
    >>> class C(BaseModel):
    ...     seed: int = 0
    >>> load_config(C, None, ["seed=3"]).seed
    3
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

ConfigT = TypeVar("ConfigT", bound=BaseModel)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides; values are parsed as YAML (``3``, ``[1,2]``, ``true``)."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def load_config(cls: type[ConfigT], path: str | Path | None, overrides: list[str] | None = None) -> ConfigT:
    """Load ``cls`` from a YAML file (or defaults when ``path`` is None) plus overrides.

    Raises ``ValueError`` naming the file and the offending key on invalid content."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        data = loaded
    data = apply_overrides(data, overrides or [])
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ValueError(f"{path or '<defaults>'}: invalid {cls.__name__}:\n{exc}") from exc


def dump_config(config: BaseModel) -> str:
    """The resolved config as YAML (what is logged with a run)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
