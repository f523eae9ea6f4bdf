"""kdlib.plan: dependency order, levels, the plan.jsonl round trip and its checks."""

from __future__ import annotations

import json

import pytest
from helpers_train import tiny_config

from kdlib.errors import ConfigError
from kdlib.identity import run_id
from kdlib.plan import PlanEntry, make_plan, plan_entry, plan_levels, read_plan, write_plan
from kdlib.train import TrainConfig

CACHE, SPLITS = "data/c.h5", "runs/x/splits.csv"  # never opened


def cfg(**over) -> TrainConfig:
    return TrainConfig.from_dict(tiny_config(CACHE, SPLITS, **over))


@pytest.fixture
def chain():
    """A teacher, its student, a student of that student, and a baseline."""
    t = cfg(model="cnn_s")
    s = cfg(distiller="kd", teacher=run_id(t))
    ss = cfg(distiller="dkd", teacher=run_id(s), model="cnn_s")
    b = cfg(task_loss="focal")
    return t, s, ss, b


def test_make_plan_orders_by_dependency_and_drops_duplicates(chain):
    t, s, ss, b = chain
    plan = make_plan([ss, s, b, t, s, b.to_dict()])  # a dict of settings works too
    assert [e.config for e in plan] == [b, t, s, ss]  # depth 0 in the order given, then 1, 2
    assert [e.depends_on for e in plan] == [(), (), (run_id(t),), (run_id(s),)]
    assert all(e.run_id == run_id(e.config) for e in plan)
    assert [list(r) for r in plan_levels(plan)] == [[0, 1], [2], [3]]
    assert plan_levels([]) == []


def test_a_teacher_outside_the_plan_is_no_dependency(chain):
    t, s, _, _ = chain
    plan = make_plan([s])
    assert plan == [PlanEntry(run_id(s), s, ())]
    path_teacher = cfg(distiller="kd", teacher=f"/elsewhere/runs/{run_id(t)}")
    assert make_plan([t, path_teacher])[1].depends_on == (run_id(t),)  # a path names the run


def test_write_and_read_round_trip(tmp_path, chain):
    plan = make_plan(chain)
    path = write_plan(plan, tmp_path / "sub" / "plan.jsonl")
    assert read_plan(path) == plan
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(d["index"], d["run_id"], d["depends_on"]) for d in lines] == [
        (i, e.run_id, list(e.depends_on)) for i, e in enumerate(plan)]
    assert lines[0]["config"] == plan[0].config.to_dict()
    assert plan_entry(path, 2) == plan[2]
    with pytest.raises(ConfigError, match=r"--index 4 is outside the plan .* 4 runs \(0..3\)"):
        plan_entry(path, 4)


def _edit(path, n, **changes):
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    lines[n].update(changes)
    path.write_text("".join(json.dumps(d) + "\n" for d in lines))


def test_read_plan_names_the_bad_line(tmp_path, chain):
    plan = make_plan(chain)
    path = write_plan(plan, tmp_path / "plan.jsonl")
    _edit(path, 1, config={**plan[1].config.to_dict(), "epochs": 7})
    with pytest.raises(ConfigError, match=r"plan.jsonl line 2: run .* does not match its config"):
        read_plan(path)
    write_plan(plan, path)
    _edit(path, 1, config={**plan[1].config.to_dict(), "model": "nope"})
    with pytest.raises(ConfigError, match=r"line 2: unknown model 'nope'"):
        read_plan(path)
    write_plan(plan[:2] + plan[3:], path)  # the student of the student lost its teacher line
    with pytest.raises(ConfigError, match=r"line 3: depends on .* which no earlier line trains"):
        read_plan(path)
    path.write_text('{"index": 0}\n')
    with pytest.raises(ConfigError, match=r"line 1 must hold exactly the keys"):
        read_plan(path)
    path.write_text("not json\n")
    with pytest.raises(ConfigError, match=r"line 1 is not JSON"):
        read_plan(path)
    with pytest.raises(ConfigError, match=r"does not exist; write it with `kdlib plan"):
        read_plan(tmp_path / "none.jsonl")
