"""kdlib.predictions: probabilities with and without post-hoc adjustment, the predictions table,
and the validation scores, against hand-computed values."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from kdlib import CLASSES
from kdlib.predictions import class_probabilities, predictions_frame, validation_scores
from kdlib.train_config import SELECT_METRICS

LOGITS = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.8], [-0.5, 0.2, 0.4]])
COUNTS = [6, 3, 1]


def test_class_probabilities_plain_and_posthoc_by_hand():
    p = class_probabilities(LOGITS, COUNTS, None)
    e = np.exp(LOGITS.numpy())
    np.testing.assert_allclose(p.numpy(), e / e.sum(1, keepdims=True), rtol=1e-6)
    adjusted = class_probabilities(LOGITS, COUNTS, 1.0)  # z - log(pi): the rare class gains
    z = LOGITS.numpy() - np.log(np.array(COUNTS) / sum(COUNTS))
    e = np.exp(z)
    np.testing.assert_allclose(adjusted.numpy(), e / e.sum(1, keepdims=True), rtol=1e-6)
    assert (adjusted[:, 2] > p[:, 2]).all() and (adjusted[:, 0] < p[:, 0]).all()


def test_predictions_frame_columns_and_values():
    table = pd.DataFrame({"subject_id": ["a", "a", "b"], "slice": [3, 4, 7],
                          "label": ["healthy", "HGG", "LGG"], "grade": ["HGG", "HGG", "LGG"]},
                         index=[10, 11, 12])
    out = predictions_frame(table, LOGITS, COUNTS, 0.5)
    assert list(out.columns) == ["subject_id", "slice", "label", *(f"p_{c}" for c in CLASSES),
                                 *(f"z_{c}" for c in CLASSES)]
    assert list(out.index) == [0, 1, 2] and out["subject_id"].tolist() == ["a", "a", "b"]
    np.testing.assert_allclose(out[[f"z_{c}" for c in CLASSES]].to_numpy(), LOGITS.numpy())
    np.testing.assert_allclose(out[[f"p_{c}" for c in CLASSES]].to_numpy(),
                               class_probabilities(LOGITS, COUNTS, 0.5).numpy(), rtol=1e-6)
    assert out[[f"p_{c}" for c in CLASSES]].dtypes.eq(np.float64).all()


def test_validation_scores_cover_the_select_metrics():
    y = torch.tensor([0, 1, 2, 1])
    scores = validation_scores(torch.randn(4, 3), y, [2, 1, 1], None)
    assert set(scores) == set(SELECT_METRICS)


def test_validation_scores_by_hand():
    y = torch.tensor([0, 1, 2])  # LOGITS predict 0, 1, 2: every slice right
    scores = validation_scores(LOGITS, y, COUNTS, None)
    want = -np.mean([np.log(np.exp(r[i]) / np.exp(r).sum()) for i, r in zip(y, LOGITS.numpy())])
    assert scores["loss"] == pytest.approx(want, rel=1e-6)
    assert scores["accuracy"] == 1.0 and scores["macro_f1"] == 1.0
