"""kdlib.results: the results table and run-folder readers, and the helpers of notebooks 02-03 on
a tiny trained run set."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from helpers_train import make_cache, write_splits

from kdlib.errors import RunError
from kdlib.experiment import Experiment
from kdlib.grid import run_grid
from kdlib.identity import method_name, run_id
from kdlib.results import (
    best_validation,
    histories,
    load_history,
    load_predictions,
    load_runs,
    select_runs,
)
from kdlib.train_config import TrainConfig


def test_load_runs_empty_and_missing_files(tmp_path):
    assert load_runs(tmp_path / "none").empty
    assert "env.device" in load_runs(tmp_path / "none").columns
    with pytest.raises(RunError, match="predictions.csv not found"):
        load_predictions(tmp_path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    cache = make_cache(root, n_hgg=6, n_lgg=6, slices=4, size=16)
    splits = write_splits(cache, root / "splits.csv")
    exp = Experiment(modalities=("flair", "t1"), folds=(0,), epochs=2, batch_size=8,
                     teacher="cnn_s", student="cnn_xs", baseline_losses=("ce",), distillers=("kd",),
                     kd_task_losses=(), kd_original=False, grid_teachers=(), grid_students=(),
                     ratios=(None,))
    configs = exp.configs(str(cache), str(splits), [0, 1])
    assert [method_name(c) for c in configs] == ["ce", "ce", "kd"]
    runs_dir = root / "runs"
    run_grid(configs, runs_dir, progress=False)
    extra = TrainConfig.from_dict({**configs[1].to_dict(), "task_loss": "focal"})  # not planned
    run_grid([extra], runs_dir, progress=False)
    return {"configs": configs, "runs": load_runs(runs_dir), "extra": run_id(extra)}


def test_select_runs_keeps_the_planned_finished_runs(trained):
    configs, runs = trained["configs"], trained["runs"]
    assert len(runs) == 4
    sel = select_runs(runs, configs)
    assert sorted(sel["run_id"]) == sorted(run_id(c) for c in configs)
    assert trained["extra"] not in set(sel["run_id"]) and list(sel.index) == [0, 1, 2]
    assert len(select_runs(runs, configs[:1])) == 1
    assert select_runs(runs.iloc[:0], configs).empty


def test_histories_attach_the_run_columns(trained):
    sel = select_runs(trained["runs"], trained["configs"])
    hist = histories(sel)
    assert len(hist) == 3 * 2
    for col in ("run_id", "method", "model", "teacher_model", "ratio", "repeat", "fold", "seed",
                "epoch", "val_macro_f1", "val_f1_LGG", "val_recall_LGG"):
        assert col in hist.columns, col
    for _, row in sel.iterrows():
        part = hist[hist["run_id"] == row["run_id"]].reset_index(drop=True)
        own = load_history(row["path"])
        np.testing.assert_allclose(part["val_macro_f1"], own["val_macro_f1"])
        assert (part["model"] == row["model"]).all() and (part["method"] == row["method"]).all()
    kd = hist[hist["method"] == "kd"]
    assert (kd["teacher_model"] == "cnn_s").all() and kd["train_kd"].notna().all()
    empty = histories(sel.iloc[:0])
    assert empty.empty and "run_id" in empty.columns


def test_best_validation_at_each_runs_best_epoch(trained):
    sel = select_runs(trained["runs"], trained["configs"])
    hist = histories(sel)
    best = best_validation(sel, hist, by=["model", "method"])
    metrics = ("val_macro_f1", "val_f1_LGG", "val_recall_LGG")
    assert list(best.columns) == ["model", "method"] + [
        f"{m}_{s}" for m in metrics for s in ("mean", "std")]
    assert len(best) == 3 and best["val_macro_f1_std"].isna().all()  # one run per group
    at_best = {}
    for _, row in sel.iterrows():
        h = load_history(row["path"]).set_index("epoch")
        at_best[row["run_id"]] = h.loc[row["best_epoch"]]
        got = best[(best["model"] == row["model"]) & (best["method"] == row["method"])].iloc[0]
        for m in ("val_macro_f1", "val_f1_LGG", "val_recall_LGG"):
            assert got[f"{m}_mean"] == pytest.approx(h.loc[row["best_epoch"], m])
    # grouped by method only: the teacher's and the student's CE runs are averaged
    by_method = best_validation(sel, hist, by=["method"], metrics=("val_macro_f1",))
    ce = [at_best[r]["val_macro_f1"] for r in sel.loc[sel["method"] == "ce", "run_id"]]
    row = by_method[by_method["method"] == "ce"].iloc[0]
    assert row["val_macro_f1_mean"] == pytest.approx(np.mean(ce))
    assert row["val_macro_f1_std"] == pytest.approx(np.std(ce, ddof=1), nan_ok=True)
    assert isinstance(by_method, pd.DataFrame) and len(by_method) == 2
