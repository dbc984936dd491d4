"""Build DigitsDG-mini (PACS layout) and its two open-set folders under one data root.

Layout written under ``--root``::

    DigitsDG/images/<domain>/<class>/<file>.png     DigitsDG/test_on_<domain>.json
    DigitsDG/manifest.json  DigitsDG/SHA256SUMS
    fashion-mnist/images/<class>/<file>.png  fashion-mnist/split_FashionMNIST.json  (+ manifest, sums)
    textures-mini/images/<class>/<file>.png  textures-mini/split_TexturesMini.json  (+ manifest, sums)

Every split entry is ``[relative_image_path, integer_label, classname]`` (relative to ``images/``). For
``test_on_<d>.json``, ``test`` holds all images of domain ``d`` and ``train``/``val`` the other domains' images,
80/20 per domain and class; the open-set splits are 50/20/30 per class. The same arguments and package versions
give byte-identical files; each folder is staged and renamed into place; a rerun whose manifest and checksums
match does nothing.  Usage (from ``CoOp/``): ``python -m demo.data --root DATA [--per-class 150]``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from demo.data.constants import (DEFAULT_OOD_PER_CLASS, DEFAULT_PER_CLASS, DIGITS_FOLDER, FASHION_FOLDER,
                                 TEXTURES_FOLDER, SourceMissingError)
from demo.data.digits import build_digits
from demo.data.openset import build_fashion, build_textures


def print_summary(results: dict, log: Callable) -> None:
    """Counts per domain and class, recipes and open-set sizes."""
    dg = results[DIGITS_FOLDER]
    log(f"\nDigitsDG-mini classes: {', '.join(dg['classnames'])}")
    log(f"{'domain':<12}" + "".join(f"{c:>6}" for c in dg["classnames"]) + f"{'total':>7}")
    for dom in dg["domains"]:
        row = dg["counts"][dom]
        log(f"{dom:<12}" + "".join(f"{row.get(c, 0):>6}" for c in dg["classnames"]) + f"{sum(row.values()):>7}")
    for dom, recipe in dg["domain_recipes"].items():
        log(f"  {dom}: {recipe}")
    for name in (FASHION_FOLDER, TEXTURES_FOLDER):
        m = results[name]
        log(f"{name}: {len(m['classnames'])} classes, {m['n_images']} images "
            f"({', '.join(f'{c}={n}' for c, n in m['counts'].items())}); split {m['split_sizes']}")


def build(root: str | Path, per_class: int = DEFAULT_PER_CLASS, seed: int = 0,
          ood_per_class: int = DEFAULT_OOD_PER_CLASS, verbose: bool = True) -> dict:
    """Build (or verify and reuse) DigitsDG-mini and the two open-set folders under root.

    Returns {"DigitsDG": manifest, "fashion-mnist": manifest, "textures-mini": manifest, "root", "seconds"};
    raises SourceMissingError (saying what to install) when a source package is absent.
    """
    if per_class < 1 or ood_per_class < 1:
        raise ValueError("per_class and ood_per_class must be >= 1")
    log = print if verbose else (lambda *a, **k: None)
    t0 = time.time()
    root = Path(root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    results = {DIGITS_FOLDER: build_digits(root, per_class, seed, log),
               FASHION_FOLDER: build_fashion(root, ood_per_class, seed, log),
               TEXTURES_FOLDER: build_textures(root, ood_per_class, seed, log)}
    print_summary(results, log)
    results["root"], results["seconds"] = str(root), round(time.time() - t0, 2)
    log(f"done in {results['seconds']:.1f} s -> {root}")
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m demo.data",
                                description="Build DigitsDG-mini and its open-set folders from packaged images")
    p.add_argument("--root", required=True, help="data root (DATASET.ROOT); folders are created below it")
    p.add_argument("--per-class", type=int, default=DEFAULT_PER_CLASS,
                   help="images per domain and class (capped by the source: 166-167 for the MNIST-based "
                        "domains, 174-183 for digits8x8; default %(default)s)")
    p.add_argument("--ood-per-class", type=int, default=DEFAULT_OOD_PER_CLASS,
                   help="images per class of each open-set folder (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    try:
        build(args.root, per_class=args.per_class, seed=args.seed, ood_per_class=args.ood_per_class,
              verbose=not args.quiet)
    except (SourceMissingError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
