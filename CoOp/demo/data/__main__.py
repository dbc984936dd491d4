"""``python -m demo.data --root DATA``: build DigitsDG-mini and the open-set folders."""
import sys

from demo.data.build import main

sys.exit(main())
