"""benchmarks/profile_demo.py on a made-up chain output and one tiny instrumented run."""

import importlib.util
import json
import os
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import yaml
from helpers_train import tiny_config, tiny_train_data

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("profile_demo", ROOT / "benchmarks/profile_demo.py")
P = importlib.util.module_from_spec(spec)
spec.loader.exec_module(P)


def executed_notebook(path: Path, total: float, cells: list[tuple[str, float]]) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["papermill"] = {"duration": total}
    for source, took in cells:
        cell = nbformat.v4.new_code_cell(source)
        cell.metadata["papermill"] = {"duration": took}
        nb.cells.append(cell)
    nbformat.write(nb, path)


def fake_run(runs: Path, name: str, start: float, end: float, epochs: list[float],
             distiller: str | None = None, pid: int | None = None) -> None:
    folder = runs / name
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": "cnn_xs", "distiller": distiller}))
    pd.DataFrame({"epoch": range(1, len(epochs) + 1), "time_s": epochs}).to_csv(
        folder / "history.csv", index=False)
    (folder / "metrics.json").write_text(json.dumps({}))
    if pid is not None:
        (folder / "env.json").write_text(json.dumps({"hostname": "h", "pid": pid}))
    os.utime(folder / "config.yaml", (start, start))
    os.utime(folder / "metrics.json", (end, end))


def test_phases_come_from_papermill_cell_timings(tmp_path):
    executed_notebook(tmp_path / "00_data.ipynb", 30.0, [
        ("P = workbook.paths(profile)", 0.5), ("d = workbook.get_dataset(profile)", 12.0),
        ("cache = workbook.build_cache(profile, {})", 9.0)])
    executed_notebook(tmp_path / "02_train.ipynb", 100.0, [
        ("run_grid(todo, P.runs, devices=d)", 90.0), ("plot()", 4.0)])
    nb = nbformat.read(tmp_path / "02_train.ipynb", as_version=4)
    nb.cells[0].metadata["papermill"].update(start_time="2026-01-01T10:00:00.000000",
                                             end_time="2026-01-01T10:01:30.000000")
    nbformat.write(nb, tmp_path / "02_train.ipynb")
    (tmp_path / "README.md").write_text("not a notebook")
    got = P.notebook_phases(tmp_path).set_index(["notebook", "phase"])["seconds"]
    assert got[("00_data", "total")] == 30.0
    assert got[("00_data", "phantom / dataset")] == 12.0
    assert got[("00_data", "slice cache")] == 9.0
    assert got[("00_data", "rest (other cells, kernel start-up)")] == pytest.approx(9.0)
    assert got[("02_train", "training")] == 90.0
    (lo, hi), = P.training_windows(tmp_path)
    assert hi - lo == 90.0


def test_training_parts_from_run_folder_timestamps(tmp_path):
    t0 = 1_700_000_000.0
    # two workers in a cell from t0 - 2 to t0 + 22: worker 1 runs a (0-8 s) and c (10-20 s),
    # worker 2 runs b (1-15 s) and is then idle
    fake_run(tmp_path, "a", t0, t0 + 8, [3.0, 3.0])
    fake_run(tmp_path, "b", t0 + 1, t0 + 15, [5.0, 5.0], distiller="kd")
    fake_run(tmp_path, "c", t0 + 10, t0 + 20, [4.0, 4.0], distiller="kd")
    (tmp_path / ".tmp-d").mkdir()  # an unfinished run is not counted
    timeline = P.run_timeline(tmp_path)
    assert list(timeline["run_id"]) == ["a", "b", "c"] and P.concurrency(timeline) == 2
    parts = P.training_parts(timeline, [(t0 - 2, t0 + 22)])["worker_s"].tolist()
    assert parts == pytest.approx([24.0,  # epochs
                                   32.0 - 24.0,  # inside runs, outside epochs
                                   2.0 + 3.0,  # before each worker's first run
                                   2.0,  # a -> c
                                   2.0 + 7.0])  # after the last runs, to the cell's end
    assert sum(parts) == pytest.approx(2 * 24.0)
    plain = P.training_parts(timeline)  # no cell times: the runs' own span
    assert plain["worker_s"].sum() == pytest.approx(2 * 20.0)
    assert P.pick_run(tmp_path, timeline) == "b"  # the upper median distilled run (c 8 s, b 10 s)
    models = P.per_model(timeline).set_index("distilled")
    assert models.loc[True, "runs"] == 2 and models.loc[True, "epochs_s_per_run"] == 9.0


def test_one_run_instrumented_accounts_for_its_time(tmp_path):
    cache, splits = tiny_train_data(tmp_path)
    parts, total = P.time_one_run(tiny_config(cache, splits, epochs=2), tmp_path / "runs")
    got = parts.set_index("part")
    for part in ("data: read the slice cache", "train: student forward/backward/step",
                 "validation and test: forward", "checkpoints and model file",
                 "fit: setup and the rest"):
        assert got.loc[part, "seconds"] > 0, part
    assert got.loc["train: student forward/backward/step", "calls"] == 2  # one per epoch
    assert parts["seconds"].sum() == pytest.approx(total, rel=0.05)
    assert P.Timers is not None and not hasattr(P.importlib.import_module("kdlib.train").fit,
                                                "__wrapped__")  # the timers are removed


def test_runs_trained_together_are_one_task_of_their_worker(tmp_path):
    t0 = 1_700_000_000.0
    # worker 1 trains a and b together (0-10 s), then c (12-16 s); worker 2 trains d (0-6 s)
    fake_run(tmp_path, "a", t0, t0 + 10, [2.0, 2.0], pid=1)
    fake_run(tmp_path, "b", t0 + 0.5, t0 + 10.2, [2.0, 2.0], distiller="kd", pid=1)
    fake_run(tmp_path, "c", t0 + 12, t0 + 16, [1.5, 1.5], pid=1)
    fake_run(tmp_path, "d", t0, t0 + 6, [2.5, 2.5], pid=2)
    timeline = P.run_timeline(tmp_path)
    assert list(timeline["worker"]) == ["h:1", "h:1", "h:1", "h:2"]
    tasks = P.worker_tasks(timeline)
    assert sorted(tasks["runs"]) == [1, 1, 2] and P.concurrency(timeline) == 2
    parts = P.training_parts(timeline, [(t0, t0 + 20)], 2)["worker_s"].tolist()
    assert parts == pytest.approx([16.0,  # epochs
                                   10.2 + 4 + 6 - 16.0,  # inside tasks, outside epochs
                                   0.0,  # both start at once
                                   12 - 10.2,  # worker 1 between its tasks
                                   (20 - 16) + (20 - 6)])  # after the last tasks
    shares = P.per_model(timeline).set_index("distilled")["run_s_per_run"]
    assert shares[True] == pytest.approx(9.7 / 2)  # b's span shared with a


def test_each_training_cell_counts_only_its_own_worker_processes(tmp_path):
    """Notebooks 02 and 03 each start two workers: four processes in all, two per window."""
    t0 = 1_700_000_000.0
    fake_run(tmp_path, "a", t0 + 1, t0 + 9, [4.0], pid=1)
    fake_run(tmp_path, "b", t0 + 1, t0 + 8, [3.0], pid=2)
    fake_run(tmp_path, "c", t0 + 21, t0 + 29, [4.0], pid=3)
    fake_run(tmp_path, "d", t0 + 21, t0 + 30, [5.0], pid=4)
    timeline = P.run_timeline(tmp_path)
    assert P.concurrency(timeline) == 4
    got = P.training_parts(timeline, [(t0, t0 + 10), (t0 + 20, t0 + 30)])
    assert got["worker_s"].sum() == pytest.approx(2 * 10 + 2 * 10)
    assert got["worker_s"].tolist()[-1] == pytest.approx((10 - 9) + (10 - 8) + (30 - 29) + 0)
    assert got["share"].sum() == pytest.approx(1.0)
