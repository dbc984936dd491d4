"""Tee stdout to ``<output_dir>/log.txt``, written live (line-buffered: each line reaches the file when printed,
so ``tail -f`` follows a run and a killed process loses nothing it printed).

A run has one ``log.txt``: a run started again in the same directory (a resume, a rerun) appends to it after a
marker line (:data:`RESTART_MARKER`) instead of Dassl's ``log.txt-<timestamp>`` siblings.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Optional, TextIO

RESTART_MARKER = "*** log continues: run started again in this directory at {time} ***"


class Logger:
    """Write everything printed to both the console and a file (appended to with ``append``)."""

    def __init__(self, fpath: str, console: TextIO, append: bool = False) -> None:
        self.console = console
        os.makedirs(os.path.dirname(os.path.abspath(fpath)), exist_ok=True)
        self.file = open(fpath, "a" if append else "w", encoding="utf-8", buffering=1)  # line-buffered
        self.fpath = fpath

    def write(self, msg: str) -> None:
        self.console.write(msg)
        self.file.write(msg)

    def flush(self) -> None:
        self.console.flush()
        self.file.flush()
        try:
            os.fsync(self.file.fileno())
        except OSError:
            pass

    def isatty(self) -> bool:
        return False

    def close(self) -> None:
        self.file.close()


def open_log(fpath: str, console: TextIO, head: str = "") -> Logger:
    """A :class:`Logger` on ``fpath``: a new file, or an existing non-empty one appended to after the
    restart marker; ``head`` (text printed before the log could be opened) is written first."""
    restarted = os.path.isfile(fpath) and os.path.getsize(fpath) > 0
    logger = Logger(fpath, console, append=restarted)
    if restarted:
        logger.file.write("\n" + RESTART_MARKER.format(time=time.strftime("%Y-%m-%d %H:%M:%S")) + "\n")
    logger.file.write(head)
    return logger


def setup_logger(output: Optional[str] = None) -> Optional[Logger]:
    """Start teeing ``sys.stdout`` into ``output`` (a directory or a ``*.txt``/``*.log`` file path); an existing
    log is continued after the restart marker. ``None`` (Dassl's default) does nothing."""
    if output is None:
        return None
    if output.endswith(".txt") or output.endswith(".log"):
        fpath = output
    else:
        fpath = os.path.join(output, "log.txt")
    console = sys.stdout.console if isinstance(sys.stdout, Logger) else sys.stdout
    if isinstance(sys.stdout, Logger):
        sys.stdout.close()
    logger = open_log(fpath, console)
    sys.stdout = logger
    return logger


def restore_stdout() -> None:
    """Stop teeing (used by in-process drivers and tests that run several jobs in one process)."""
    if isinstance(sys.stdout, Logger):
        logger = sys.stdout
        sys.stdout = logger.console
        logger.close()
