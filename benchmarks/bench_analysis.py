"""Notebook 04's analysis on made-up run folders of the demo's size: seconds per call.

Writes one finished run folder per run of the demo experiment (ratios 1/4/16, the question-2 size
grid) with made-up test predictions (logits included for the post-hoc rows), then times the calls
notebook 04 makes on them: loading the run table, the post-hoc rows, the summaries, the paired
tests, the patient bootstraps (500 draws) and question 2's gains. It prints one line per call and
the bootstrap time of the notebook as it was (two tables) and as it is (one table).

--design holdout (default): 3 folds, 120 runs, one held-out test set of 16 subjects x 30 slices.
--design cv: the demo's repeated 5-fold cross-validation, 200 runs, each testing its outer fold
(80 subjects x 30 slices in all; needs a kdlib with cv splits).
It only uses calls that exist before and after the fast bootstrap, so the same script times both:
`PYTHONPATH=<checkout> python benchmarks/bench_analysis.py [--design cv] [--n-boot 500]`.
Prints figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers_eval import synthetic_predictions

from kdlib import CLASSES, analysis
from kdlib.experiment import Experiment
from kdlib.metrics import run_metrics

try:  # the module layout since the module-boundaries refactor
    from kdlib.identity import run_id
    from kdlib.results import load_runs, select_runs
except ImportError:  # before it
    from kdlib.experiment import select_runs
    from kdlib.runs import load_runs, run_id

DEMO = {"ratios": [1, 4, 16], "teacher": "cnn_s", "student": "cnn_xs",
        "grid_teachers": ["cnn_s", "cnn_m"], "grid_students": ["cnn_xs", "cnn_s"], "grid_ratio": 4.0}
PER_CLASS = ["f1_healthy", "f1_HGG", "f1_LGG"]
PARAMS = {"cnn_xs": 6_000, "cnn_s": 40_000, "cnn_m": 288_000}


def cv_splits(root: Path, folds: int, subjects: int) -> Path:
    """A repeated k-fold split table (design cv, one repeat) of the made-up subjects."""
    from kdlib.data.splits import SplitConfig, make_splits, save_splits

    pred = synthetic_predictions(subjects, 2, lgg_fraction=0.5)
    table = pred[pred["label"] != "healthy"].rename(columns={"label": "grade"})
    splits = make_splits(table, SplitConfig(design="cv", k_folds=folds, repeats=1))
    return save_splits(splits, root / "splits.csv")


def holdout_splits(root: Path, folds: int, subjects: int) -> Path:
    """A split table with a fixed test set (fold -1): the made-up test subjects, and four times
    as many others dealt into the folds (a CSV that every kdlib version reads)."""
    test = synthetic_predictions(subjects, 2, lgg_fraction=0.5).drop_duplicates("subject_id")
    rows = [(s, grade, -1) for s, grade in zip(test["subject_id"], test["label"])]  # tumour slices
    rows += [(f"T{i:03d}", ("HGG", "LGG")[i % 2], i % folds) for i in range(4 * subjects)]
    path = root / "splits.csv"
    pd.DataFrame(rows, columns=["subject_id", "grade", "fold"]).to_csv(path, index=False)
    return path


def write_runs(root: Path, exp: Experiment, folds: int, subjects: int, slices: int,
               design: str = "holdout") -> list:
    """One finished run folder per config of `exp` under root/runs; returns the configs."""
    if design == "cv":
        splits = cv_splits(root, folds, subjects)
        configs = exp.configs(cache="data/bench.h5", splits=str(splits), folds=list(range(folds)))
        table = pd.read_csv(splits)
    else:
        splits = holdout_splits(root, folds, subjects)
        configs = exp.configs(cache="data/bench.h5", splits=str(splits), folds=list(range(folds)))
    runs = root / "runs"
    for i, cfg in enumerate(configs):
        folder = runs / run_id(cfg)
        folder.mkdir(parents=True)
        skill = 0.6 + 0.05 * (i % 7) + 0.02 * cfg.fold
        pred = synthetic_predictions(subjects, slices, lgg_fraction=0.5, skill=skill, seed=i)
        if design == "cv":  # the run tests its outer fold
            test = table[(table["fold"] == cfg.fold) & (table["repeat"] == cfg.repeat)]
            pred = pred[pred["subject_id"].isin(test["subject_id"])].reset_index(drop=True)
        p = pred[[f"p_{c}" for c in CLASSES]].to_numpy()
        for j, c in enumerate(CLASSES):
            pred[f"z_{c}"] = np.log(p[:, j])
        pred.to_csv(folder / "predictions.csv", index=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            metrics = run_metrics(pred)
        metrics.update(params=PARAMS.get(cfg.model, 1000), train_n_healthy=900, train_n_HGG=400,
                       train_n_LGG=int(400 / (cfg.ratio or 1)), n_train_slices=1700,
                       n_test_slices=len(pred), train_ratio=float(cfg.ratio or 1.05),
                       best_epoch=cfg.epochs)
        (folder / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        (folder / "metrics.json").write_text(json.dumps(metrics))
        (folder / "env.json").write_text(json.dumps({"device": "cpu"}))
        pd.DataFrame({"epoch": [1], "time_s": [1.0]}).to_csv(folder / "history.csv", index=False)
        (folder / "model.pt").write_bytes(b"")
    return configs


def timed(label: str, fn: Callable[[], Any], times: dict[str, float],
          cpu: dict[str, float]) -> Any:
    """Call fn once (warnings off, as in the notebook's tables); print and keep its wall and CPU
    time (the CPU time of this process is less inflated by other load on a busy machine)."""
    start, start_cpu = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = fn()
    times[label] = time.perf_counter() - start
    cpu[label] = time.process_time() - start_cpu
    print(f"  {label:<46} {times[label]:8.2f} s {cpu[label]:8.2f} s", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-boot", type=int, default=500, help="bootstrap draws (the demo's n_boot)")
    ap.add_argument("--design", choices=("holdout", "cv"), default="holdout")
    ap.add_argument("--folds", type=int, help="folds (default: 3 holdout, 5 cv)")
    ap.add_argument("--subjects", type=int, help="test subjects (default: 16 holdout, 80 cv)")
    ap.add_argument("--slices", type=int, default=30, help="slices per test subject")
    args = ap.parse_args()
    cv = args.design == "cv"
    folds, subjects = args.folds or (5 if cv else 3), args.subjects or (80 if cv else 16)
    exp = Experiment(**DEMO)
    with tempfile.TemporaryDirectory() as tmp:
        configs = write_runs(Path(tmp), exp, folds, subjects, args.slices, args.design)
        print(f"{len(configs)} runs, design {args.design}, {folds} folds, {subjects} test subjects "
              f"x {args.slices} slices, {args.n_boot} bootstrap draws; kdlib from "
              f"{Path(analysis.__file__).parent}")
        t: dict[str, float] = {}
        c: dict[str, float] = {}
        print(f"  {'call':<46} {'wall':>10} {'CPU':>10}")
        runs = timed("load_runs + select_runs",
                     lambda: select_runs(load_runs(Path(tmp) / "runs"), configs), t, c)
        runs = timed("add_posthoc", lambda: analysis.add_posthoc(runs), t, c)
        q1 = analysis.q1_runs(runs, exp)
        timed("summary_table", lambda: analysis.summary_table(q1), t, c)
        timed("paired_tests", lambda: analysis.paired_tests(q1), t, c)
        b = args.n_boot
        both = [*analysis.Q_METRICS, *[m for m in PER_CLASS if m not in analysis.Q_METRICS]]
        for label, metrics in (("bootstrap_table (Q_METRICS)", analysis.Q_METRICS),
                               ("bootstrap_table (per-class F1)", PER_CLASS),
                               ("bootstrap_table (both, one call)", both)):
            forget = getattr(getattr(analysis, "_counts", None), "cache_clear", None)
            if forget:  # each table from the run folders, as in a fresh notebook
                forget()
            timed(label, lambda m=metrics: analysis.bootstrap_table(q1, metrics=m, n_boot=b), t, c)
        q2 = analysis.q2_runs(runs, exp)
        timed("q2_gains", lambda: analysis.q2_gains(q2), t, c)
        print(f"{len(q1)} question-1 runs (with post-hoc rows)")
        for label, tables in (("as it was: other calls + two tables",
                               ("bootstrap_table (Q_METRICS)", "bootstrap_table (per-class F1)")),
                              ("as it is: other calls + one table",
                               ("bootstrap_table (both, one call)",))):
            total = [sum(v for k, v in d.items() if not k.startswith("bootstrap"))
                     + sum(d[k] for k in tables) for d in (t, c)]
            print(f"  {'notebook 04 ' + label:<46} {total[0]:8.2f} s {total[1]:8.2f} s")


if __name__ == "__main__":
    main()
