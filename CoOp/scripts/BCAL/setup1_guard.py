"""Shared check of the BCAL Setup-I drivers: ImageNet46 has no domain names (official bug)."""
from __future__ import annotations

import sys
from typing import Optional, Sequence

KEY = "TRAINER.BCAL.DOMAIN_NAMES"


def domain_names_given(argv: Sequence[str]) -> bool:
    """True if the yacs overrides after ``--`` set ``TRAINER.BCAL.DOMAIN_NAMES`` to a non-empty list."""
    if "--" not in argv:
        return False
    extra = list(argv[list(argv).index("--") + 1:])
    return any(k == KEY and i + 1 < len(extra) and extra[i + 1].strip() not in ("", "[]", "()")
               for i, k in enumerate(extra))


def check(argv: Optional[Sequence[str]] = None) -> Optional[str]:
    """The one-line error when the domain names are missing, else None."""
    argv = sys.argv[1:] if argv is None else argv
    if domain_names_given(argv):
        return None
    return (f"error: BCAL cannot run Setup-I as the official code does (ImageNet46 has no domain names); "
            f"pass the named fix after '--', e.g. -- {KEY} \"['imagenet']\"")
