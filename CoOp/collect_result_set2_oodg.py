#!/usr/bin/env python
"""Setup-II OOD generalisation table (held-out-domain accuracy); run from CoOp/. --help for options."""
import sys

from launch.collect import main

if __name__ == "__main__":
    sys.exit(main("oodg", sys.argv[1:]))
