"""kdlib.stacked: runs trained together give fit's numbers, resume, grouping, fallback, failures."""

from __future__ import annotations

import json
import logging

import pandas as pd
import pytest
import torch
from helpers_train import tiny_config, tiny_train_data

import kdlib.runs
import kdlib.stacked
import kdlib.train
from kdlib import CLASSES
from kdlib.errors import ConfigError, RunError
from kdlib.identity import run_id
from kdlib.lock import run_lock
from kdlib.results import load_history, load_predictions, load_runs
from kdlib.runs import RUN_FILES
from kdlib.stacked import fit_group, group_configs
from kdlib.train import fit
from kdlib.train_config import load_train_config

REAL_SCORES = kdlib.train.validation_scores

# Measured on this machine (3 epochs, 5 runs incl. KD and DKD): history 1.7e-6, probabilities
# 6e-8, metrics 4e-9. The tolerances leave room for other CPUs' kernels.
HISTORY_ATOL, PROB_ATOL, LOGIT_ATOL, METRIC_ATOL = 1e-5, 1e-6, 1e-5, 1e-6


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_train_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def teacher(data, tmp_path_factory):
    return fit(tiny_config(*data, model="cnn_s"), tmp_path_factory.mktemp("runs"), progress=False)


def _close_run(a, b):
    """Same files, columns and run id; numbers equal within the stated tolerances."""
    assert a.name == b.name and sorted(p.name for p in a.iterdir()) == sorted(RUN_FILES)
    assert sorted(p.name for p in b.iterdir()) == sorted(RUN_FILES)
    ha, hb = load_history(a), load_history(b)
    assert list(ha.columns) == list(hb.columns)
    pd.testing.assert_frame_equal(ha.drop(columns="time_s"), hb.drop(columns="time_s"),
                                  check_exact=False, rtol=0, atol=HISTORY_ATOL)
    pa, pb = load_predictions(a), load_predictions(b)
    assert list(pa.columns) == list(pb.columns)
    pd.testing.assert_frame_equal(pa.filter(like="p_"), pb.filter(like="p_"), check_exact=False,
                                  rtol=0, atol=PROB_ATOL)
    pd.testing.assert_frame_equal(pa.filter(like="z_"), pb.filter(like="z_"), check_exact=False,
                                  rtol=0, atol=LOGIT_ATOL)
    ma, mb = (json.loads((x / "metrics.json").read_text()) for x in (a, b))
    assert ma.keys() == mb.keys()
    for k in ma:
        assert ma[k] == pytest.approx(mb[k], abs=METRIC_ATOL, nan_ok=True), k


def _same_run(a, b):
    assert (a / "metrics.json").read_bytes() == (b / "metrics.json").read_bytes()
    assert (a / "predictions.csv").read_bytes() == (b / "predictions.csv").read_bytes()
    ha, hb = load_history(a).drop(columns="time_s"), load_history(b).drop(columns="time_s")
    pd.testing.assert_frame_equal(ha, hb, check_exact=True)
    sa, sb = (torch.load(x / "model.pt", weights_only=True) for x in (a, b))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _mixed(data, teacher, epochs=3):
    """Baselines and distillers of one student on one split: a group."""
    return [tiny_config(*data, epochs=epochs),
            tiny_config(*data, epochs=epochs, task_loss="logit_adjusted", lr=1e-3),
            tiny_config(*data, epochs=epochs, distiller="kd", teacher=str(teacher)),
            tiny_config(*data, epochs=epochs, distiller="dkd", teacher=str(teacher),
                        cache_teacher_logits=True),
            tiny_config(*data, epochs=epochs, task_loss="focal", warmup_epochs=1,
                        weight_decay=0.01)]


@pytest.mark.parametrize("vectorise", [True, False])
def test_group_equals_runs_trained_alone(data, teacher, tmp_path, vectorise):
    cfgs = _mixed(data, teacher)
    group = fit_group(cfgs, tmp_path / "group", progress=False, vectorise=vectorise)
    alone = [fit(c, tmp_path / "alone", progress=False) for c in cfgs]
    assert [p.name for p in group] == [run_id(load_train_config(c)) for c in cfgs]
    for g, a in zip(group, alone):
        _close_run(g, a)
        if not vectorise:  # the same kernels as fit: bit for bit
            _same_run(g, a)
    runs = load_runs(tmp_path / "group")
    assert sorted(runs["method"]) == sorted(load_runs(tmp_path / "alone")["method"])
    assert not list((tmp_path / "group").glob(".tmp-*"))
    stamp = (group[0] / "metrics.json").stat().st_mtime_ns
    assert fit_group(cfgs, tmp_path / "group", progress=False) == group  # finished: skipped
    assert (group[0] / "metrics.json").stat().st_mtime_ns == stamp


def _scripted_f1(monkeypatch, module):
    """validation_scores in `module` with a macro-F1 sequence per run, told apart by posthoc_tau."""
    f1 = {0.5: iter([0.6, 0.5]), None: iter([0.1, 0.2, 0.3, 0.4])}
    monkeypatch.setattr(module, "validation_scores", lambda logits, y, counts, tau: {
        **REAL_SCORES(logits, y, counts, tau), "macro_f1": next(f1[tau])})


def test_a_stopped_run_stops_changing_and_the_others_go_on(data, tmp_path, monkeypatch):
    early = tiny_config(*data, epochs=4, patience=1, posthoc_tau=0.5)  # stops after epoch 2
    late = tiny_config(*data, epochs=4, lr=1e-3)
    _scripted_f1(monkeypatch, kdlib.stacked)
    paths = fit_group([early, late], tmp_path / "group", progress=False, vectorise=True)
    m = [json.loads((p / "metrics.json").read_text()) for p in paths]
    assert (m[0]["best_epoch"], m[0]["epochs_run"]) == (1, 2)
    assert (m[1]["best_epoch"], m[1]["epochs_run"]) == (4, 4)
    _scripted_f1(monkeypatch, kdlib.train)
    for p, c in zip(paths, (early, late)):
        _close_run(p, fit(c, tmp_path / "alone", progress=False))


class Interrupt(Exception):
    pass


def _interrupt(monkeypatch, target, name, call):
    real, count = getattr(target, name), [0]

    def wrapped(*args, **kw):
        count[0] += 1
        if count[0] == call:
            raise Interrupt
        return real(*args, **kw)

    monkeypatch.setattr(target, name, wrapped)


@pytest.mark.parametrize("target, name, call, vectorise", [
    (kdlib.data.loader, "augment_batch", 4, False),  # mid-epoch 2: every run has epoch 1
    (kdlib.runs, "save_atomic", 5, True),  # epoch 2 saved for one run of the 3: they differ by one
])
def test_interrupted_group_resumes_to_the_same_numbers(data, teacher, tmp_path, monkeypatch,
                                                       target, name, call, vectorise):
    cfgs = _mixed(data, teacher)[:3]
    straight = fit_group(cfgs, tmp_path / "straight", progress=False, vectorise=vectorise)
    _interrupt(monkeypatch, target, name, call)
    with pytest.raises(Interrupt):
        fit_group(cfgs, tmp_path / "resumed", progress=False, vectorise=vectorise)
    epochs = sorted(torch.load(p / "checkpoint.pt", weights_only=True)["state"]["epoch"]
                    for p in (tmp_path / "resumed").glob(".tmp-*"))
    assert epochs == ([1, 1, 1] if name == "augment_batch" else [1, 1, 2])
    monkeypatch.undo()
    resumed = fit_group(cfgs, tmp_path / "resumed", progress=False, vectorise=vectorise)
    assert not list((tmp_path / "resumed").glob(".tmp-*"))
    for a, b in zip(straight, resumed):
        _same_run(a, b)


def test_a_run_interrupted_alone_resumes_in_a_group_and_back(data, tmp_path, monkeypatch):
    cfgs = [tiny_config(*data, epochs=3), tiny_config(*data, epochs=3, task_loss="focal")]
    straight = fit_group(cfgs, tmp_path / "straight", progress=False, vectorise=True)
    _interrupt(monkeypatch, kdlib.data.loader, "augment_batch", 4)
    with pytest.raises(Interrupt):
        fit(cfgs[1], tmp_path / "mixed", progress=False)  # epoch 1 done alone
    monkeypatch.undo()
    resumed = fit_group(cfgs, tmp_path / "mixed", progress=False, vectorise=True)
    for a, b in zip(straight, resumed):
        _close_run(a, b)


# ---------------------------------------------------------------- grouping


def test_group_configs_partitions_a_plan_teachers_first(data):
    ids = lambda cfgs: [run_id(load_train_config(c)) for c in cfgs]
    t = {f: tiny_config(*data, model="cnn_s", fold=f) for f in (0, 1)}
    students = {f: [tiny_config(*data, fold=f),
                    tiny_config(*data, fold=f, distiller="kd", teacher=ids([t[f]])[0]),
                    tiny_config(*data, fold=f, task_loss="focal")] for f in (0, 1)}
    own = tiny_config(*data, seed=1)  # teacher of a student of its own architecture
    own_student = tiny_config(*data, seed=1, distiller="kd", teacher=ids([own])[0])
    ldam = tiny_config(*data, task_loss="ldam_drw")
    plan = [*students[0], ldam, *students[1], own_student, t[0], t[1], own, t[0]]
    groups = [ids(g) for g in group_configs(plan)]
    assert sorted(map(sorted, groups)) == sorted(map(sorted, [
        ids(students[0]), ids(students[1]), ids([ldam]), ids([t[0]]), ids([t[1]]), ids([own]),
        ids([own_student])]))
    position = {rid: i for i, g in enumerate(groups) for rid in g}
    for rid, cfg in zip(ids(plan), plan):
        if cfg.get("teacher"):
            assert position[cfg["teacher"]] < position[rid]
    for g in group_configs(plan):
        kdlib.stacked.check_group(g)
    assert sorted(map(len, group_configs(plan, max_size=2))) == [1, 1, 1, 1, 1, 1, 1, 2, 2]
    with pytest.raises(ConfigError, match="max_size"):
        group_configs(plan, max_size=0)


def test_group_configs_breaks_a_cycle_between_groups_by_teacher_depth(data):
    ids = lambda cfgs: [run_id(load_train_config(c)) for c in cfgs]
    xs_t, s_t = tiny_config(*data), tiny_config(*data, model="cnn_s")  # teachers, no teacher
    xs_kd = tiny_config(*data, distiller="kd", teacher=ids([s_t])[0])  # teachers themselves
    s_kd = tiny_config(*data, model="cnn_s", distiller="kd", teacher=ids([xs_t])[0])
    last = [tiny_config(*data, model="cnn_m", distiller="kd", teacher=ids([t])[0])
            for t in (xs_kd, s_kd)]
    # by kind, {xs_t, xs_kd} and {s_t, s_kd} would each wait for the other
    groups = [ids(g) for g in group_configs([xs_t, s_t, xs_kd, s_kd, *last])]
    assert sorted(map(sorted, groups[:2])) == sorted([ids([xs_t]), ids([s_t])])
    assert sorted(map(sorted, groups[2:4])) == sorted([ids([xs_kd]), ids([s_kd])])
    assert sorted(groups[4]) == sorted(ids(last))


@pytest.mark.parametrize("over, match, vectorise", [
    ({"fold": 1}, r"fold is 0 in one and 1", None),
    ({"seed": 3}, r"seed is 0 in one and 3", None),
    ({"model": "cnn_s"}, r"model is 'cnn_xs' in one and 'cnn_s'", True),  # vmap: one model
    ({"batch_size": 4}, r"batch_size", None),
    ({"task_loss": "ldam_drw"}, r"head is 'linear' in one and 'cosine'", True),
    ({"augment": False}, r"augment", None),
    ({"repeat": 1}, r"repeat is 0 in one and 1", None),
    ({"compile": True}, r"compile is False in one and True", None),
])
def test_runs_that_cannot_share_a_group_are_rejected(data, tmp_path, over, match, vectorise):
    with pytest.raises(ConfigError, match=rf"cannot be trained together: {match}.*group_configs"):
        fit_group([tiny_config(*data), tiny_config(*data, **over)], tmp_path, progress=False,
                  vectorise=vectorise)
    assert not list(tmp_path.iterdir())


def test_students_of_several_models_one_after_the_other_equal_runs_alone(data, teacher,
                                                                         tmp_path):
    """The CPU launcher's groups (mix_models): cnn_xs and cnn_s students, and a cosine head, share
    one batch sequence and one teacher pass per step, each with fit's numbers bit for bit."""
    cfgs = [tiny_config(*data, distiller="kd", teacher=str(teacher)),
            tiny_config(*data, model="cnn_s", distiller="kd", teacher=str(teacher)),
            tiny_config(*data, model="cnn_s", task_loss="focal"),  # not the teacher's config
            tiny_config(*data, task_loss="ldam_drw")]
    assert len(group_configs(cfgs)) == 3 and len(group_configs(cfgs, mix_models=True)) == 1
    group = fit_group(cfgs, tmp_path / "group", progress=False)  # the CPU: one after the other
    alone = [fit(c, tmp_path / "alone", progress=False) for c in cfgs]
    for g, a in zip(group, alone):
        _same_run(g, a)


def test_models_of_two_memory_formats_are_not_trained_together(data, tmp_path):
    """On the CPU the ladder CNNs train channels-last and torchvision's models do not: the
    launcher never groups them, and fit_group trains such runs one by one."""
    cfgs = [load_train_config(tiny_config(*data, model=m)) for m in ("cnn_xs", "resnet18")]
    assert len(group_configs(cfgs, mix_models=True)) == 2
    problem = kdlib.stacked._fit_stacked(cfgs, tmp_path, torch.device("cpu"), False, False)
    assert problem == "its models do not share one memory format on cpu"
    assert not list(tmp_path.iterdir())


def test_a_teacher_and_its_student_in_one_group_are_rejected(data, tmp_path):
    t = tiny_config(*data)
    s = tiny_config(*data, distiller="kd", teacher=run_id(load_train_config(t)))
    with pytest.raises(ConfigError, match=r"distils from .* same group"):
        fit_group([t, s], tmp_path, progress=False)


# ---------------------------------------------------------------- fallback and failures


@pytest.mark.parametrize("vectorise", [True, False])
def test_models_with_dropout_fall_back_to_fit_one_by_one(data, tmp_path, caplog, vectorise):
    cfgs = [tiny_config(*data, model="mobilenet_v3_small", epochs=1),
            tiny_config(*data, model="mobilenet_v3_small", epochs=1, task_loss="focal")]
    with caplog.at_level(logging.WARNING, logger="kdlib.stacked"):
        paths = fit_group(cfgs, tmp_path / "group", progress=False, vectorise=vectorise)
    assert "cannot be trained together: it draws random numbers" in caplog.text
    assert "one by one" in caplog.text
    for p, c in zip(paths, cfgs):
        _same_run(p, fit(c, tmp_path / "alone", progress=False))


def test_a_run_another_process_trains_is_not_trained_twice(data, tmp_path, monkeypatch):
    monkeypatch.setenv("KDLIB_LOCK_WAIT_S", "0.3")
    cfgs = [tiny_config(*data), tiny_config(*data, task_loss="focal")]
    busy = run_id(load_train_config(cfgs[1]))
    with run_lock(tmp_path, busy), pytest.raises(RunError, match=busy):
        fit_group(cfgs, tmp_path, progress=False)
    assert not list(tmp_path.glob(".tmp-*"))  # nothing started


def test_compiled_runs_are_trained_one_by_one(data, tmp_path, monkeypatch, caplog):
    trained = []
    monkeypatch.setattr(kdlib.stacked, "fit", lambda cfg, runs_dir, progress: trained.append(cfg))
    cfgs = [load_train_config(tiny_config(*data, compile=True, task_loss=t)) for t in ("ce", "focal")]
    with caplog.at_level(logging.WARNING, logger="kdlib.stacked"):
        fit_group(cfgs, tmp_path, progress=False)
    assert trained == cfgs and "compile" in caplog.text and "one by one" in caplog.text


def test_a_failing_run_fails_alone_and_the_others_finish(data, tmp_path, monkeypatch):
    real = kdlib.stacked.build_criterion

    def build(task_loss, *args, **kw):
        crit, calls = real(task_loss, *args, **kw), [0]
        if task_loss != "focal":
            return crit

        def criterion(zs, y, zt=None, epoch=0):
            out = crit(zs, y, zt, epoch=epoch)
            calls[0] += 1
            return {**out, "loss": out["loss"] * float("nan")} if calls[0] == 3 else out

        return criterion

    monkeypatch.setattr(kdlib.stacked, "build_criterion", build)
    cfgs = [tiny_config(*data, epochs=3), tiny_config(*data, epochs=3, task_loss="focal")]
    with pytest.raises(RunError, match=r"1 of 2 run\(s\).*focal.*nan at epoch 2, step 1 of 2.*"
                                       r"checkpoint \(epoch 1\) is kept"):
        fit_group(cfgs, tmp_path, progress=False, vectorise=True)
    ok, bad = (run_id(load_train_config(c)) for c in cfgs)
    assert kdlib.runs.is_finished(tmp_path / ok)
    ckpt = torch.load(tmp_path / f".tmp-{bad}" / "checkpoint.pt", weights_only=True)
    assert ckpt["state"]["epoch"] == 1 and len(CLASSES) == 3
