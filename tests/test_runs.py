"""kdlib.runs: run folders (finished or not), teacher lookup, resume checks, atomic writes, and
finishing a run folder."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
import yaml

from kdlib.config import write_yaml
from kdlib.errors import RunError
from kdlib.runs import (
    RUN_FILES,
    check_resume,
    execution_identity,
    finish_run,
    is_finished,
    save_atomic,
    teacher_dir,
)


def finished(folder):
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text("{}")
    return folder


def test_is_finished_needs_metrics_and_a_final_name(tmp_path):
    assert is_finished(finished(tmp_path / "run-a"))
    assert not is_finished(finished(tmp_path / ".tmp-run-b"))
    (tmp_path / "run-c").mkdir()
    assert not is_finished(tmp_path / "run-c") and not is_finished(tmp_path / "none")


def test_teacher_dir_by_run_id_or_path_and_its_errors(tmp_path):
    runs = tmp_path / "runs"
    t = finished(runs / "cnn_m-ce-f0-r4-s0-12345678")
    assert teacher_dir(t.name, runs) == t
    assert teacher_dir(str(t), tmp_path / "elsewhere") == t
    (runs / ".tmp-cnn_m-ce-f1-r4-s0-aaaaaaaa").mkdir()
    with pytest.raises(RunError, match=r"teacher run cnn_m-ce-f1-r4-s0-aaaaaaaa is unfinished"):
        teacher_dir("cnn_m-ce-f1-r4-s0-aaaaaaaa", runs)
    with pytest.raises(RunError, match=r"teacher 'nope' not found.*train the teacher first"):
        teacher_dir("nope", runs)


def test_check_resume_names_what_changed(tmp_path):
    saved = {"config": {"lr": 0.001, "epochs": 3}, "data": {"splits": "aa"},
             "execution": {"device_type": "cpu", "autocast": False}}
    check_resume(saved, saved, tmp_path)  # the same: no error
    changed = {**saved, "config": {"lr": 0.1, "epochs": 3}, "data": {"splits": "bb"}}
    with pytest.raises(RunError, match=r"changed since.*\(lr: 0\.001 -> 0\.1; splits: 'aa' -> 'bb'\)"):
        check_resume(changed, saved, tmp_path)
    gpu = {**saved, "execution": {"device_type": "cuda", "autocast": True}}
    with pytest.raises(RunError, match=r"started on cpu \(float32\).*continue on cuda \(bf16"):
        check_resume(gpu, saved, tmp_path)


def test_atomic_writes_leave_no_partial_file(tmp_path):
    write_yaml(tmp_path / "c.yaml", {"b": 1, "a": [1, 2]})
    assert (tmp_path / "c.yaml").read_text().splitlines()[0] == "b: 1"  # order kept
    assert yaml.safe_load((tmp_path / "c.yaml").read_text()) == {"b": 1, "a": [1, 2]}
    save_atomic(tmp_path / "m.pt", {"w": torch.ones(2)})
    assert torch.equal(torch.load(tmp_path / "m.pt", weights_only=True)["w"], torch.ones(2))
    assert not list(tmp_path.glob("*.part"))


def _finish(tmp, final, value=1.0):
    tmp.mkdir()
    write_yaml(tmp / "config.yaml", {"lr": 0.1})
    (tmp / "checkpoint.pt").write_bytes(b"x")
    pred = pd.DataFrame({"subject_id": ["a"], "p_LGG": [0.5]})
    history = pd.DataFrame({"epoch": [1], "time_s": [0.1]})
    return finish_run(tmp, final, pred, {"macro_f1": value}, history, {"w": torch.zeros(1)},
                      {"device": "cpu", "teacher_path": ""})


def test_check_resume_compares_the_cpu_thread_count(tmp_path):
    def identity(**execution):
        return {"config": {"lr": 0.1}, "data": {"splits": "abc"}, "execution": execution}

    cpu = execution_identity(torch.device("cpu"))
    assert cpu == {"device_type": "cpu", "autocast": False, "cpu_threads": torch.get_num_threads()}
    saved = identity(**{**cpu, "cpu_threads": 4})
    check_resume(saved, saved, tmp_path)
    with pytest.raises(RunError, match=r"started with 4 CPU thread\(s\) and would continue with 2"):
        check_resume(identity(**{**cpu, "cpu_threads": 2}), saved, tmp_path)
    older = identity(device_type="cpu", autocast=False)  # a checkpoint from before the count
    check_resume(identity(**{**cpu, "cpu_threads": 2}), older, tmp_path)


def test_finish_run_writes_every_file_and_renames(tmp_path):
    final = _finish(tmp_path / ".tmp-r", tmp_path / "r")
    assert final == tmp_path / "r" and is_finished(final) and not (tmp_path / ".tmp-r").exists()
    assert sorted(p.name for p in final.iterdir()) == sorted(RUN_FILES)
    assert json.loads((final / "metrics.json").read_text()) == {"macro_f1": 1.0}
    env = json.loads((final / "env.json").read_text())
    assert env["device"] == "cpu" and env["torch"] == torch.__version__
    # a second process that finishes the same run later keeps the first folder, drops its own
    assert _finish(tmp_path / ".tmp-r", tmp_path / "r", value=2.0) == final
    assert json.loads((final / "metrics.json").read_text()) == {"macro_f1": 1.0}
    assert not (tmp_path / ".tmp-r").exists()
