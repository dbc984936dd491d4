#!/usr/bin/env python
"""Setup-II open-set evaluation of the trained LoCoOp runs on DTD / Food101 / Caltech101 (--help for options)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from launch.setup2 import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(trainer="LoCoOp", evaluate=True))
