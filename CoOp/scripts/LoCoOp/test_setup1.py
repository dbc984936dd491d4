#!/usr/bin/env python
"""Setup-I evaluation of the trained LoCoOp runs: ImageNet / -V2 / -Sketch / -A / -R accuracy and open-set detection."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from launch.setup1 import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(trainer="LoCoOp", evaluate=True))
