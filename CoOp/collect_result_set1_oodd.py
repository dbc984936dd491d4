#!/usr/bin/env python
"""Setup-I open-set OOD detection table (FPR95 / AUROC against the 600 held-out classes); run from CoOp/. --help for options."""
import sys

from launch.collect import main

if __name__ == "__main__":
    sys.exit(main("oodd", sys.argv[1:], setup=1))
