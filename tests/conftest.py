"""Shared pytest setup: import path, offline hub, CPU threads, markers."""
from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COOP = os.path.join(REPO, "CoOp")
TESTS = os.path.dirname(os.path.abspath(__file__))
for p in (COOP, TESTS):
    if p not in sys.path:
        sys.path.insert(0, p)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# per-file caches (weights sha256, start-up image checks) of this session's runs stay out of ~/.cache/croft
if "CROFT_CACHE_DIR" not in os.environ:
    os.environ["CROFT_CACHE_DIR"] = tempfile.mkdtemp(prefix="croft-test-cache-")
    atexit.register(shutil.rmtree, os.environ["CROFT_CACHE_DIR"], True)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: long-running test (deselected by default; run with -m slow)")


@pytest.fixture(autouse=True)
def _restore_stdout():
    """Tests that run train.main() in-process must not leave stdout teed into a log file."""
    yield
    from dassl.utils.logger import restore_stdout

    restore_stdout()
