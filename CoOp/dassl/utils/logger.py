"""Tee stdout to ``<output_dir>/log.txt`` (Dassl behaviour: an existing log gets a timestamped sibling)."""
from __future__ import annotations

import os
import sys
import time
from typing import Optional, TextIO


class Logger:
    """Write everything printed to both the console and a file."""

    def __init__(self, fpath: str, console: TextIO) -> None:
        self.console = console
        os.makedirs(os.path.dirname(os.path.abspath(fpath)), exist_ok=True)
        self.file = open(fpath, "w", encoding="utf-8")
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


def setup_logger(output: Optional[str] = None) -> Optional[Logger]:
    """Start teeing ``sys.stdout`` into ``output`` (a directory or a ``*.txt``/``*.log`` file path).

    ``None`` (Dassl's default) does nothing.
    """
    if output is None:
        return None
    if output.endswith(".txt") or output.endswith(".log"):
        fpath = output
    else:
        fpath = os.path.join(output, "log.txt")
    if os.path.exists(fpath):
        fpath += time.strftime("-%Y-%m-%d-%H-%M-%S")
    console = sys.stdout.console if isinstance(sys.stdout, Logger) else sys.stdout
    if isinstance(sys.stdout, Logger):
        sys.stdout.close()
    logger = Logger(fpath, console)
    sys.stdout = logger
    return logger


def restore_stdout() -> None:
    """Stop teeing (used by in-process drivers and tests that run several jobs in one process)."""
    if isinstance(sys.stdout, Logger):
        logger = sys.stdout
        sys.stdout = logger.console
        logger.close()
