#!/usr/bin/env python
"""Setup-II training sweep for CRoFT (official grid; --help for options; data root from --root or DATA)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from launch.setup2 import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(trainer="CRoFT", evaluate=False))
