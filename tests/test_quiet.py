"""kdlib.quiet: each distinct warning once with a count, in this process and in worker processes."""

import io
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from kdlib import quiet

ROOT = Path(__file__).resolve().parents[1]
RATIO = ("fold %d: natural HGG:LGG ratio %.2f is above the target %g, which subsampling LGG "
         "cannot reach; keeping all %d LGG subjects")


def log_ratio_warnings(n: int) -> None:
    for i in range(n):
        logging.getLogger("kdlib.data.splits").warning(RATIO, i % 3, 1.05, 1, 20)


def test_a_repeated_log_warning_is_printed_once_with_its_count():
    out = io.StringIO()
    with quiet.repeats_summarized(out):
        log_ratio_warnings(45)
        logging.getLogger("kdlib.data.cache").warning("%s has no meta_data.csv", "x")
    lines = out.getvalue().splitlines()
    assert lines[0] == ("WARNING kdlib.data.splits: fold 0: natural HGG:LGG ratio 1.05 is above "
                        "the target 1, which subsampling LGG cannot reach; keeping all 20 LGG "
                        "subjects")
    assert lines[1] == "WARNING kdlib.data.cache: x has no meta_data.csv"
    assert lines[2].startswith("(repeated 44 more times) WARNING kdlib.data.splits: fold 0: natural")
    assert lines[2].endswith("...") and len(lines) == 3  # the cache warning came once: no line


def test_python_warnings_are_counted_by_text_and_everything_is_restored():
    out = io.StringIO()
    shown, logger = warnings.showwarning, logging.getLogger("kdlib")
    with quiet.repeats_summarized(out) as repeats:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            for _ in range(3):
                warnings.warn("f1_LGG: 4 of 500 bootstrap resamples were undefined", UserWarning)
            warnings.warn("another one", RuntimeWarning)
        assert len(repeats.seen) == 2
    text = out.getvalue()
    assert text.count("f1_LGG: 4 of 500") == 2  # the warning itself, then its summary line
    assert "(repeated 2 more times) " in text and "another one" in text
    assert warnings.showwarning is shown and logger.propagate and not logger.handlers


def test_summaries_count_only_what_came_since_the_last_one():
    repeats = quiet.Repeats(stream=io.StringIO())
    for _ in range(3):
        repeats.add("k", "a warning")
    assert repeats.summary() == ["(repeated 2 more times) a warning"]
    assert repeats.summary() == []
    repeats.add("k", "a warning")
    assert repeats.summary() == ["(repeated 1 more time) a warning"]


def test_worker_processes_write_to_the_notebooks_log_not_the_terminal(tmp_path, monkeypatch):
    out = io.StringIO()
    fake = FakeIPython()
    repeats = quiet.per_notebook(fake, stream=out)
    try:
        assert quiet.per_notebook(fake) is repeats and len(fake.callbacks) == 1
        log_ratio_warnings(2)  # in the kernel itself: printed once
        code = ("import logging, kdlib\n"  # importing kdlib is all a worker needs
                "for i in range(5):\n"
                f"    logging.getLogger('kdlib.data.splits').warning({RATIO!r}, i, 1.05, 1, 20)\n"
                "import warnings; warnings.warn('from a worker')\n")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        workers = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                  text=True, check=True) for _ in range(2)]
        assert all(w.stderr == "" for w in workers)  # nothing printed by the workers
        fake.run_cell()
        lines = out.getvalue().splitlines()
        assert lines[0].startswith("WARNING kdlib.data.splits: fold 0: natural HGG:LGG ratio")
        assert any(line.endswith("UserWarning: from a worker") for line in lines)
        assert lines[-2].startswith("(repeated 11 more times) WARNING kdlib.data.splits: fold 0")
        assert lines[-1].startswith("(repeated 1 more time) ") and "from a worker" in lines[-1]
        log = repeats.log
        assert not log.exists()  # taken in after each cell: a kernel that is killed leaves none
        subprocess.run([sys.executable, "-c", code], env=env, check=True)  # a later cell's worker
        fake.run_cell()
        assert out.getvalue().splitlines()[-2].startswith("(repeated 5 more times) WARNING kdlib")
        assert not log.exists()
    finally:
        repeats.restore()
    assert quiet.LOG_ENV not in os.environ and not log.exists() and not fake.callbacks


def test_in_worker_without_a_notebook_prints_each_warning_once_per_process():
    code = ("from kdlib import quiet; import logging\nquiet.in_worker()\n"
            "for i in range(4):\n    logging.getLogger('kdlib.x').warning('same %d', i)\n")
    env = {k: v for k, v in os.environ.items() if k != quiet.LOG_ENV}
    done = subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, check=True)
    assert done.stderr == "WARNING kdlib.x: same 0\n"


class FakeIPython:
    """The part of IPython's event API that per_notebook uses."""

    def __init__(self) -> None:
        self.callbacks = []
        self.events = self

    def register(self, name: str, fn) -> None:
        assert name == "post_run_cell"
        self.callbacks.append(fn)

    def unregister(self, name: str, fn) -> None:
        self.callbacks.remove(fn)

    def run_cell(self) -> None:
        for fn in self.callbacks:
            fn(None)


@pytest.fixture(autouse=True)
def no_active_notebook():
    yield
    assert not quiet._ACTIVE
