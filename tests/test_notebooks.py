"""The notebooks as committed: stripped, well-formed parameters cells, profiles that validate, and
the whole chain executed on the `smoke` profile through the papermill runner."""

from __future__ import annotations

import ast
import json

import nbformat
import pandas as pd
import pytest
import yaml

from kdlib.experiment import Experiment
from kdlib.paths import project_root
from kdlib.pipeline import list_notebooks, load_profile, notebook_parameters, plan_run, run_profile

NOTEBOOKS = list_notebooks()
PROFILES = sorted(p.stem for p in (project_root() / "profiles").glob("*.yaml"))


def _parameters_cell(path) -> str:
    nb = nbformat.read(path, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{path.name}: needs exactly one cell tagged 'parameters'"
    return cells[0].source


def test_notebooks_are_numbered_in_reading_order():
    assert [p.stem[:2] for p in NOTEBOOKS] == ["00", "01", "02", "03", "04"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_committed_without_outputs(path):
    nb = json.loads(path.read_text())
    dirty = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"
             and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, f"{path.name}: cells {dirty} hold outputs; run `make strip`"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_parameter_is_typed_commented_and_seen_by_papermill(path):
    source = _parameters_cell(path)
    assigned = [n.target.id for n in ast.parse(source).body if isinstance(n, ast.AnnAssign)]
    untyped = [n for n in ast.parse(source).body if isinstance(n, ast.Assign)]
    assert not untyped, f"{path.name}: every parameter needs a type annotation"
    seen = notebook_parameters(path)
    assert list(seen) == assigned, f"{path.name}: papermill does not parse {set(assigned) - set(seen)}"
    assert all(seen[k]["help"] for k in seen), f"{path.name}: every parameter needs a comment"
    assert "profile" in seen


@pytest.mark.parametrize("path", NOTEBOOKS[2:], ids=lambda p: p.stem)
def test_training_and_analysis_notebooks_take_the_experiment_from_the_profile(path):
    """02-04 declare no experiment setting: they read the recorded experiment and its plan."""
    declared = set(notebook_parameters(path))
    assert not declared & set(Experiment.__dataclass_fields__)
    source = "".join(c.source for c in nbformat.read(path, as_version=4).cells)
    assert "load_experiment(profile)" in source
    assert ("read_profile_plan(profile)" if path.stem.startswith("04") else
            "profile_plan(profile)") in source


@pytest.mark.parametrize("name", PROFILES)
def test_profile_parameters_are_declared_by_the_notebooks(name):
    plan = plan_run(load_profile(name), NOTEBOOKS)
    assert [nb.stem for nb, _ in plan] == [p.stem for p in NOTEBOOKS]
    assert all(params["profile"] == name for _, params in plan)


@pytest.mark.slow
def test_smoke_chain_runs_every_notebook_and_writes_every_figure(tmp_path, monkeypatch):
    """The notebooks with their own defaults, as JupyterLab runs them (cwd = notebooks/)."""
    monkeypatch.setenv("KDLIB_HOME", str(tmp_path))
    done = run_profile("smoke", log_output=False, progress_bar=False)
    assert [p.name for p in done] == [p.name for p in NOTEBOOKS]
    for path in done:
        nb = nbformat.read(path, as_version=4)
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
                  if o.output_type == "error"]
        assert not errors, f"{path.name}: {errors[0]['ename']}: {errors[0]['evalue']}"
    figures = tmp_path / "figures" / "smoke"
    expected = ["data_class_distribution", "data_example_slices", "data_intensity_histograms",
                "data_split_distribution", "teachers_learning_curves", "baselines_learning_curves",
                "students_learning_curves", "q1_gain_vs_ratio_losses", "q1_gain_vs_ratio_kd",
                "q1_gain_vs_ratio_kd_vs_la",
                "q1_roc_pr", "q1_reliability", "q2_gain_heatmap", "q2_f1_vs_params"]
    for name in expected:
        for ext in ("pdf", "png"):
            f = figures / f"{name}.{ext}"
            assert f.is_file() and f.stat().st_size > 1000, f"missing or empty {f.name}"
    assert list(figures.glob("q1_confusion_*.pdf")) and list(figures.glob("q1_per_class_f1_*.pdf"))
    for table in ("data_split_table", "data_training_sets", "validation_baselines", "q1_methods",
                  "q1_effects", "q1_primary_tests", "q1_power", "q1_bootstrap", "q2_size_grid"):
        assert (figures / f"{table}.tex").read_text().count("\\toprule") == 1
        assert len(pd.read_csv(figures / f"{table}.csv")) > 0
    answers = (figures / "answers.md").read_text()
    assert "Question 1" in answers and "Question 2" in answers
    assert "Declared family *Q1 primary*: 20 hypotheses" in answers  # smoke: 5 x 2 x 2
    assert "3 folds x 1 repeat x 1 seed" in answers and "What the design supports" in answers

    # the experiment recorded by the runner, and the plan notebooks 02-04 used
    runs_dir = tmp_path / "runs" / "smoke"
    man = yaml.safe_load((runs_dir / "manifest.yaml").read_text())
    assert man["experiment"] == Experiment.from_profile("smoke").to_dict()
    assert len((runs_dir / "plan.jsonl").read_text().splitlines()) == man["plan"]["runs"]

    # rerunning resumes: every training run is found finished, none is trained again
    runs = sorted(p.name for p in (tmp_path / "runs" / "smoke").iterdir() if p.is_dir())
    run_profile("smoke", only=["03"], log_output=False, progress_bar=False)
    assert sorted(p.name for p in (tmp_path / "runs" / "smoke").iterdir() if p.is_dir()) == runs
