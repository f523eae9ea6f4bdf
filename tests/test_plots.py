"""kdlib.plots: every figure kind writes a non-empty PDF (TrueType fonts) and PNG from synthetic
inputs at the thesis text width."""

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from helpers_eval import synthetic_predictions, synthetic_runs

from kdlib import CLASSES
from kdlib import plots as P
from kdlib import style as S
from kdlib.errors import DataError
from kdlib.metrics import confusion
from kdlib.stats import bootstrap_metrics, compare_to_baseline, summarize_runs

matplotlib.use("Agg")


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def images(n=9, size=24, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    brain = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.4 * size) ** 2
    x = (rng.normal(1, 0.2, (n, 4, size, size)) * brain).astype(np.float16)
    masks = np.zeros((n, size, size), np.uint8)
    labels = [CLASSES[i % 3] for i in range(n)]
    for i, lab in enumerate(labels):
        if lab != "healthy":
            masks[i, 8:14, 8:14] = 2
            masks[i, 10:12, 10:12] = 4
    return x, masks, labels


def history():
    rows = [{"run_id": f"{m}{f}", "method": m, "fold": f, "epoch": e, "train_loss": 1 / e + f * 0.01,
             "val_loss": 1.2 / e, "val_macro_f1": 0.5 - 0.2 / e, "val_f1_LGG": 0.3 - 0.1 / e}
            for m in ("ce", "kd") for f in range(2) for e in range(1, 5)]
    return pd.DataFrame(rows)


def gains():
    runs = synthetic_runs(ratios=(1, 4), folds=3)
    with pytest.warns(UserWarning):
        return compare_to_baseline(runs, "ce", "f1_LGG", by=("method", "ratio"))


def grid():
    rows = []
    for s, sp in (("cnn_s", 5e4), ("cnn_l", 9e5)):
        for f in range(2):
            rows.append({"method": "ce", "student": s, "teacher": None, "fold": f,
                         "student_params": sp, "f1_LGG": 0.4 + 0.01 * f})
            for t in ("cnn_s", "cnn_l"):
                rows.append({"method": "kd", "student": s, "teacher": t, "fold": f,
                             "student_params": sp, "f1_LGG": 0.42 + 0.02 * f})
    return pd.DataFrame(rows)


def heat():
    with pytest.warns(UserWarning):
        return compare_to_baseline(grid(), {"method": "ce"}, "f1_LGG", by=("teacher", "student"),
                                   pair_on=("student", "fold"), test_train_ratio=0.5)


PRED = synthetic_predictions(10, 9, lgg_fraction=0.5, seed=1)
TWO = {"ce": PRED, "kd": synthetic_predictions(10, 9, lgg_fraction=0.5, seed=1, skill=2.0)}
FIGURES = {
    "class_distribution": lambda: P.plot_class_distribution(
        pd.DataFrame({"split": ["train"] * 6 + ["test"] * 3, "label": list(CLASSES) * 3})),
    "example_slices": lambda: P.plot_example_slices(*images()),
    "intensity_histograms": lambda: P.plot_intensity_histograms(images()[0], images()[2]),
    "learning_curves": lambda: P.plot_learning_curves(history()),
    "learning_curves_runs": lambda: P.plot_learning_curves(history(), aggregate=False),
    "confusion": lambda: P.plot_confusion(PRED),
    "roc_pr": lambda: P.plot_roc_pr(PRED),
    "roc_pr_runs": lambda: P.plot_roc_pr(TWO),
    "reliability": lambda: P.plot_reliability(TWO),
    "per_class_f1": lambda: P.plot_per_class_f1(pd.concat(
        [bootstrap_metrics(p, ["f1_healthy", "f1_HGG", "f1_LGG"], n_boot=20).assign(method=k)
         for k, p in TWO.items()])),
    "per_class_f1_folds": lambda: P.plot_per_class_f1(
        summarize_runs(synthetic_runs(), [f"f1_{c}" for c in CLASSES])),
    "gain_vs_ratio": lambda: P.plot_gain_vs_ratio(gains()),
    "gain_heatmap": lambda: P.plot_gain_heatmap(heat()),
    "metric_vs_params": lambda: P.plot_metric_vs_params(grid()),
    "metric_vs_params_load_runs_names": lambda: P.plot_metric_vs_params(
        grid().rename(columns={"student": "model", "student_params": "params"})),
}


@pytest.mark.filterwarnings("ignore:.*bootstrap resamples were undefined")
@pytest.mark.parametrize("name", list(FIGURES))
def test_every_figure_writes_pdf_and_png(name, tmp_path):
    fig = FIGURES[name]()
    assert fig.get_size_inches()[0] == pytest.approx(418.25 / 72.27)
    paths = S.save_figure(fig, name, profile="smoke", root=tmp_path)
    assert set(paths) == {"pdf", "png"}
    pdf = paths["pdf"].read_bytes()
    assert paths["pdf"] == tmp_path / "smoke" / f"{name}.pdf"
    assert pdf.startswith(b"%PDF") and b"FontFile2" in pdf and b"Type3" not in pdf
    png = paths["png"].read_bytes()
    assert png.startswith(b"\x89PNG")
    width = int.from_bytes(png[16:20], "big")
    assert 1500 < width <= 1760  # ~ text width at 300 dpi, never wider


def test_bad_inputs_raise():
    x, m, labels = images()
    with pytest.raises(DataError, match="need images"):
        P.plot_example_slices(x[:, :3], m, labels)
    with pytest.raises(DataError, match="missing"):
        P.plot_learning_curves(history(), panels=["val_auc"])
    g = heat()
    with pytest.raises(DataError, match="several rows"):
        P.plot_gain_heatmap(pd.concat([g, g]))
    with pytest.warns(UserWarning, match="without a numeric ratio"):
        P.plot_gain_vs_ratio(pd.concat([gains(), gains().assign(ratio=np.nan)]))


def test_plot_confusion_draws_kdlib_metrics_confusion(monkeypatch):
    calls = []

    def spy(pred, normalize=None):
        calls.append(normalize)
        return confusion(pred, normalize)

    monkeypatch.setattr(P, "confusion", spy)
    fig = P.plot_confusion(PRED)
    assert calls == [None, "true"]
    counts, norm = confusion(PRED), confusion(PRED, "true")
    texts = [[t.get_text() for t in ax.texts] for ax in fig.axes[:2]]
    assert texts[0] == [f"{v:,.0f}" for v in counts.to_numpy().ravel()]
    assert texts[1] == [f"{v:.2f}" for v in norm.to_numpy().ravel()]


@pytest.mark.parametrize("name, draw", [
    ("plot_gain_vs_ratio", lambda: P.plot_gain_vs_ratio(gains().iloc[:0])),
    ("plot_gain_heatmap", lambda: P.plot_gain_heatmap(heat().iloc[:0])),
    ("plot_per_class_f1", lambda: P.plot_per_class_f1(
        summarize_runs(synthetic_runs(), [f"f1_{c}" for c in CLASSES]).iloc[:0])),
    ("plot_per_class_f1", lambda: P.plot_per_class_f1(
        bootstrap_metrics(PRED, ["macro_f1"], n_boot=5).assign(method="ce"))),  # no f1_<class> row
    ("plot_metric_vs_params", lambda: P.plot_metric_vs_params(grid().iloc[:0])),
])
def test_empty_tables_say_nothing_to_plot(name, draw):
    with pytest.raises(DataError, match=f"{name}: nothing to plot"):
        draw()
