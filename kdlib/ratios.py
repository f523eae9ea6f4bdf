"""Training HGG:LGG ratios in run tables, the natural ratio (None or NaN) matching itself.

Kept apart from kdlib.analysis so that the training notebooks select rows without importing the
statistics (scipy.stats: 0.6 s per kernel)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pandas as pd


def ratio_key(value: Any) -> float:
    """A ratio as a float, the natural ratio (None or NaN) as NaN."""
    return math.nan if value is None or pd.isna(value) else float(value)


def same_ratio(a: Any, b: Any) -> bool:
    """True when a and b are the same ratio (both natural counts as the same)."""
    a, b = ratio_key(a), ratio_key(b)
    return (math.isnan(a) and math.isnan(b)) or a == b


def in_ratios(col: pd.Series, ratios: Sequence) -> pd.Series:
    """Rows of a ratio column that are in `ratios`, None/NaN standing for the natural ratio."""
    keys = [ratio_key(r) for r in ratios]
    natural = any(math.isnan(k) for k in keys)
    return col.isin([k for k in keys if not math.isnan(k)]) | (col.isna() & natural)
