"""From a model's logits to what a run records: class probabilities (with optional post-hoc logit
adjustment), the test predictions table, and the validation scores that pick the best epoch."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from kdlib import CLASSES
from kdlib.losses import posthoc_adjust
from kdlib.metrics import slice_scores
from kdlib.train_config import SELECT_METRICS


def class_probabilities(logits: torch.Tensor, counts: list[int], tau: float | None) -> torch.Tensor:
    """Softmax of the logits, after post-hoc adjustment z - tau log(pi) when tau is set (Menon et
    al., ICLR 2021)."""
    if tau is not None:
        logits = posthoc_adjust(logits, counts, tau)
    return torch.softmax(logits.float(), dim=1)


def predictions_frame(table: pd.DataFrame, logits: torch.Tensor, counts: list[int],
                      tau: float | None) -> pd.DataFrame:
    """The predictions table: subject_id, slice, label, p_<class> (after any post-hoc adjustment)
    and z_<class> (the logits)."""
    z = logits.detach().float().cpu()
    p = class_probabilities(z, counts, tau).numpy().astype(np.float64)
    out = table[["subject_id", "slice", "label"]].reset_index(drop=True).copy()
    for i, c in enumerate(CLASSES):
        out[f"p_{c}"] = p[:, i]
    for i, c in enumerate(CLASSES):
        out[f"z_{c}"] = z[:, i].numpy().astype(np.float64)
    return out


def validation_scores(logits: torch.Tensor, y: torch.Tensor, counts: list[int],
                      tau: float | None) -> dict[str, float]:
    """Validation loss (plain CE of the raw logits) and slice metrics for history and selection."""
    loss = F.cross_entropy(logits.float(), y).item() if len(y) else float("nan")
    p = class_probabilities(logits.cpu(), counts, tau).numpy()
    s = slice_scores(y.cpu().numpy(), p, ranking=False)
    return {"loss": loss, **{k: s[k] for k in SELECT_METRICS if k != "loss"}}
