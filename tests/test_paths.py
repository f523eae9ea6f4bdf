"""kdlib.paths: the project root, the output root ($KDLIB_HOME), profile folders, user paths."""

from __future__ import annotations

from pathlib import Path

from kdlib.paths import HOME_ENV, output_root, profile_paths, project_root, resolve


def test_project_root_is_found_from_any_folder_inside_it(monkeypatch):
    root = project_root()
    assert (root / "pyproject.toml").is_file() and (root / "notebooks").is_dir()
    assert project_root(root / "notebooks") == root
    monkeypatch.chdir(root / "kdlib")
    assert project_root() == root


def test_output_root_follows_kdlib_home(tmp_path, monkeypatch):
    monkeypatch.delenv(HOME_ENV, raising=False)
    assert output_root() == project_root()
    monkeypatch.setenv(HOME_ENV, str(tmp_path))
    assert output_root() == tmp_path.resolve()


def test_profile_paths_layout_and_make(tmp_path, monkeypatch):
    monkeypatch.setenv(HOME_ENV, str(tmp_path))
    p = profile_paths("demo")
    assert p.data == tmp_path / "data" and p.runs == tmp_path / "runs" / "demo"
    assert p.figures == tmp_path / "figures" / "demo"
    assert p.notebooks == tmp_path / "runs" / "demo" / "notebooks"
    assert not p.runs.exists()
    assert p.make() is p and all(d.is_dir() for d in (p.data, p.runs, p.figures, p.notebooks))


def test_resolve_expands_and_anchors_relative_paths(tmp_path, monkeypatch):
    monkeypatch.setenv(HOME_ENV, str(tmp_path))
    monkeypatch.setenv("BRATS_ROOT", "/data/brats")
    assert resolve("$BRATS_ROOT/x") == Path("/data/brats/x")
    assert resolve("runs/a.csv") == tmp_path / "runs" / "a.csv"
    assert resolve("~/f") == Path.home() / "f"
    assert resolve("/abs/f") == Path("/abs/f")
