"""Profiles: the YAML files in profiles/ that set a whole workbook run (the experiment and the
notebooks' own parameters), and `key=value` overrides from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kdlib.config import read_yaml
from kdlib.errors import ConfigError
from kdlib.paths import project_root

PROFILE_KEYS = ("description", "experiment", "parameters", "notebooks")


def profile_file(name: str) -> Path:
    """The YAML file of profile `name` (a name in profiles/ or a path to a .yaml file)."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    folder = project_root() / "profiles"
    path = folder / f"{name}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in folder.glob("*.yaml"))
        raise ConfigError(f"unknown profile {name!r}; choose one of {names} or give a .yaml path")
    return path


def load_profile(name: str) -> dict[str, Any]:
    """Read a profile: {description, experiment: {...}, parameters: {...}, notebooks: {NN_name:
    {...}}, name}; missing sections are empty."""
    path = profile_file(name)
    data = read_yaml(path)
    unknown = set(data) - set(PROFILE_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown top-level keys {sorted(unknown)}; valid: "
                          f"{sorted(PROFILE_KEYS)}")
    for section in ("experiment", "parameters", "notebooks"):
        data[section] = data.get(section) or {}
        if not isinstance(data[section], dict):
            raise ConfigError(f"{path}: `{section}` must be a mapping of settings")
    data["name"] = path.stem
    return data


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """`key=value` strings -> dict, values parsed as YAML (`3`, `0.5`, `[1, 4]`, `null`, text)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"parameter {item!r} must look like key=value, e.g. epochs=5")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return out
