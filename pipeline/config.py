"""The one config system: pydantic models loaded from YAML in ``configs/``, with dotted
``--set key.sub=value`` overrides on the command line. The resolved config is what gets
logged to MLflow with each run.

A key may go through list entries by index (``--set labels.0.positive=[yes]``) and into a
section that is null or absent in the YAML (``--set negative_sampling.rates={like: 0.1}``).
Every problem is a :class:`pipeline.errors.ConfigError` naming where it comes from: the YAML
file (with line and column for a syntax error) or the ``--set`` override, and the key.

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

from pipeline.errors import ConfigError

ConfigT = TypeVar("ConfigT", bound=BaseModel)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """``line L, column C: problem`` of a YAML error (its own text names no file we can use)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem


def _index(node: list[Any], part: str, item: str, done: list[str]) -> int:
    """``part`` as an index into list ``node`` (reached by the keys ``done``) for override ``item``."""
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"--set {item}: {'.'.join(done)} is a list of {len(node)} entries; "
                          f"{part!r} is not an index in 0..{len(node) - 1}")
    return int(part)


def _step(node: Any, part: str, item: str, done: list[str]) -> Any:
    """The child ``part`` of ``node`` for override ``item``; null or absent sections become ``{}``."""
    if isinstance(node, list):
        i = _index(node, part, item, done)
        child = node[i]
        if child is None:
            child = node[i] = {}
    else:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
    if not isinstance(child, (dict, list)):
        raise ConfigError(f"--set {item}: {'.'.join([*done, part])} is a value ({child!r}), not a section or list")
    return child


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides in place; values are parsed as YAML (``3``, ``[1,2]``, ``true``).

    Raises:
        ConfigError: naming the override (not ``key=value``, bad YAML value, a path through a
            plain value or past the end of a list).
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item}: not of the form key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"--set {item}: empty key or key part")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item}: value is not valid YAML ({_yaml_problem(exc)})") from None
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            node = _step(node, part, item, parts[:i])
        last = parts[-1]
        if isinstance(node, list):
            node[_index(node, last, item, parts[:-1])] = value
        else:
            node[last] = value
    return data


def _describe(exc: ValidationError, source: str, overrides: list[str]) -> str:
    """One line per pydantic error: ``<file or --set override>: <key>: <problem>``.

    An error is blamed on the override whose key is the error's key or lies above/below it,
    otherwise on the file (or the defaults)."""
    keys = [(item, item.split("=", 1)[0].strip().split(".")) for item in overrides]
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        blamed = [item for item, k in keys if loc and (loc[: len(k)] == k or k[: len(loc)] == loc)]
        where = f"--set {blamed[-1]}" if blamed else source  # the last override of a key wins
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        value = err.get("input")
        if err["type"] != "extra_forbidden" and isinstance(value, (int, float, str, bool)) and len(repr(value)) < 60:
            msg += f" (got {value!r})"
        lines.append(f"{where}: {'.'.join(loc)}: {msg}" if loc else f"{where}: {msg}")
    return "\n".join(lines)


def load_config(cls: type[ConfigT], path: str | Path | None, overrides: list[str] | None = None) -> ConfigT:
    """Load ``cls`` from a YAML file (or defaults when ``path`` is None) plus overrides.

    Raises:
        ConfigError: a missing or unparsable file, a bad override, or invalid content; the
            message names the file or the ``--set`` override and the key.
    """
    data: dict[str, Any] = {}
    overrides = list(overrides or [])
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML at {_yaml_problem(exc)}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read config file: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        data = loaded
    data = apply_overrides(data, overrides)
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid {cls.__name__} config:\n{_describe(exc, source, overrides)}") from None


def resolve_config_path(path: str | Path) -> Path:
    """``path`` as given when it exists (or is absolute), else relative to the project: configs
    named ``configs/...`` are found from any working directory (``ray job submit`` runs in a copy)."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return Path(__file__).resolve().parents[1] / p


def dump_config(config: BaseModel) -> str:
    """The resolved config as YAML (what is logged with a run)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
