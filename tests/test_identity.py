"""kdlib.identity: run ids and method names."""

from __future__ import annotations

import re

import pytest
from helpers_train import tiny_config, tiny_train_data

from kdlib.identity import RUN_VERSION, config_identity, method_name, run_id
from kdlib.train_config import TrainConfig


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_train_data(tmp_path_factory.mktemp("data"))


def cfg(data, **over):
    return TrainConfig.from_dict(tiny_config(*data, **over))


def test_run_id_is_readable_and_stable(data):
    a = cfg(data, ratio=4, loss_params={})
    assert re.fullmatch(r"cnn_xs-ce-f0-r4-s0-[0-9a-f]{8}", run_id(a))
    assert run_id(a) == run_id(cfg(data, ratio=4.0, device="auto", deterministic=False))
    assert run_id(a) != run_id(cfg(data, ratio=4, seed=1))
    assert run_id(a) != run_id(cfg(data, ratio=4, repeat=1))
    assert "repeat" not in config_identity(a)  # runs from before repeats (repeat 0) keep their id
    f1 = cfg(data, task_loss="focal", loss_params={"gamma": 2})
    assert run_id(f1) == run_id(cfg(data, task_loss="focal", loss_params={"gamma": 2.0}))
    kd = cfg(data, distiller="kd", task_loss="logit_adjusted", teacher="/x/runs/t-123")
    assert run_id(kd).startswith("cnn_xs-kd+logit_adjusted-f0-rnat-s0-")
    same = cfg(data, distiller="kd", task_loss="logit_adjusted", teacher="t-123")
    assert run_id(kd) == run_id(same)


def test_run_id_survives_moving_the_output_root(data, tmp_path, monkeypatch):
    ids = []
    for home in ("a", "b"):
        monkeypatch.setenv("KDLIB_HOME", str(tmp_path / home))
        root = tmp_path / home
        ids.append(run_id(TrainConfig.from_dict(tiny_config(root / "data" / "c.h5",
                                                            root / "runs" / "splits.csv"))))
        ids.append(run_id(TrainConfig.from_dict(tiny_config("data/c.h5", "runs/splits.csv"))))
    assert len(set(ids)) == 1
    outside = run_id(TrainConfig.from_dict(tiny_config(tmp_path / "c.h5", "runs/splits.csv")))
    assert outside != ids[0]  # a file outside the output root keeps its absolute path
    ident = config_identity(TrainConfig.from_dict(tiny_config(tmp_path / "c.h5", "runs/s.csv")))
    assert ident["run_version"] == RUN_VERSION
    assert ident["cache"] == (tmp_path / "c.h5").resolve().as_posix()
    assert ident["splits"] == "runs/s.csv"


def test_method_name_tells_every_variant_apart():
    base = {"task_loss": "ce", "distiller": None, "distill_params": {}, "sampler": "none",
            "posthoc_tau": None}
    assert method_name(base) == "ce"
    assert method_name({**base, "distiller": "kd"}) == "kd"
    assert method_name({**base, "distiller": "kd", "distill_params": {"original": True}}) == "kd_original"
    assert method_name({**base, "distiller": "kd", "task_loss": "logit_adjusted"}) == "kd+logit_adjusted"
    assert method_name({**base, "sampler": "oversample"}) == "ce+oversample"
    assert method_name({**base, "posthoc_tau": 1.0}) == "ce+posthoc"
