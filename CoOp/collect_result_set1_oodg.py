#!/usr/bin/env python
"""Setup-I OOD generalisation table (ImageNet ID accuracy and V2 / Sketch / A / R); run from CoOp/. --help for options."""
import sys

from launch.collect import main

if __name__ == "__main__":
    sys.exit(main("oodg", sys.argv[1:], setup=1))
