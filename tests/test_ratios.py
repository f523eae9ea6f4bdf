"""kdlib.ratios: ratio keys and row selection, the natural ratio (None/NaN) matching itself."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from kdlib.ratios import in_ratios, ratio_key, same_ratio


def test_ratio_key_maps_every_natural_spelling_to_nan():
    assert ratio_key(4) == 4.0 and isinstance(ratio_key(4), float)
    assert all(math.isnan(ratio_key(v)) for v in (None, float("nan"), np.nan, np.float32("nan"),
                                                  pd.NA))


def test_same_ratio():
    assert same_ratio(None, float("nan")) and same_ratio(4, 4.0)
    assert not same_ratio(None, 1) and not same_ratio(1, 4)


def test_in_ratios_selects_rows_with_the_natural_ratio_as_missing():
    col = pd.Series([1.0, 4.0, np.nan, 16.0, None])
    assert in_ratios(col, [4]).tolist() == [False, True, False, False, False]
    assert in_ratios(col, [None, 1]).tolist() == [True, False, True, False, True]
    assert in_ratios(col, []).tolist() == [False] * 5

