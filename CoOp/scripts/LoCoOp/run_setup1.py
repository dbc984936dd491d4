#!/usr/bin/env python
"""Setup-I training sweep for LoCoOp on imagenet46 (seeds 1-3, shots 1/16/32, ViT_ep30; --help for options)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from launch.setup1 import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(trainer="LoCoOp", evaluate=False))
