#!/usr/bin/env python
"""Setup-II open-set OOD detection table (FPR95 / AUROC per open-set dataset); run from CoOp/. --help for options."""
import sys

from launch.collect import main

if __name__ == "__main__":
    sys.exit(main("oodd", sys.argv[1:]))
