"""Run the numbered notebooks of a profile through papermill, with validated parameters."""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import nbformat
import papermill
import yaml
from papermill.exceptions import PapermillExecutionError

from kdlib.config import read_yaml
from kdlib.errors import ConfigError, RunError
from kdlib.paths import STATIC_ENV, profile_paths, project_root

NOTEBOOK_RE = re.compile(r"^(\d\d)_[A-Za-z0-9_]+\.ipynb$")
PROFILE_KEYS = {"description", "parameters", "notebooks"}


def list_notebooks(folder: str | Path | None = None) -> list[Path]:
    """The numbered notebooks (`NN_name.ipynb`) of `folder` (default: the project's notebooks/), in order."""
    folder = Path(folder) if folder else project_root() / "notebooks"
    found = sorted(p for p in folder.glob("*.ipynb") if NOTEBOOK_RE.match(p.name))
    if not found:
        raise ConfigError(f"no numbered notebooks (NN_name.ipynb) in {folder}")
    return found


def notebook_parameters(path: str | Path) -> dict[str, dict[str, Any]]:
    """The parameters cell of a notebook: name -> {inferred_type_name, default, help} (papermill)."""
    return dict(papermill.inspect_notebook(str(path)))


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
    """Read a profile: {description, parameters: {...}, notebooks: {NN_name: {...}}}."""
    path = profile_file(name)
    data = read_yaml(path)
    unknown = set(data) - PROFILE_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown top-level keys {sorted(unknown)}; valid: {sorted(PROFILE_KEYS)}")
    data["parameters"] = data.get("parameters") or {}
    data["notebooks"] = data.get("notebooks") or {}
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


def _type_ok(value: Any, type_name: str) -> bool:
    """Loose check of a value against papermill's inferred type name of the parameters cell."""
    t = type_name.replace(" ", "")
    if t.startswith("Optional[") and t.endswith("]"):
        return value is None or _type_ok(value, t[len("Optional["):-1])
    if value is None:
        return "None" in t
    base = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,),
            "list": (list,), "dict": (dict,)}
    for name, types in base.items():
        if t == name or t.startswith(name + "["):
            if name in ("int", "float") and isinstance(value, bool):
                return False
            return isinstance(value, types)
    return True  # unions and unannotated parameters are not checked


def plan_run(
    profile: dict[str, Any],
    notebooks: list[Path],
    only: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> list[tuple[Path, dict[str, Any]]]:
    """Pair each selected notebook with its parameters; unknown or mistyped parameters raise ConfigError."""
    declared = {nb.stem: notebook_parameters(nb) for nb in notebooks}
    by_prefix = {nb.stem[:2]: nb for nb in notebooks}
    selected = notebooks
    if only:
        missing = [o for o in only if o[:2] not in by_prefix]
        if missing:
            raise ConfigError(f"--only {missing}: no such notebook; choose from {sorted(by_prefix)}")
        selected = [nb for nb in notebooks if nb.stem[:2] in {o[:2] for o in only}]

    shared = dict(profile["parameters"])
    every = set().union(*(set(d) for d in declared.values()))
    unknown = sorted(set(shared) - every)
    if unknown:
        raise ConfigError(f"profile {profile['name']}: parameters {unknown} are declared by no notebook")
    for stem, extra in profile["notebooks"].items():
        if stem not in declared:
            raise ConfigError(f"profile {profile['name']}: no notebook {stem!r}; have {sorted(declared)}")
        bad = sorted(set(extra or {}) - set(declared[stem]))
        if bad:
            raise ConfigError(f"profile {profile['name']}: {stem} declares no parameters {bad}; "
                              f"it has {sorted(declared[stem])}")
    overrides = dict(overrides or {})
    sel_declared = set().union(*(set(declared[nb.stem]) for nb in selected))
    bad = sorted(set(overrides) - sel_declared)
    if bad:
        raise ConfigError(f"-p {bad}: not a parameter of the selected notebooks; "
                          f"they take {sorted(sel_declared)}")

    plan = []
    for nb in selected:
        spec = declared[nb.stem]
        values = {"profile": profile["name"]} if "profile" in spec else {}
        values.update({k: v for k, v in shared.items() if k in spec})
        values.update(profile["notebooks"].get(nb.stem) or {})
        values.update({k: v for k, v in overrides.items() if k in spec})
        for key, value in values.items():
            type_name = str(spec[key].get("inferred_type_name", ""))
            if not _type_ok(value, type_name):
                raise ConfigError(f"{nb.name}: parameter {key}={value!r} should be {type_name}")
        plan.append((nb, values))
    return plan


def run_profile(
    name: str,
    only: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
    notebooks_dir: str | Path | None = None,
    log_output: bool = True,
    progress_bar: bool = True,
) -> list[Path]:
    """Execute the profile's notebooks in order with papermill; returns the executed copies."""
    profile = load_profile(name)
    notebooks = list_notebooks(notebooks_dir)
    plan = plan_run(profile, notebooks, only, overrides)
    out_dir = profile_paths(profile["name"]).make().notebooks
    if log_output:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    previous = os.environ.get(STATIC_ENV)
    os.environ[STATIC_ENV] = "1"  # the kernels inherit it: no widget front end under papermill
    try:
        return _execute(plan, profile["name"], out_dir, log_output, progress_bar)
    finally:
        if previous is None:
            os.environ.pop(STATIC_ENV, None)
        else:
            os.environ[STATIC_ENV] = previous


def _execute(plan: list[tuple[Path, dict[str, Any]]], name: str, out_dir: Path, log_output: bool,
             progress_bar: bool) -> list[Path]:
    """papermill.execute_notebook for each (notebook, parameters), cwd = the notebook's folder."""
    done = []
    for nb, params in plan:
        out = out_dir / nb.name
        print(f"\n=== {nb.name}  ({name}; {params}) -> {out}", flush=True)
        try:
            papermill.execute_notebook(
                str(nb), str(out), parameters=params, kernel_name="python3",
                log_output=log_output, progress_bar=progress_bar, cwd=str(nb.parent),
            )
        except PapermillExecutionError as err:
            raise RunError(
                f"{nb.name} failed in cell [{err.exec_count}] (cell index {err.cell_index}): "
                f"{err.ename}: {err.evalue}\nThe executed copy with the full traceback is {out}"
            ) from None
        done.append(out)
    return done


def strip_outputs(path: str | Path) -> bool:
    """Remove outputs and execution counts from a notebook in place; True when it changed."""
    nb = nbformat.read(str(path), as_version=4)
    changed = False
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        if cell.get("outputs") or cell.get("execution_count") is not None:
            changed = True
        cell["outputs"], cell["execution_count"] = [], None
        for key in ("execution", "papermill"):
            if cell.metadata.pop(key, None) is not None:
                changed = True
    if nb.metadata.pop("papermill", None) is not None:
        changed = True
    if changed:
        nbformat.write(nb, str(path))
    return changed
