"""Quiet output: each distinct warning printed once, then counted.

A grid of runs repeats the same warnings: the demo logs "natural HGG:LGG ratio 1.05 is above the
target 1" once per run of that ratio, in every worker process. `per_notebook()`, called once at
the top of a notebook, prints each distinct kdlib log warning and Python warning the first time
it comes and counts its repeats; after each cell, one line per repeated warning says how many
more times it came. Worker processes started from that notebook (they inherit KDLIB_WARNING_LOG)
append their warnings to the notebook's log file instead of printing them (`in_worker`, which
`import kdlib` calls in such a process), and the notebook counts them with its own.

Log records are told apart by logger, level and message template (the same warning about
another fold is a repeat); Python warnings by category and text.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

LOG_ENV = "KDLIB_WARNING_LOG"
"""Environment variable naming the file where worker processes append their warnings."""

LOGGER = "kdlib"
SHORT = 110  # characters of a warning quoted in a summary line

Sink = Callable[[str, str], None]


@dataclass
class Repeats:
    """The warnings seen: key -> [first text, times seen, times already reported]."""

    stream: TextIO | None = None  # None: sys.stderr when printing
    log: Path | None = None  # where worker processes append theirs
    seen: dict[str, list] = field(default_factory=dict, repr=False)
    restore: Callable[[], None] = field(default=lambda: None, repr=False)

    def add(self, key: str, text: str) -> None:
        """Print a warning the first time its key comes; count it every time."""
        entry = self.seen.get(key)
        if entry is None:
            self.seen[key] = [text, 1, 1]
            print(text, file=self.stream or sys.stderr, flush=True)
        else:
            entry[1] += 1

    def collect(self) -> None:
        """Take in, and remove, what worker processes appended to the log since the last call
        (a worker appending later creates it again): no log outlives the notebook's last cell."""
        if self.log is None:
            return
        taken = self.log.with_name(self.log.name + ".taken")
        try:
            os.replace(self.log, taken)
        except FileNotFoundError:
            return
        data = taken.read_bytes()
        taken.unlink()
        for line in data.decode(errors="replace").splitlines():
            with contextlib.suppress(ValueError, KeyError):
                item = json.loads(line)
                self.add(item["key"], item["text"])

    def summary(self) -> list[str]:
        """One line per warning repeated since the last summary (worker warnings included)."""
        self.collect()
        lines = []
        for text, count, reported in self.seen.values():
            if count > reported:
                first = text.splitlines()[0] if text else ""
                short = first if len(first) <= SHORT else first[:SHORT - 3] + "..."
                lines.append(f"(repeated {count - reported} more time"
                             f"{'s' if count - reported > 1 else ''}) {short}")
        for entry in self.seen.values():
            entry[2] = entry[1]
        return lines

    def report(self) -> None:
        """Print the summary lines, if any."""
        for line in self.summary():
            print(line, file=self.stream or sys.stderr, flush=True)


class _Handler(logging.Handler):
    """Hands every record of the kdlib loggers to a sink, keyed by logger, level and template."""

    def __init__(self, sink: Sink) -> None:
        super().__init__(logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        try:
            key = f"log|{record.name}|{record.levelno}|{record.msg}"
            self.sink(key, f"{record.levelname} {record.name}: {record.getMessage()}")
        except Exception:  # noqa: BLE001 (logging must never raise)
            self.handleError(record)


def install(sink: Sink) -> Callable[[], None]:
    """Send kdlib's log warnings and Python's shown warnings to `sink(key, text)` instead of
    printing them; returns the function that puts things back."""
    logger = logging.getLogger(LOGGER)
    handler = _Handler(sink)
    previous = (logger.propagate, warnings.showwarning)

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        sink(f"warning|{category.__name__}|{message}",
             warnings.formatwarning(message, category, filename, lineno, "").rstrip())

    logger.addHandler(handler)
    logger.propagate = False  # printed here, not again by the root logger's handlers
    warnings.showwarning = show

    def restore() -> None:
        logger.removeHandler(handler)
        logger.propagate, warnings.showwarning = previous

    return restore


@contextlib.contextmanager
def repeats_summarized(stream: TextIO | None = None) -> Iterator[Repeats]:
    """Within the block, each distinct warning is printed once; at its end, a line per repeated
    warning gives the count (for scripts; notebooks call `per_notebook`)."""
    repeats = Repeats(stream=stream)
    repeats.restore = install(repeats.add)
    try:
        yield repeats
    finally:
        repeats.restore()
        repeats.report()


_ACTIVE: list[Repeats] = []  # the notebook's Repeats (one per process)


def per_notebook(ipython=None, stream: TextIO | None = None) -> Repeats:
    """Print each distinct warning once in this notebook (kernel) and its worker processes, and
    after each cell the number of repeats. Calling it again returns the same counts."""
    if _ACTIVE:
        return _ACTIVE[0]
    if ipython is None:
        with contextlib.suppress(ImportError):
            from IPython import get_ipython

            ipython = get_ipython()
    fd, name = tempfile.mkstemp(prefix="kdlib-warnings-", suffix=".jsonl")
    os.close(fd)
    repeats = Repeats(stream=stream, log=Path(name))
    remove = install(repeats.add)
    os.environ[LOG_ENV] = name  # inherited by the worker processes started from now on

    def report(*_: object) -> None:
        repeats.report()

    def restore() -> None:
        remove()
        os.environ.pop(LOG_ENV, None)
        if ipython is not None:
            with contextlib.suppress(ValueError):
                ipython.events.unregister("post_run_cell", report)
        repeats.log.unlink(missing_ok=True)
        _ACTIVE.clear()

    repeats.restore = restore
    if ipython is not None:
        ipython.events.register("post_run_cell", report)
    else:
        atexit.register(report)
    _ACTIVE.append(repeats)
    return repeats


def _append(path: Path, key: str, text: str) -> None:
    line = json.dumps({"key": key, "text": text}) + "\n"
    with open(path, "a", encoding="utf-8") as f:  # one short append per line: no interleaving
        f.write(line)


def in_worker() -> None:
    """In a worker process: its warnings go to the log of the notebook that started it (see
    `per_notebook`) instead of the terminal; without one, each distinct warning is printed once
    per process. `import kdlib` calls this in processes that inherit KDLIB_WARNING_LOG."""
    path = os.environ.get(LOG_ENV)
    if path:
        install(lambda key, text: _append(Path(path), key, text))
    else:
        install(Repeats().add)
