"""benchmarks/gpu_check.sh --dry-run: the whole prepared GPU check on the CPU with tiny settings."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


@pytest.mark.slow
def test_dry_run_completes_and_checks_what_it_claims(tmp_path):
    out, log = tmp_path / "check", tmp_path / "log.txt"
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_LOG": str(log)}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run",
                           "--profiles", "smoke", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=1500, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    assert summary in log.read_text()
    assert summary.startswith("### GPU check: CPU (DRY RUN")
    assert summary.count("identical yes") == 2 and "straight run yes" in summary
    flags = json.loads((out / "summary.json").read_text())
    assert flags["identical_twice"] and flags["identical_together"] and flags["resume_identical"]
    run = next(p for p in (out / "a").iterdir() if p.is_dir())
    copy = shutil.copytree(run, tmp_path / "copy")
    assert gpu_check.same_run(run, copy)
    (copy / "predictions.csv").write_text((copy / "predictions.csv").read_text()
                                          .replace("0.", "0.9", 1))
    assert not gpu_check.same_run(run, copy)
