"""kdlib.slurm without a cluster: the submitit executor's parameters and sbatch file, and the
plain job-array scripts (submit.sh run against a fake sbatch; train.sbatch run by bash as one
array task would be)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_train import tiny_config, tiny_train_data

from kdlib.errors import ConfigError, RunError
from kdlib.identity import run_id
from kdlib.paths import output_root, project_root
from kdlib.plan import make_plan, write_plan
from kdlib.runs import is_finished
from kdlib.slurm import SlurmSettings, slurm_executor, write_array_scripts
from kdlib.train import TrainConfig

ROOT = Path(__file__).resolve().parent.parent


def fake_commands(folder: Path, **scripts: str) -> str:
    """Executables named after the keys, running the given bash; returns a PATH with them first."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in scripts.items():
        path = folder / name
        path.write_text(f"#!/bin/bash\n{body}\n")
        path.chmod(0o755)
    return f"{folder}:{os.environ['PATH']}"


@pytest.mark.parametrize("kw, match", [
    ({"gpus_per_node": -1}, "gpus_per_node=-1"), ({"cpus_per_task": 0}, "cpus_per_task=0"),
    ({"time_min": 0}, "time_min=0"), ({"time_min": 2, "signal_delay_s": 200}, "signal_delay_s"),
    ({"mem_gb": 0}, "mem_gb=0"), ({"max_parallel": 0}, "max_parallel=0"),
])
def test_settings_are_checked(kw, match):
    with pytest.raises(ConfigError, match=match):
        SlurmSettings(**kw)


def test_submitit_executor_parameters_and_sbatch_file(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", fake_commands(tmp_path / "bin", srun="exit 0"))
    settings = SlurmSettings(partition="gpu", gpus_per_node=2, cpus_per_task=8, mem_gb=32,
                             time_min=90, account="thesis", qos="normal", constraint="a100",
                             max_parallel=5, signal_delay_s=180)
    ex = slurm_executor(tmp_path / "submitit", settings, name="kdlib-demo")
    text = ex._executor._make_submission_file_text("python -m submitit.core._submit x", "uid")
    for line in ("--job-name=kdlib-demo", "--partition=gpu", "--gpus-per-node=2",
                 "--cpus-per-task=8", "--mem=32GB", "--time=90", "--account=thesis",
                 "--qos=normal", "--constraint=a100", "--signal=USR2@180", "--nodes=1",
                 "--ntasks-per-node=1"):
        assert f"#SBATCH {line}\n" in text, line
    assert f"export KDLIB_HOME={output_root()}\n" in text
    assert "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}\n" in text
    assert ex._executor.parameters["array_parallelism"] == 5
    assert str(ex._executor.folder).startswith(str(tmp_path / "submitit"))


def test_submitit_executor_without_slurm_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun
    with pytest.raises(RunError, match=r"cannot use Slurm here.*`kdlib plan` and its sbatch"):
        slurm_executor(tmp_path, SlurmSettings())


def _plan(cache: Path, splits: Path) -> list:
    teacher = TrainConfig.from_dict(tiny_config(cache, splits, model="cnn_s", epochs=1))
    return make_plan([teacher, TrainConfig.from_dict(tiny_config(cache, splits, epochs=1)),
                      TrainConfig.from_dict(tiny_config(cache, splits, epochs=1, distiller="kd",
                                                        teacher=run_id(teacher)))])


def test_submit_script_chains_the_levels_with_afterok(tmp_path):
    plan = _plan(tmp_path / "c.h5", tmp_path / "s.csv")
    plan_file = write_plan(plan, tmp_path / "plan.jsonl")
    train, submit = write_array_scripts(plan, plan_file, tmp_path / "slurm",
                                        SlurmSettings(partition="gpu", max_parallel=3),
                                        name="kdlib-x", kdlib_cmd="kdlib")
    text = train.read_text()
    for line in ("--job-name=kdlib-x", f"--output={tmp_path / 'slurm' / 'logs'}/%A_%a.out",
                 "--partition=gpu", "--gpus-per-node=1", "--cpus-per-task=4", "--time=02:00:00",
                 "--requeue", "--signal=B:USR1@120"):
        assert f"#SBATCH {line}\n" in text, line
    assert f'train --plan {plan_file} --index "${{SLURM_ARRAY_TASK_ID}}" &' in text
    log = tmp_path / "sbatch.log"
    path = fake_commands(tmp_path / "bin", sbatch=(
        f'echo "$@" >> {log}; n=$(wc -l < {log}); echo "$((1000 + n));cluster"'))
    res = subprocess.run(["bash", str(submit)], env={**os.environ, "PATH": path},
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    assert log.read_text().splitlines() == [
        "--parsable --array=0-1%3 train.sbatch",
        "--parsable --array=2-2%3 --dependency=afterok:1001 train.sbatch"]
    assert res.stdout.splitlines() == [
        "level 0: 2 runs (plan lines 0-1): job array 1001",
        "level 1: 1 runs (plan lines 2-2): job array 1002"]


@pytest.mark.slow
def test_an_array_task_trains_its_plan_line(tmp_path):
    """train.sbatch run by bash as Slurm would run task 1 (`kdlib train --plan ... --index 1`)."""
    cache, splits = tiny_train_data(tmp_path / "data")
    plan = _plan(cache, splits)
    plan_file = write_plan(plan, tmp_path / "runs" / "plan.jsonl")
    train, _ = write_array_scripts(plan, plan_file, tmp_path / "slurm", SlurmSettings(),
                                   kdlib_cmd=f"{sys.executable} -m kdlib")
    assert f"cd {project_root()}" in train.read_text()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SLURM_ARRAY_TASK_ID": "1",
           "SLURM_JOB_ID": "77", "SLURM_CPUS_PER_TASK": "1"}
    res = subprocess.run(["bash", str(train)], env=env, capture_output=True, text=True,
                         timeout=600, check=False)
    assert res.returncode == 0, res.stderr
    runs = tmp_path / "runs"
    assert res.stdout.strip().splitlines()[-1] == str(runs / plan[1].run_id)
    assert is_finished(runs / plan[1].run_id)
    assert not (runs / plan[0].run_id).exists() and not (runs / plan[2].run_id).exists()
    env["SLURM_ARRAY_TASK_ID"] = "2"  # the student before its teacher: fails, so afterok holds
    res = subprocess.run(["bash", str(train)], env=env, capture_output=True, text=True,
                         timeout=600, check=False)
    assert res.returncode == 2 and f"teacher '{plan[0].run_id}' not found" in res.stderr
