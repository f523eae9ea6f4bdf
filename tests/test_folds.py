"""kdlib.data.folds: the train/val/test tables and tensors of a config's fold and ratio, and the
errors that name the setting to fix."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from helpers_train import make_cache, tiny_config, tiny_train_data, write_splits

from kdlib.data.folds import fold_data
from kdlib.data.splits import fold_subjects, load_splits
from kdlib.errors import DataError
from kdlib.train_config import TrainConfig


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_train_data(tmp_path_factory.mktemp("data"))


def cfg(cache, splits, **over):
    return TrainConfig.from_dict(tiny_config(cache, splits, **over))


@pytest.mark.parametrize("ratio", [None, 2.0])
def test_fold_data_holds_each_sets_slices(data, ratio):
    cache, splits = data
    out = fold_data(cfg(cache, splits, fold=1, ratio=ratio), torch.device("cpu"))
    assert out["cache"] == cache.resolve() and out["splits"] == splits.resolve()
    sets = fold_subjects(load_splits(splits), 1, ratio=ratio, seed=0)
    table = pd.read_csv(cache.with_suffix(".csv"))
    for part in ("train", "val", "test"):
        t, x, y = out[part]
        assert set(t["subject_id"]) == set(sets[part])
        assert len(t) == len(table[table["subject_id"].isin(sets[part])])
        assert x.shape == (len(t), 2, 16, 16) and y.shape == (len(t),)  # flair, t1
    assert set(out["train"][0]["subject_id"]).isdisjoint(out["val"][0]["subject_id"])


def test_fold_data_errors_name_the_setting(data, tmp_path):
    cache, splits = data
    with pytest.raises(DataError, match=r"cache=.*does not exist.*prepare the slice cache"):
        fold_data(cfg(tmp_path / "no.h5", splits), torch.device("cpu"))
    with pytest.raises(DataError, match=r"splits=.*does not exist.*write the splits"):
        fold_data(cfg(cache, tmp_path / "no.csv"), torch.device("cpu"))
    small = make_cache(tmp_path / "small", n_hgg=4, n_lgg=4, slices=2)  # fewer subjects
    with pytest.raises(DataError, match=r"subject\(s\) of .* have no slice in .*another dataset"):
        fold_data(cfg(small, splits), torch.device("cpu"))
    assert write_splits(small, tmp_path / "s.csv").is_file()
    assert len(fold_data(cfg(small, tmp_path / "s.csv"), torch.device("cpu"))["val"][0])
