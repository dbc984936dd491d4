"""``python -m demo.pretrain``; see :mod:`demo.pretrain.cli`."""
import sys

from demo.pretrain.cli import main

sys.exit(main())
