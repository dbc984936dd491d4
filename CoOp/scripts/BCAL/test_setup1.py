#!/usr/bin/env python
"""Setup-I evaluation of the trained BCAL runs (ImageNet variants + open-set).

The official Setup-I BCAL scripts crash (ImageNet46 has no domain names); this driver exits with a one-line error
unless the named fix is passed: `-- TRAINER.BCAL.DOMAIN_NAMES "['imagenet']"` (--help for the other options).
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from launch.setup1 import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(trainer="BCAL", evaluate=True))
