"""kdlib.metrics against scikit-learn and hand computations; bad input gives clear errors."""

import numpy as np
import pandas as pd
import pytest
from helpers_eval import synthetic_predictions
from sklearn import metrics as skm

from kdlib import CLASSES
from kdlib.errors import DataError
from kdlib.metrics import (
    arrays,
    average_ranks,
    check_predictions,
    confusion,
    patient_metrics,
    patient_predictions,
    reliability_table,
    run_metrics,
    slice_metrics,
)


def table(rows):
    """rows: (subject, label, p_healthy, p_HGG, p_LGG) -> predictions DataFrame."""
    df = pd.DataFrame(rows, columns=["subject_id", "label", "p_healthy", "p_HGG", "p_LGG"])
    df.insert(1, "slice", range(len(df)))
    return df


HAND = table([
    ("A", "healthy", 0.90, 0.05, 0.05),  # correct, confidence 0.90
    ("A", "HGG", 0.90, 0.05, 0.05),      # wrong, confidence 0.90
    ("B", "LGG", 0.10, 0.28, 0.62),      # correct, confidence 0.62
    ("B", "HGG", 0.08, 0.70, 0.22),      # correct, confidence 0.70 (and a mixed-grade subject!)
])


def test_slice_metrics_match_sklearn():
    pred = synthetic_predictions(25, 12, skill=0.8, seed=1)
    y, P = arrays(check_predictions(pred))
    yhat = P.argmax(axis=1)
    m = slice_metrics(pred)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, yhat))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, yhat, average="macro"))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, yhat))
    prec, rec, f1, sup = skm.precision_recall_fscore_support(y, yhat, labels=[0, 1, 2])
    for i, c in enumerate(CLASSES):
        assert m[f"precision_{c}"] == pytest.approx(prec[i])
        assert m[f"recall_{c}"] == pytest.approx(rec[i])
        assert m[f"f1_{c}"] == pytest.approx(f1[i])
        assert m[f"support_{c}"] == sup[i]
        assert m[f"auc_{c}"] == pytest.approx(skm.roc_auc_score(y == i, P[:, i]))
        assert m[f"ap_{c}"] == pytest.approx(skm.average_precision_score(y == i, P[:, i]))


def test_auc_and_ap_with_tied_scores_match_sklearn():
    pred = synthetic_predictions(20, 9, skill=0.5, seed=2)
    p = np.round(pred[["p_healthy", "p_HGG"]].to_numpy(), 1)
    pred["p_healthy"], pred["p_HGG"] = p[:, 0], p[:, 1]
    pred["p_LGG"] = 1 - p.sum(axis=1)
    pred = pred[pred["p_LGG"] >= 0]
    y, P = arrays(check_predictions(pred))
    m = slice_metrics(pred)
    for i, c in enumerate(CLASSES):
        assert m[f"auc_{c}"] == pytest.approx(skm.roc_auc_score(y == i, P[:, i]))
        assert m[f"ap_{c}"] == pytest.approx(skm.average_precision_score(y == i, P[:, i]))


def test_average_ranks_equal_scipys_with_ties():
    from scipy.stats import rankdata
    rng = np.random.default_rng(0)
    for x in (rng.normal(size=50), np.round(rng.random(200), 1), np.ones(5), np.array([3.0])):
        assert np.array_equal(average_ranks(x), rankdata(x))
    assert average_ranks(np.array([0.2, 0.1, 0.2, 0.9])).tolist() == [2.5, 1.0, 2.5, 4.0]


def test_ece_by_hand():
    m = slice_metrics(HAND)
    # bins of width 1/15: (0.9: acc 1/2), (0.62: acc 1), (0.70: acc 1)
    assert m["ece"] == pytest.approx(2 / 4 * 0.4 + 1 / 4 * 0.38 + 1 / 4 * 0.30)
    # one-vs-rest p_LGG: bin (0, 1/15] holds 0.05, 0.05 (no LGG); 0.62 (LGG); 0.22 (not LGG)
    assert m["ece_LGG"] == pytest.approx(2 / 4 * 0.05 + 1 / 4 * 0.38 + 1 / 4 * 0.22)
    t = reliability_table(HAND)
    assert t["count"].sum() == 4 and len(t) == 15


def test_hand_per_class_values():
    m = slice_metrics(HAND)
    # predicted: healthy, healthy, LGG, HGG ; true: healthy, HGG, LGG, HGG
    assert m["precision_healthy"] == pytest.approx(0.5)
    assert m["recall_HGG"] == pytest.approx(0.5)
    assert m["f1_HGG"] == pytest.approx(2 / 3)
    assert m["f1_LGG"] == pytest.approx(1.0)
    assert m["balanced_accuracy"] == pytest.approx((1 + 0.5 + 1) / 3)


def test_absent_class_gives_nan_and_warning():
    pred = synthetic_predictions(10, 9, lgg_fraction=0.0, seed=3)
    with pytest.warns(UserWarning, match="absent"):
        m = slice_metrics(pred)
    assert all(np.isnan(m[f"{k}_LGG"]) for k in ("precision", "recall", "f1", "auc", "ap", "ece"))
    y, P = arrays(check_predictions(pred))
    assert m["macro_f1"] == pytest.approx(
        skm.f1_score(y, P.argmax(1), labels=[0, 1], average="macro", zero_division=0))
    with pytest.warns(UserWarning):
        assert np.isnan(confusion(pred, normalize="true").loc["LGG"]).all()


def test_class_never_predicted_has_precision_zero():
    pred = synthetic_predictions(10, 9, seed=4)
    pred["p_LGG"] = 0.0
    total = pred["p_healthy"] + pred["p_HGG"]
    pred["p_healthy"] /= total
    pred["p_HGG"] /= total
    m = slice_metrics(pred)
    assert m["precision_LGG"] == 0.0 and m["recall_LGG"] == 0.0 and m["f1_LGG"] == 0.0


def test_confusion_matches_sklearn():
    pred = synthetic_predictions(12, 9, seed=5)
    y, P = arrays(check_predictions(pred))
    cm = confusion(pred)
    assert list(cm.index) == list(CLASSES) == list(cm.columns)
    np.testing.assert_array_equal(cm.to_numpy(), skm.confusion_matrix(y, P.argmax(1)))
    np.testing.assert_allclose(confusion(pred, "true").sum(axis=1), 1.0)


@pytest.mark.parametrize("change, match", [
    (lambda d: d.iloc[:0], "no rows"),
    (lambda d: d.drop(columns="p_LGG"), "missing column"),
    (lambda d: d.assign(p_LGG=d["p_LGG"] + 0.1), "sum to 1"),
    (lambda d: d.assign(label="tumour"), "unknown label"),
    (lambda d: d.assign(p_HGG=np.nan), "NaN"),
    (lambda d: pd.concat([d, d.iloc[:1]]), "duplicated"),
])
def test_bad_predictions_raise_data_error(change, match):
    with pytest.raises(DataError, match=match):
        slice_metrics(change(synthetic_predictions(4, 6)))


def test_patient_grade_by_true_and_predicted_tumour_slices():
    pred = table([
        ("P1", "healthy", 0.10, 0.10, 0.80),  # healthy slice that looks LGG
        ("P1", "HGG", 0.50, 0.30, 0.20),
        ("P1", "HGG", 0.60, 0.30, 0.10),      # true tumour slices: HGG 0.30 vs LGG 0.15 -> HGG
        ("P2", "LGG", 0.20, 0.50, 0.30),
        ("P2", "LGG", 0.10, 0.30, 0.60),      # 0.40 vs 0.45 -> LGG
        ("P3", "healthy", 0.8, 0.1, 0.1),     # no tumour slice: no grade, left out
    ])
    with pytest.warns(UserWarning, match="without a tumour slice"):
        pt = patient_predictions(pred, by="true").set_index("subject_id")
    assert list(pt.index) == ["P1", "P2"]
    assert pt.loc["P1", "p_HGG"] == pytest.approx(0.30) and pt.loc["P1", "pred_grade"] == "HGG"
    assert pt.loc["P2", "p_LGG"] == pytest.approx(0.45) and pt.loc["P2", "pred_grade"] == "LGG"
    with pytest.warns(UserWarning):
        pp = patient_predictions(pred, by="predicted").set_index("subject_id")
    # P1: only slice 0 is predicted tumour (LGG 0.8) -> LGG; P2: both slices predicted tumour
    assert pp.loc["P1", "pred_grade"] == "LGG" and pp.loc["P1", "n_slices"] == 1
    with pytest.warns(UserWarning):
        m = patient_metrics(pred)
    assert m["patient_balanced_accuracy"] == 1.0 and m["patient_recall_LGG"] == 1.0
    with pytest.warns(UserWarning):
        m = patient_metrics(pred, by="predicted")
    assert m["patient_recall_HGG"] == 0.0 and m["patient_balanced_accuracy"] == 0.5


def test_patient_fallback_to_all_slices_when_none_predicted_tumour():
    pred = table([("P1", "HGG", 0.5, 0.3, 0.2), ("P1", "HGG", 0.6, 0.25, 0.15)])
    pt = patient_predictions(pred, by="predicted")
    assert pt.loc[0, "n_slices"] == 2 and pt.loc[0, "pred_grade"] == "HGG"


def test_patient_with_both_grades_is_an_error():
    with pytest.raises(DataError, match="both HGG and LGG"):
        patient_predictions(HAND)


def test_patient_metrics_hand_and_missing_grade():
    pred = synthetic_predictions(10, 6, lgg_fraction=0.0, seed=6)
    with pytest.warns(UserWarning, match="no \\['LGG'\\] patient"):
        m = patient_metrics(pred)
    assert np.isnan(m["patient_recall_LGG"]) and m["patient_balanced_accuracy"] == m[
        "patient_recall_HGG"]


def test_run_metrics_has_contract_keys():
    m = run_metrics(synthetic_predictions(8, 6))
    keys = {"accuracy", "balanced_accuracy", "macro_f1", "ece", "ece_LGG",
            "patient_balanced_accuracy", "patient_recall_LGG"}
    keys |= {f"{k}_{c}" for k in ("precision", "recall", "f1", "auc", "ap") for c in CLASSES}
    assert keys <= set(m) and all(isinstance(v, float) for v in m.values())
