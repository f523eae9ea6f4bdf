"""kdlib.cli: help of every subcommand, error reporting, prepare's summary, `python -m kdlib`."""

from __future__ import annotations

import subprocess
import sys

import nbformat
import pandas as pd
import pytest
import submitit
import yaml
from conftest import synth_subjects
from helpers_train import tiny_config, tiny_train_data

from kdlib import CLASSES
from kdlib.cli import build_parser, main
from kdlib.data.cache import cache_summary, load_slice_table
from kdlib.data.splits import load_splits
from kdlib.identity import run_id
from kdlib.plan import read_plan
from kdlib.results import load_runs
from kdlib.slurm import SlurmSettings
from kdlib.train_config import TrainConfig
from kdlib.workbook import read_manifest, update_manifest

SUBCOMMANDS = ["phantom", "prepare", "train", "grid", "plan", "launch", "run", "strip"]


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
    (["plan", "--profile", "smoke"], "plan", "profile 'smoke' has no splits yet"),
    (["plan", "--profile", "smoke", "-p", "n_boot=9"], "plan", "-p ['n_boot']: not experiment"),
    (["launch", "--profile", "smoke", "-p", "epochs=x"], "launch", "epochs='x' should be int"),
    (["train", "--plan", "none.jsonl", "--index", "0"], "train", "none.jsonl does not exist"),
    (["train", "--plan", "none.jsonl"], "train", "--plan needs --index N"),
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


SMALL = ["--image-size", "16", "--folds", "3"]


def test_prepare_prints_the_readers_notes_and_takes_the_channel_order(nifti_tree, h5_tree,
                                                                      tmp_path, monkeypatch,
                                                                      capsys):
    monkeypatch.setenv("KDLIB_HOME", str(tmp_path / "home"))
    tree = nifti_tree(subjects=synth_subjects(4, 4, first=352))
    assert main(["prepare", "--source", "nifti", "--data-root", str(tree.root), *SMALL]) == 0
    out = capsys.readouterr().out
    assert ("reader's notes:\n  BraTS20_Training_355: segmentation read from non-standard file "
            "name W39_1998.09.19_Segm.nii\n") in out
    order = ["t1", "t1ce", "t2", "flair"]
    h5 = h5_tree(subjects=synth_subjects(4, 4), channel_order=order, parent=tmp_path / "h5")
    argv = ["prepare", "--profile", "h5", "--source", "h5", "--data-root", str(h5.root), *SMALL]
    assert main([*argv, "--channel-order", *order]) == 0
    out = capsys.readouterr().out
    assert ("reader's notes:\n  8 subjects (BraTS20_Training_001 ... BraTS20_Training_008): "
            "grade assumes H5 volume_N is BraTS20_Training_N (unverified convention)") in out
    assert read_manifest("h5")["dataset"]["reader"] == {"channel_order": order}
    assert exit_code([*argv, "--channel-order", "t1", "t1", "t2", "dwi"]) == 2  # not a modality
    assert main([*argv, "--channel-order", "t1", "t1", "t2", "flair"]) == 2
    assert "channel_order=['t1', 't1', 't2', 'flair'] must order exactly" in capsys.readouterr().err


def test_a_failed_prepare_leaves_the_manifest_as_it_was(nifti_tree, tmp_path, monkeypatch,
                                                        capsys):
    """The manifest is written only when dataset, cache and splits all succeeded."""
    monkeypatch.setenv("KDLIB_HOME", str(tmp_path / "home"))
    argv = ["prepare", "--profile", "p", "--source", "nifti", *SMALL, "--data-root"]
    good = nifti_tree(n_hgg=4, n_lgg=4, parent=tmp_path / "good")
    assert main([*argv, str(good.root)]) == 0
    manifest = tmp_path / "home" / "runs" / "p" / "manifest.yaml"
    before = manifest.read_bytes()
    capsys.readouterr()
    broken = nifti_tree(n_hgg=4, n_lgg=4, seed=1, parent=tmp_path / "broken")
    damaged = broken.root / "BraTS20_Training_003" / "BraTS20_Training_003_t2.nii"
    damaged.write_bytes(damaged.read_bytes()[:400])  # the cache step fails
    assert main([*argv, str(broken.root)]) == 2
    assert f"cannot read {damaged}" in capsys.readouterr().err
    assert manifest.read_bytes() == before
    other = nifti_tree(n_hgg=4, n_lgg=4, seed=2, parent=tmp_path / "other")
    assert main([*argv[:-1], "--folds", "5", "--data-root", str(other.root)]) == 2  # splits fail
    assert "k_folds=5" in capsys.readouterr().err
    assert manifest.read_bytes() == before
    assert read_manifest("p")["dataset"]["root"] == str(good.root)


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


@pytest.fixture
def tiny_profile(tiny_data, tmp_path, monkeypatch):
    """A profile file with a three-run experiment, its cache and splits recorded as 00-01 do."""
    monkeypatch.setenv("KDLIB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    exp = {"modalities": ["flair", "t1"], "folds": [0], "ratios": [None], "epochs": 1,
           "batch_size": 8, "teacher": "cnn_s", "student": "cnn_xs", "baseline_losses": ["ce"],
           "distillers": ["kd"], "kd_task_losses": [], "kd_original": False, "grid_teachers": []}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({"description": "test", "experiment": exp,
                                    "parameters": {"workers": 1}}))
    update_manifest("tiny", cache=str(tiny_data[0]), splits=str(tiny_data[1]))
    return path


def test_plan_writes_the_plan_and_the_slurm_scripts(tiny_profile, tmp_path, capsys):
    argv = ["plan", "--profile", str(tiny_profile), "-p", "epochs=2", "--partition", "gpu",
            "--time", "30", "--max-parallel", "2"]
    assert main(argv) == 0
    runs = tmp_path / "home" / "runs" / "tiny"
    plan = read_plan(runs / "plan.jsonl")
    assert len(plan) == 3 and [len(e.depends_on) for e in plan] == [0, 0, 1]
    assert all(e.config.epochs == 2 for e in plan)
    assert read_manifest("tiny")["experiment"]["epochs"] == 2  # what the notebooks then read
    out = capsys.readouterr().out
    assert f"{runs / 'plan.jsonl'}: 3 runs, 2 then 1 by dependency level" in out
    assert f"bash {runs / 'slurm' / 'submit.sh'}" in out
    sbatch = (runs / "slurm" / "train.sbatch").read_text()
    assert "#SBATCH --partition=gpu\n" in sbatch and "#SBATCH --time=00:30:00\n" in sbatch
    assert "--array=0-1%2" in (runs / "slurm" / "submit.sh").read_text()


def test_train_plan_index_and_launch(tiny_profile, tmp_path, capsys, monkeypatch):
    assert main(["plan", "--profile", str(tiny_profile)]) == 0
    runs = tmp_path / "home" / "runs" / "tiny"
    plan = read_plan(runs / "plan.jsonl")
    capsys.readouterr()
    assert main(["train", "--plan", str(runs / "plan.jsonl"), "--index", "1"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(runs / plan[1].run_id)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "0")  # as a task of the job array
    assert main(["train", "--plan", str(runs / "plan.jsonl")]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(runs / plan[0].run_id)
    assert main(["launch", "--profile", str(tiny_profile)]) == 0
    out = capsys.readouterr().out
    assert "1 trained, 2 done, 0 failed, 0 skipped (of 3 runs)" in out
    assert sorted(load_runs(runs)["run_id"]) == sorted(e.run_id for e in plan)


def test_launch_on_slurm_hands_the_settings_to_submitit(tiny_profile, tmp_path, monkeypatch,
                                                       capsys):
    """--executor slurm with submitit's DebugExecutor standing in for the cluster."""
    seen = {}

    def stand_in(folder, settings, name):
        seen.update(folder=folder, settings=settings, name=name)
        return submitit.DebugExecutor(folder)

    monkeypatch.setattr("kdlib.cli.slurm_executor", stand_in)
    argv = ["launch", "--profile", str(tiny_profile), "--executor", "slurm", "--partition", "gpu",
            "--gpus-per-node", "2", "--cpus-per-task", "1", "--mem-gb", "16", "--time", "45",
            "--account", "lab", "--max-parallel", "4", "--poll", "0.01"]
    assert main(argv) == 0
    runs = tmp_path / "home" / "runs" / "tiny"
    assert seen["folder"] == runs / "slurm" / "submitit" and seen["name"] == "kdlib-tiny"
    assert seen["settings"] == SlurmSettings(partition="gpu", gpus_per_node=2, cpus_per_task=1,
                                             mem_gb=16, time_min=45, account="lab",
                                             max_parallel=4)
    assert "3 trained, 0 done, 0 failed, 0 skipped (of 3 runs)" in capsys.readouterr().out


def test_launch_on_slurm_without_a_cluster_is_a_clear_error(tiny_profile, tmp_path, monkeypatch,
                                                            capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun, no sbatch
    argv = ["launch", "--profile", str(tiny_profile), "--executor", "slurm", "--partition", "gpu"]
    assert main(argv) == 2
    assert "kdlib launch: error: cannot use Slurm here" in capsys.readouterr().err


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
