"""Where a profile's data, runs and figures live, relative to the project root."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

HOME_ENV = "KDLIB_HOME"
"""Environment variable that moves data/, runs/ and figures/ elsewhere (the tests use it)."""

STATIC_ENV = "KDLIB_STATIC_FIGURES"
"""Set by the papermill runner (no widget front end there): viewers draw static figures."""


def project_root(start: str | Path | None = None) -> Path:
    """The folder holding `notebooks/` and `pyproject.toml`, found by walking up from `start` (cwd)."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "notebooks").is_dir():
            return folder
    return Path(__file__).resolve().parent.parent


def output_root() -> Path:
    """Root of the generated folders: $KDLIB_HOME when set, else the project root."""
    home = os.environ.get(HOME_ENV)
    return Path(home).resolve() if home else project_root()


@dataclass(frozen=True)
class ProfilePaths:
    """The generated folders of one profile."""

    profile: str
    data: Path  # generated datasets and slice caches
    runs: Path  # one folder per training run, plus splits and the manifest
    figures: Path  # PDF/PNG figures and CSV/LaTeX tables for the thesis
    notebooks: Path  # executed notebook copies written by the runner

    def make(self) -> ProfilePaths:
        """Create every folder and return self."""
        for p in (self.data, self.runs, self.figures, self.notebooks):
            p.mkdir(parents=True, exist_ok=True)
        return self


def profile_paths(profile: str) -> ProfilePaths:
    """Folders for `profile` under the output root: data/, runs/<profile>/, figures/<profile>/."""
    root = output_root()
    return ProfilePaths(
        profile=profile,
        data=root / "data",
        runs=root / "runs" / profile,
        figures=root / "figures" / profile,
        notebooks=root / "runs" / profile / "notebooks",
    )


def resolve(path: str | Path) -> Path:
    """A user path: absolute stays, relative is taken from the output root; `~` and $VARS expand."""
    p = Path(os.path.expandvars(os.path.expanduser(str(path))))
    return p if p.is_absolute() else output_root() / p


def portable_path(path: str | Path) -> str:
    """A data path as the run id sees it: relative to the output root (posix) when it lies under
    it, so moving the project or KDLIB_HOME keeps the ids; else absolute."""
    full, root = resolve(path).resolve(), output_root().resolve()
    return full.relative_to(root).as_posix() if full.is_relative_to(root) else full.as_posix()
