"""Run the numbered notebooks of a profile through papermill, with validated parameters: the
profile's experiment is resolved (with `-p` overrides) and recorded in its manifest first, so
every notebook reads the same one."""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import nbformat
import papermill
from jupyter_client.blocking import BlockingKernelClient
from jupyter_client.manager import AsyncKernelManager
from jupyter_core.utils import run_sync
from papermill.exceptions import PapermillExecutionError
from traitlets import List

from kdlib.errors import ConfigError, RunError
from kdlib.experiment import Experiment, record_experiment
from kdlib.paths import STATIC_ENV, profile_paths, project_root
from kdlib.profiles import load_profile, parse_overrides, profile_file

__all__ = ["list_notebooks", "load_profile", "notebook_parameters", "parse_overrides", "plan_run",
           "profile_file", "run_profile", "split_overrides", "strip_outputs"]

NOTEBOOK_RE = re.compile(r"^(\d\d)_[A-Za-z0-9_]+\.ipynb$")
EXPERIMENT_KEYS = tuple(Experiment.__dataclass_fields__)


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


def split_overrides(overrides: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(`-p` values of experiment settings, the others): the first go into the experiment."""
    overrides = dict(overrides or {})
    exp = {k: v for k, v in overrides.items() if k in EXPERIMENT_KEYS}
    return exp, {k: v for k, v in overrides.items() if k not in exp}


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
    """Pair each selected notebook with its parameters; unknown or mistyped parameters raise
    ConfigError. `overrides` may set experiment settings too (validated by Experiment); a notebook
    parameter named like an experiment setting gets the experiment's value."""
    declared = {nb.stem: notebook_parameters(nb) for nb in notebooks}
    by_prefix = {nb.stem[:2]: nb for nb in notebooks}
    selected = notebooks
    if only:
        missing = [o for o in only if o[:2] not in by_prefix]
        if missing:
            raise ConfigError(f"--only {missing}: no such notebook; choose from {sorted(by_prefix)}")
        selected = [nb for nb in notebooks if nb.stem[:2] in {o[:2] for o in only}]

    shared = dict(profile["parameters"])
    moved = sorted(set(shared) & set(EXPERIMENT_KEYS))
    if moved:
        raise ConfigError(f"profile {profile['name']}: {moved} are experiment settings: move them "
                          "from `parameters:` to `experiment:`")
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
    bad = sorted(set(overrides) - sel_declared - set(EXPERIMENT_KEYS))
    if bad:
        raise ConfigError(f"-p {bad}: neither an experiment setting nor a parameter of the "
                          f"selected notebooks; the experiment takes {sorted(EXPERIMENT_KEYS)}, "
                          f"the notebooks take {sorted(sel_declared)}")
    exp_values = Experiment.from_profile(profile, split_overrides(overrides)[0]).to_dict()

    plan = []
    for nb in selected:
        spec = declared[nb.stem]
        values = {"profile": profile["name"]} if "profile" in spec else {}
        values.update({k: v for k, v in shared.items() if k in spec})
        values.update(profile["notebooks"].get(nb.stem) or {})
        values.update({k: v for k, v in overrides.items() if k in spec})
        values.update({k: v for k, v in exp_values.items() if k in spec})  # one experiment
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
    """Record the profile's experiment (with the experiment settings among `overrides`) in its
    manifest, then execute the profile's notebooks in order with papermill; returns the executed
    copies."""
    profile = load_profile(name)
    notebooks = list_notebooks(notebooks_dir)
    plan = plan_run(profile, notebooks, only, overrides)
    out_dir = profile_paths(profile["name"]).make().notebooks
    exp_overrides = split_overrides(overrides)[0]
    source = str(profile_file(name)) + (f" with -p {exp_overrides}" if exp_overrides else "")
    record_experiment(profile["name"], Experiment.from_profile(profile, exp_overrides), source)
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


WARM_IMPORTS = "import matplotlib.pyplot, pandas, torch"
"""What a notebook's kernel imports before the notebook runs (its first cell imports them again,
at no cost): on the demo the import cells took 0.4-0.7 s instead of 1.8-2.9 s."""


class _Kernel(AsyncKernelManager):
    """A kernel manager that remembers the clients made for it: nbclient leaves open the client
    of a kernel it did not start, so `stop_kernel` closes them."""

    clients = List()

    def client(self, **kwargs: Any) -> Any:
        kc = super().client(**kwargs)
        self.clients.append(kc)
        return kc


def start_kernel(cwd: Path) -> _Kernel:
    """A fresh python3 kernel in `cwd`, already importing WARM_IMPORTS (asynchronously: the call
    returns at once)."""
    km = _Kernel(kernel_name="python3")
    run_sync(km.start_kernel)(cwd=str(cwd), extra_arguments=["--HistoryManager.hist_file=:memory:"])
    kc = BlockingKernelClient()
    kc.load_connection_info(km.get_connection_info())
    km.clients.append(kc)
    kc.start_channels()
    kc.execute(WARM_IMPORTS, silent=True, store_history=False)
    return km


def stop_kernel(km: _Kernel | None) -> None:
    """Stop a kernel of `start_kernel` at once, with its process group, and close its clients.

    At once: the notebook's copy is saved after every cell, and a graceful stop costs 1-3 s
    (interpreter teardown; a kernel that used multiprocessing also waits 2.5 s on the resource
    tracker, which ignores the SIGTERM ipykernel sends its children)."""
    if km is None:
        return
    for kc in km.clients:
        kc.stop_channels()
    if run_sync(km.is_alive)():
        run_sync(km.shutdown_kernel)(now=True)
    else:
        run_sync(km.cleanup_resources)()


def _execute(plan: list[tuple[Path, dict[str, Any]]], name: str, out_dir: Path, log_output: bool,
             progress_bar: bool) -> list[Path]:
    """papermill.execute_notebook for each (notebook, parameters), cwd = the notebook's folder,
    each in a fresh kernel started while the notebook before it runs."""
    done: list[Path] = []
    upcoming = start_kernel(plan[0][0].parent) if plan else None
    try:
        for i, (nb, params) in enumerate(plan):
            out = out_dir / nb.name
            print(f"\n=== {nb.name}  ({name}; {params}) -> {out}", flush=True)
            kernel, upcoming = upcoming, None
            try:
                if i + 1 < len(plan):  # starts, and imports, while this notebook runs
                    upcoming = start_kernel(plan[i + 1][0].parent)
                papermill.execute_notebook(
                    str(nb), str(out), parameters=params, kernel_name="python3",
                    log_output=log_output, progress_bar=progress_bar, cwd=str(nb.parent),
                    km=kernel,
                )
            except PapermillExecutionError as err:
                raise RunError(
                    f"{nb.name} failed in cell [{err.exec_count}] (cell index {err.cell_index}): "
                    f"{err.ename}: {err.evalue}\nThe executed copy with the full traceback is {out}"
                ) from None
            finally:
                stop_kernel(kernel)
            done.append(out)
    finally:
        stop_kernel(upcoming)
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
