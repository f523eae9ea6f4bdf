"""Slurm, two ways: a submitit executor for `kdlib.launch` (the scheduler runs on the login node and
submits each run when its teacher is finished), and plain `sbatch --array` scripts that need no
Python on the login node (teachers as one job array, students as a second array after it)."""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdlib.config import check_range
from kdlib.errors import ConfigError, RunError
from kdlib.paths import output_root, project_root
from kdlib.plan import PlanEntry, plan_levels

try:  # optional: pip install kdlib[cluster]
    import submitit
except ImportError:  # pragma: no cover - exercised only without the extra
    submitit = None

ARRAY_SCRIPT = "train.sbatch"
SUBMIT_SCRIPT = "submit.sh"


@dataclass(frozen=True)
class SlurmSettings:
    """The resources of one training job (one run per job or array task).

    time_min: the job's time limit in minutes; signal_delay_s: how long before it the job is told
    to requeue itself; max_parallel: at most this many array tasks at once (None: no limit).
    """

    partition: str | None = None
    gpus_per_node: int = 1
    cpus_per_task: int = 4
    mem_gb: int | None = None
    time_min: int = 120
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    max_parallel: int | None = None
    signal_delay_s: int = 120

    def __post_init__(self) -> None:
        check_range("gpus_per_node", self.gpus_per_node, 0)
        check_range("cpus_per_task", self.cpus_per_task, 1)
        check_range("time_min", self.time_min, 1)
        check_range("signal_delay_s", self.signal_delay_s, 0, 60 * self.time_min)
        for name in ("mem_gb", "max_parallel"):
            if getattr(self, name) is not None:
                check_range(name, getattr(self, name), 1)


def _job_env() -> list[str]:
    """Shell lines that give a job the same output root and thread count as this process."""
    return [f"export KDLIB_HOME={shlex.quote(str(output_root()))}",
            "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}"]


def slurm_executor(folder: str | Path, settings: SlurmSettings, name: str = "kdlib") -> Any:
    """A submitit executor for Slurm with these settings (jobs requeue themselves on preemption or
    near the time limit; logs under `folder`)."""
    if submitit is None:
        raise ConfigError("the slurm executor needs submitit: pip install 'kdlib[cluster]'")
    try:
        ex = submitit.AutoExecutor(folder=str(Path(folder) / "%j"), cluster="slurm")
    except RuntimeError as err:
        raise RunError(f"cannot use Slurm here: {err}; run `kdlib launch` on a login node, or "
                       "use `kdlib plan` and its sbatch scripts") from None
    params: dict[str, Any] = {
        "name": name, "timeout_min": settings.time_min, "gpus_per_node": settings.gpus_per_node,
        "cpus_per_task": settings.cpus_per_task, "tasks_per_node": 1, "nodes": 1,
        "slurm_signal_delay_s": settings.signal_delay_s, "slurm_setup": _job_env(),
    }
    optional = {"mem_gb": settings.mem_gb, "slurm_partition": settings.partition,
                "slurm_account": settings.account, "slurm_qos": settings.qos,
                "slurm_constraint": settings.constraint,
                "slurm_array_parallelism": settings.max_parallel}
    params.update({k: v for k, v in optional.items() if v is not None})
    ex.update_parameters(**params)
    return ex


def _sbatch_lines(settings: SlurmSettings, name: str, logs: Path) -> list[str]:
    h, m = divmod(settings.time_min, 60)
    lines = [f"--job-name={name}", f"--output={logs}/%A_%a.out", "--nodes=1", "--ntasks=1",
             f"--cpus-per-task={settings.cpus_per_task}", f"--time={h:02d}:{m:02d}:00",
             "--requeue", f"--signal=B:USR1@{settings.signal_delay_s}"]
    if settings.gpus_per_node:
        lines.append(f"--gpus-per-node={settings.gpus_per_node}")
    optional = {"partition": settings.partition, "account": settings.account,
                "qos": settings.qos, "constraint": settings.constraint,
                "mem": f"{settings.mem_gb}G" if settings.mem_gb else None}
    lines += [f"--{k}={v}" for k, v in optional.items() if v is not None]
    return [f"#SBATCH {line}" for line in lines]


def write_array_scripts(entries: list[PlanEntry], plan_file: str | Path, folder: str | Path,
                        settings: SlurmSettings, name: str = "kdlib",
                        kdlib_cmd: str | None = None) -> tuple[Path, Path]:
    """Write `train.sbatch` (array task N trains line N of the plan with `kdlib train --plan
    plan.jsonl --index N`) and `submit.sh` (one array per dependency level, each submitted with
    `--dependency=afterok:` on the one before); returns both paths."""
    folder = Path(folder).resolve()
    plan_file = Path(plan_file).resolve()
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    cmd = kdlib_cmd or f"{shlex.quote(sys.executable)} -m kdlib"
    train = folder / ARRAY_SCRIPT
    train.write_text("\n".join([
        "#!/bin/bash",
        f"# One run of {plan_file} per array task: task N trains line N (counted from 0).",
        f"# Submit with {folder / SUBMIT_SCRIPT}, which starts the students after their teachers.",
        *_sbatch_lines(settings, name, folder / "logs"),
        *_job_env(),
        f"cd {shlex.quote(str(project_root()))}",
        f'KDLIB="${{KDLIB:-{cmd}}}"',
        "# Near the time limit (or when Slurm signals preemption) put the task back in the queue:",
        "# the run resumes from its last epoch checkpoint when it starts again.",
        "trap 'echo \"requeueing ${SLURM_JOB_ID}\"; scontrol requeue \"${SLURM_JOB_ID}\"' USR1",
        f'$KDLIB train --plan {shlex.quote(str(plan_file))} --index "${{SLURM_ARRAY_TASK_ID}}" &',
        "wait $!",
        "",
    ]))
    throttle = f"%{settings.max_parallel}" if settings.max_parallel else ""
    lines = ["#!/bin/bash",
             f"# Submit every run of {plan_file} to Slurm: each dependency level (0: teachers and",
             "# baselines; 1: their distilled students) is one job array that starts when the level",
             "# before it has finished without error (afterok).",
             "set -euo pipefail", 'cd "$(dirname "$0")"', "after=''"]
    for depth, rows in enumerate(plan_levels(entries)):
        span = f"{rows.start}-{rows.stop - 1}"
        lines += [f"job=$(sbatch --parsable --array={span}{throttle} ${{after}} {ARRAY_SCRIPT})",
                  "job=${job%%;*}",
                  f'echo "level {depth}: {len(rows)} runs (plan lines {span}): job array $job"',
                  'after="--dependency=afterok:${job}"']
    submit = folder / SUBMIT_SCRIPT
    submit.write_text("\n".join(lines) + "\n")
    for path in (train, submit):
        path.chmod(0o755)
    return train, submit
