#!/usr/bin/env python
"""Setup-II training sweep for LoCoOp (seeds 1-3 x PACS/VLCS x ViT_ep30/rn50_ep30, 16 shots; --help for options)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from launch.setup2 import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(trainer="LoCoOp", evaluate=False))
