"""kdlib.cli: help of every subcommand, error reporting, prepare's summary, `python -m kdlib`."""

from __future__ import annotations

import subprocess
import sys

import nbformat
import pandas as pd
import pytest
import yaml
from helpers_train import tiny_config, tiny_train_data

from kdlib import CLASSES
from kdlib.cli import build_parser, main
from kdlib.data.cache import cache_summary, load_slice_table
from kdlib.data.splits import load_splits
from kdlib.identity import run_id
from kdlib.results import load_runs
from kdlib.train_config import TrainConfig
from kdlib.workbook import read_manifest

SUBCOMMANDS = ["phantom", "prepare", "train", "grid", "run", "strip"]


def exit_code(argv):
    with pytest.raises(SystemExit) as err:
        main(argv)
    return err.value.code


def test_every_subcommand_is_wired():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(SUBCOMMANDS)


@pytest.mark.parametrize("argv", [["--help"], *([c, "--help"] for c in SUBCOMMANDS)])
def test_help_exits_zero(argv, capsys):
    assert exit_code(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: kdlib")
    if len(argv) == 2:
        assert f"kdlib {argv[0]}" in out


def test_no_subcommand_or_bad_option_is_a_usage_error(capsys):
    assert exit_code([]) == 2
    assert exit_code(["train"]) == 2  # --config is required
    assert "--config" in capsys.readouterr().err


@pytest.mark.parametrize("argv, cmd, says", [
    (["train", "--config", "missing.yaml"], "train", "missing.yaml does not exist"),
    (["grid", "--config", "missing.yaml"], "grid", "missing.yaml does not exist"),
    (["run", "--profile", "nosuch"], "run", "unknown profile 'nosuch'"),
    (["run", "--profile", "smoke", "-p", "novalue"], "run", "must look like key=value"),
    (["prepare", "--source", "nifti"], "prepare", "needs data_root"),
])
def test_kdlib_errors_print_one_line_and_return_2(argv, cmd, says, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KDLIB_HOME", str(tmp_path))
    monkeypatch.delenv("BRATS_ROOT", raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kdlib {cmd}: error: ") and says in err
    assert "Traceback" not in err


def test_prepare_prints_the_class_summary(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KDLIB_HOME", str(tmp_path))
    argv = ["prepare", "--profile", "clitest", "--hgg", "4", "--lgg", "4", "--shape", "32", "32",
            "24", "--image-size", "16", "--design", "holdout", "--folds", "2", "--test-fraction",
            "0.25"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    man = read_manifest("clitest")
    table = load_slice_table(man["cache"])
    assert f"dataset: {man['dataset']['root']} (nifti)" in out
    assert f"cache:  {man['cache']}" in out and f"splits: {man['splits']}" in out
    assert str(tmp_path) in man["cache"] and man["prep"]["image_size"] == 16
    summary = cache_summary(table)
    assert summary.to_string() in out
    total = summary.loc["total"]
    assert total["subjects"] == 8 and total["slices"] == len(table)
    assert [total[c] for c in CLASSES] == [int((table["label"] == c).sum()) for c in CLASSES]
    assert (summary.loc["HGG", "subjects"], summary.loc["LGG", "subjects"]) == (4, 4)
    # the split table: its total row counts every slice once
    lines = out.split("Slices per class per split")[1].splitlines()
    total_line = next(line for line in lines if line.startswith("total"))
    assert total_line.split()[1:] == ["4", "4", *(str(int(total[c])) for c in CLASSES),
                                      str(len(table))]
    splits = load_splits(man["splits"])
    assert sorted(set(splits["fold"])) == [-1, 0, 1]
    assert pd.Series(splits["fold"] == -1).sum() == 2  # 25 % of each grade held out

    # a teacher and a distilled student on that synthetic data, through `kdlib grid`
    spec = {"base": {"cache": man["cache"], "splits": man["splits"], "epochs": 1, "fold": 1},
            "teachers": {"model": "cnn_s"},
            "students": {"model": "cnn_xs", "distiller": "kd", "teacher": {"model": "cnn_s"}}}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(spec))
    assert main(["grid", "--config", str(tmp_path / "grid.yaml")]) == 0
    runs = load_runs(tmp_path / "runs" / "cli")
    assert sorted(runs["method"]) == ["ce", "kd"]
    student = runs[runs["method"] == "kd"].iloc[0]
    assert student["teacher_model"] == "cnn_s" and student["n_test_subjects"] == 2


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return tiny_train_data(tmp_path_factory.mktemp("cli_data"))


def test_train_and_grid_subcommands(tiny_data, tmp_path, capsys):
    cfg = tiny_config(*tiny_data, epochs=1)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    runs = tmp_path / "runs"
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--runs-dir", str(runs)]) == 0
    path = runs / run_id(TrainConfig.from_dict(cfg))
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(path)
    assert (path / "metrics.json").is_file()
    base = {k: v for k, v in cfg.items() if k != "model"}
    spec = {"base": base, "teachers": {"model": "cnn_xs"},
            "students": {"model": "cnn_xs", "distiller": "kd", "teacher": {"model": "cnn_xs"}}}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(spec))
    assert main(["grid", "--config", str(tmp_path / "grid.yaml"), "--runs-dir", str(runs)]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith(str(runs))]
    assert printed[0] == str(path)  # the teacher is the run trained above: reused
    assert len(printed) == 2 and "-kd-" in printed[1] and (runs / printed[1] / "model.pt").is_file()


def test_train_default_runs_dir_follows_the_output_root(tiny_data, tmp_path, monkeypatch, capsys):
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setenv("KDLIB_HOME", str(home))
    monkeypatch.chdir(elsewhere)
    cfg = tiny_config(*tiny_data, epochs=1)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(tmp_path / "run.yaml")]) == 0
    rid = run_id(TrainConfig.from_dict(cfg))
    assert (home / "runs" / "cli" / rid / "metrics.json").is_file()


def test_phantom_and_strip_subcommands(tmp_path, capsys):
    assert main(["phantom", str(tmp_path / "ph"), "--hgg", "1", "--lgg", "1",
                 "--shape", "16", "16", "16"]) == 0
    root = tmp_path / "ph" / "MICCAI_BraTS2020_TrainingData"
    assert capsys.readouterr().out.strip() == str(root)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [
        "BraTS20_Training_001", "BraTS20_Training_002"]

    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("1")
    cell.execution_count = 1
    cell.outputs = [nbformat.v4.new_output("execute_result", {"text/plain": "1"})]
    nb.cells = [cell]
    dirty, clean = tmp_path / "dirty.ipynb", tmp_path / "clean.ipynb"
    nbformat.write(nb, str(dirty))
    nb.cells[0].execution_count, nb.cells[0].outputs = None, []
    nbformat.write(nb, str(clean))
    assert main(["strip", str(dirty), str(clean)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"stripped {dirty}", f"clean    {clean}"]
    assert nbformat.read(str(dirty), as_version=4).cells[0].outputs == []


def test_python_dash_m_kdlib_help():
    res = subprocess.run([sys.executable, "-m", "kdlib", "--help"], capture_output=True,
                         text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: kdlib")
    assert all(c in res.stdout for c in SUBCOMMANDS)
    res = subprocess.run([sys.executable, "-m", "kdlib", "train", "--config", "nope.yaml"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 2 and res.stderr.startswith("kdlib train: error:")
