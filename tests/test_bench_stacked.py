"""benchmarks/bench_stacked.py: its table has a positive figure per model and number of runs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
spec = importlib.util.spec_from_file_location("bench_stacked",
                                              ROOT / "benchmarks" / "bench_stacked.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_the_table_measures_every_way_for_each_model_and_size(capsys):
    rows = bench.stacked_table(("cnn_xs",), (1, 2), teacher="cnn_xs", size=16, batch=8,
                               seconds=0.01, repeats=1)
    assert [(r["model"], r["runs"]) for r in rows] == [("cnn_xs", 1), ("cnn_xs", 2)]
    for r in rows:
        assert min(r["vmap_img_s"], r["loop_img_s"], r["alone_img_s"]) > 0
    assert rows[0]["alone_img_s"] == rows[1]["alone_img_s"]  # the best of all its measurements
    bench.print_table(rows)
    assert "vmap/alone" in capsys.readouterr().out
