"""``python -m demo`` (from ``CoOp/``): the whole embedded benchmark; see :mod:`demo.run`."""
import sys

from demo.run import main

sys.exit(main())
