"""kdlib.grid: grid expansion (teachers matched to students) and run_grid (kdlib.launch)."""

from __future__ import annotations

import pytest
from helpers_train import tiny_config, tiny_train_data

from kdlib.errors import ConfigError, RunError
from kdlib.grid import expand_grid, load_grid, run_grid
from kdlib.identity import run_id
from kdlib.results import load_history, load_predictions, load_runs
from kdlib.train import fit
from kdlib.train_config import TrainConfig


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_train_data(tmp_path_factory.mktemp("data"))


def cfg(data, **over):
    return TrainConfig.from_dict(tiny_config(*data, **over))


def spec(data, **over):
    cache, splits = data
    s = {
        "base": {"cache": str(cache), "splits": str(splits), "modalities": ["flair", "t1"],
                 "epochs": 1, "batch_size": 8, "device": "cpu", "warmup_epochs": 0},
        "grid": {"fold": [0, 1], "seed": [0]},
        "teachers": {"model": ["cnn_s", "cnn_m"]},
        "students": [{"model": "cnn_xs", "distiller": [None, "kd"], "teacher": {"model": "cnn_s"}},
                     {"model": "cnn_xs", "task_loss": "focal", "distiller": "dkd"}],
    }
    s.update(over)
    return s


def test_expand_grid_teachers_first_and_matched(data):
    runs = expand_grid(spec(data))
    teachers = [c for c in runs if c.model != "cnn_xs"]
    assert runs[:4] == teachers and len(teachers) == 4
    baselines = [c for c in runs if c.model == "cnn_xs" and c.distiller is None]
    assert len(baselines) == 2 and all(c.teacher is None for c in baselines)
    kd = [c for c in runs if c.distiller == "kd"]
    assert len(kd) == 2  # selector: only the cnn_s teacher, one per fold
    by_id = {run_id(t): t for t in teachers}
    for s in kd:
        assert by_id[s.teacher].model == "cnn_s" and by_id[s.teacher].fold == s.fold
    dkd = [c for c in runs if c.distiller == "dkd"]
    assert len(dkd) == 4  # no selector: every matching teacher
    assert len(runs) == 4 + 2 + 2 + 4


def test_expand_grid_matches_teachers_on_the_repeat(data):
    runs = expand_grid(spec(data, grid={"repeat": [0, 1], "fold": [0, 1], "seed": [0]}))
    by_id = {run_id(c): c for c in runs}
    kd = [c for c in runs if c.distiller == "kd"]
    assert sorted((c.repeat, c.fold) for c in kd) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for s in kd:
        assert (by_id[s.teacher].repeat, by_id[s.teacher].fold) == (s.repeat, s.fold)
    assert len(runs) == 2 * (4 + 2 + 2 + 4)


def test_expand_grid_sweeps_and_errors(data, tmp_path):
    s = spec(data, grid={"fold": 0, "modalities": [["flair"], ["flair", "t1"]]},
             students=[], teachers={"model": "cnn_s", "modalities": ["flair"]})
    assert [c.modalities for c in expand_grid(s)] == [("flair",)]  # the entry's value wins
    s = spec(data, grid={"fold": 0, "modalities": [["flair"], ["flair", "t1"]]}, students=[],
             teachers={"model": "cnn_s"})
    assert [c.modalities for c in expand_grid(s)] == [("flair",), ("flair", "t1")]
    with pytest.raises(ConfigError, match=r"unknown grid key.*student.*valid keys"):
        expand_grid({**spec(data), "student": {}})
    with pytest.raises(ConfigError, match=r"no teacher matches \{'model': 'resnet18'\}"):
        expand_grid(spec(data, students={"distiller": "kd", "teacher": {"model": "resnet18"}}))
    with pytest.raises(ConfigError, match=r"teachers\[0\].*sampler='smote'"):
        expand_grid(spec(data, teachers={"sampler": "smote"}))
    path = tmp_path / "grid.yaml"
    import yaml

    path.write_text(yaml.safe_dump(spec(data)))
    assert load_grid(path) == expand_grid(spec(data))


def test_run_grid_trains_in_order_skips_and_tabulates(data, tmp_path, monkeypatch):
    s = spec(data, grid={"fold": 0}, teachers={"model": "cnn_s"},
             students={"model": "cnn_xs", "distiller": [None, "kd"]})
    runs = expand_grid(s)
    paths = run_grid(runs[::-1], tmp_path, progress=False)  # students listed first
    assert [p.name for p in paths] == [run_id(c) for c in runs[::-1]]
    df = load_runs(tmp_path)
    assert len(df) == 3
    for col in ("run_id", "method", "teacher_model", "model", "fold", "ratio", "seed",
                "modalities", "augment.flip", "macro_f1", "f1_LGG", "recall_LGG", "params",
                "teacher_params", "n_train_slices", "path"):
        assert col in df.columns, col
    kd = df[df.method == "kd"].iloc[0]
    assert kd.teacher_model == "cnn_s" and kd.teacher_params > kd.params
    assert df["env.device"].eq("cpu").all()  # CPU and GPU runs can be told apart
    assert df.modalities.eq("flair+t1").all() and df.ratio.isna().all()
    assert len(load_predictions(kd.path)) == kd.n_test_slices
    assert len(load_history(kd.path)) == 1
    monkeypatch.setattr("kdlib.train._fit", lambda *a, **k: pytest.fail("finished run retrained"))
    assert run_grid(runs, tmp_path, progress=False) == paths[::-1]


def test_run_grid_reports_failures_and_skips_dependants(data, tmp_path):
    good = cfg(data, epochs=1)
    orphan = cfg(data, epochs=1, distiller="kd", teacher="missing-run")
    bad_teacher = TrainConfig.from_dict(tiny_config(tmp_path / "no.h5", data[1], model="cnn_s"))
    student = cfg(data, epochs=1, distiller="kd", teacher=run_id(bad_teacher))
    with pytest.raises(RunError) as err:
        run_grid([student, orphan, good, bad_teacher], tmp_path, progress=False)
    msg = str(err.value)
    assert msg.startswith("1 trained, 0 done, 2 failed, 1 skipped (of 4 runs)")
    assert "teacher 'missing-run' not found" in msg and "no.h5" in msg
    assert f"{run_id(student)}: skipped: needs run {run_id(bad_teacher)}, which failed" in msg
    assert (tmp_path / run_id(good)).is_dir()


def test_run_grid_one_process_per_device(data, tmp_path):
    runs = [cfg(data, epochs=1, seed=s) for s in (0, 1)]
    paths = run_grid(runs, tmp_path, devices=["cpu", "cpu"], progress=False)
    assert [p.name for p in paths] == [run_id(c) for c in runs]
    assert all((p / "metrics.json").is_file() for p in paths)
    assert fit(runs[0], tmp_path, progress=False) == paths[0]
