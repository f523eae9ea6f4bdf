"""benchmarks/bench_cuda.py: the profiles' runs and slices it projects from, the projection, and
its quick mode end to end on the CPU."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).parents[1]
spec = importlib.util.spec_from_file_location("bench_cuda", ROOT / "benchmarks" / "bench_cuda.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


@pytest.fixture(scope="module")
def nifti():
    return bench.profile_runs("brats2020_nifti")


def test_profile_runs_come_from_the_profiles_experiment(nifti):
    configs, models, values = nifti
    split = values["split"]
    assert (split.design, split.k_folds, split.repeats) == ("cv", 5, 3)
    assert len(configs) == 51 * 5 * 3  # 51 runs per repeat and fold
    assert {(c.repeat, c.fold) for c in configs} == {(r, f) for r in (0, 1, 2) for f in range(5)}
    assert {c.epochs for c in configs} == {values["epochs"]} == {30}
    assert {c.ratio for c in configs} == {None, 8.0, 16.0}
    assert {c.batch_size for c in configs} == {values["batch_size"]} == {128}
    assert values["image_size"] == 128
    pairs = [bench.pair_of(c, models) for c in configs]
    assert sum(m == "mobilenet_v3_small" for m, _ in pairs) == 36 * 15  # 36 of each split's 51
    assert ("mobilenet_v3_small", "resnet50") in pairs and ("resnet50", None) in pairs


def test_split_slices_follow_the_splits_code(nifti, tmp_path):
    configs, _, values = nifti
    split = values["split"]
    out = bench.split_slices(split, configs, None, 10.0)
    assert set(out) == {bench.slice_key(c) for c in configs}
    for (repeat, fold, ratio, seed), s in out.items():
        natural = out[(repeat, fold, None, seed)]
        assert sum(natural.values()) == 369 * 10.0  # cv: every subject in one of the three sets
        assert s["train"] < natural["train"] if ratio else s == natural
        assert (s["val"], s["test"]) == (natural["val"], natural["test"])
    rows = [{"subject_id": f"S{i:02d}", "grade": "HGG" if i < 16 else "LGG", "slice": z}
            for i in range(24) for z in range(3 if i % 2 else 5)]
    pd.DataFrame(rows).to_csv(tmp_path / "t.csv", index=False)
    real = bench.split_slices(split, configs, tmp_path / "t.csv", 0.0)
    natural = [s for (_, _, ratio, _), s in real.items() if ratio is None]
    assert natural and all(sum(s.values()) == len(rows) for s in natural)


def test_project_hours_by_hand(nifti):
    configs, models, _ = nifti
    cfg = next(c for c in configs if c.teacher is None and c.model == "resnet50")
    slices = {bench.slice_key(cfg): {"train": 1000.0, "val": 200.0, "test": 300.0}}
    rates = {("resnet50", None): {True: {"train_ips": 100.0}, False: {"train_ips": 200.0}}}
    costs = {"resnet50": {"eval_ips": 500.0, "checkpoint_s": 1.0}}
    overhead = {"startup_s": 5.0, "load_slices_per_s": 1500.0}
    run = 30 * (1000 / 100 + 200 / 500 + 1.0) + 300 / 500 + 5.0 + 1500 / 1500
    hours = bench.project_hours([cfg], models, slices, rates, costs, overhead, True)
    assert hours == pytest.approx(run / 3600)
    halved = bench.project_hours([cfg], models, slices, rates, costs, overhead, True,
                                 (("resnet50", None), 2.0))
    assert halved == pytest.approx(run / 2 / 3600)


@pytest.mark.slow
def test_quick_mode_prints_the_table_on_the_cpu(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_cuda.py"), "--quick",
                           "--device", "cpu", "--profiles", "smoke", "--json", str(out)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=900,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "img/s det" in proc.stdout and "smoke: " in proc.stdout
    res = json.loads(out.read_text())
    assert res["device"] == "cpu" and res["quick"]
    assert {r["model"] for r in res["rows"]} == {"cnn_xs", "cnn_s", "cnn_m"}
    assert all(r["det_ips"] > 0 and r["nondet_ips"] > 0 for r in res["rows"])
    (proj,) = res["projections"]
    assert proj["profile"] == "smoke" and proj["hours_det"] > 0
    assert set(res["concurrency"]["ips"]) == {"1", "2"}
