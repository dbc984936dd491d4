#!/usr/bin/env python
"""Build the leave-one-domain-out split files ``test_on_<domain>.json`` of PACS or VLCS from a raw download.

The official CRoFT code reads ``<root>/PACS/test_on_<domain>.json`` (resp. ``VLCS``) but does not ship them, and
their train/val ratio and label order are unknown (spec 4.2, open question 6). This tool makes them
deterministically from a download in the OoD-Bench/DomainBed layout ``<raw>/<domain>/<class>/<image>``:

- images are placed under ``<root>/<PACS|VLCS>/images/<domain folder>/<class>/`` (``--link symlink``, the
  default; ``copy``; or ``none`` when ``--raw`` already *is* that ``images`` folder), in the README's layout:
  PACS ``art_painting, cartoon, photo, sketch``; VLCS ``CALTECH, LABELME, PASCAL, SUN``, whatever the raw
  spelling (DomainBed's / OoD-Bench's ``Caltech101, LabelMe, SUN09, VOC2007``, their lower-case forms, or the
  domain names in any case). With ``--link none`` the raw folders stay as they are (they must be named after the
  domains). Class folders keep their raw name. (Under the official ``DATASET.DOMAIN_MATCH substring`` rule the
  upper-case VLCS folders all become domain ``sun``, as in the official code; every run logs and records the
  per-domain counts its rule produced and warns about it; ``DATASET.DOMAIN_MATCH folder`` is the named fix.)
- entries are ``[relative_path, label, classname]`` with ``relative_path`` relative to ``images/``,
  ``classname`` the lower-cased class folder name and ``label`` its index in the sorted list of class names
  (PACS: dog 0, elephant 1, giraffe 2, guitar 3, horse 4, house 5, person 6; VLCS: bird, car, chair, dog,
  person).
- ``test`` = every image of the held-out domain; ``train``/``val`` = the images of the three source domains,
  split per (domain, class): the file names are sorted, shuffled with a generator seeded by
  (``--seed``, domain, class), and the first ``n_val = round(val_fraction * n)`` go to ``val`` (at least one
  when ``n >= 2``, never all). Every list is sorted by path, so nothing depends on directory listing order, and
  an image of a source domain is in the same split in every json file.
- **Default ratio: ``--val-fraction 0.2`` (80 % train / 20 % val)**, DomainBed's default hold-out fraction
  (OoD-Bench, where the README sends users for the downloads, is built on DomainBed) and the ratio of
  ``python -m demo.data``. The official ratio is unknown; pass ``--val-fraction 0.1`` for a 90/10 split
  like PACS's official train/crossval lists.
- ``splits_manifest.json`` (next to the json files) records the source, seed, ratio, counts and the sha256 of
  every json file. Existing split files whose content differs are never overwritten without ``--force``;
  identical ones are left alone. Existing images/links are kept when they point to (or have the size of) the
  same source file; other clashes need ``--force``.

Usage (from ``CoOp/``)::

    python tools/build_lodo_splits.py --dataset PACS --raw /downloads/PACS --root DATA
    python tools/build_lodo_splits.py --dataset VLCS --raw /downloads/VLCS --root DATA --link copy
    python tools/build_lodo_splits.py --dataset PACS --raw DATA/PACS/images --root DATA --link none

Importable: ``build_splits(dataset, raw, root, val_fraction=0.2, seed=0, link="symlink", force=False)``
returns the manifest dict.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sys
from typing import Any, Callable, Optional

_COOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _COOP not in sys.path:
    sys.path.insert(0, _COOP)

from datasets.lodo import PACS, VLCS  # noqa: E402
from dassl.utils.errors import ConfigError, DataError, UserError  # noqa: E402
from dassl.utils.tools import atomic_write_bytes  # noqa: E402

BUILDER = "tools/build_lodo_splits.py"
BUILDER_VERSION = 2  # 2: VLCS folders in the README layout (CALTECH, LABELME, PASCAL, SUN)
DEFAULT_VAL_FRACTION = 0.2
LINK_MODES = ("symlink", "copy", "none")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
MANIFEST = "splits_manifest.json"

# folder under --root, canonical domains (from datasets/lodo.py), accepted raw folder aliases (lower-case)
DATASETS: dict[str, dict[str, Any]] = {
    "PACS": {"folder": "PACS", "domains": list(PACS.domains), "aliases": {},
             "layout": {d: d for d in PACS.domains}},
    "VLCS": {"folder": "VLCS", "domains": list(VLCS.domains),
             "aliases": {"caltech101": "caltech", "sun09": "sun", "voc2007": "pascal"},
             "layout": {d: d.upper() for d in VLCS.domains}},  # the README's VLCS/images/{CALTECH,...}
}


def _group_seed(seed: int, domain: str, classname: str) -> int:
    key = hashlib.sha256(f"{seed}:{domain}:{classname}".encode("utf-8")).digest()
    return int.from_bytes(key[:8], "little")


def num_val(n: int, val_fraction: float) -> int:
    """Images of one (domain, class) group that go to ``val``: round(f*n), >= 1 when n >= 2 and f > 0, < n."""
    if n < 2 or val_fraction <= 0:
        return 0
    return min(max(int(round(val_fraction * n)), 1), n - 1)


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTS)


def _dirs(path: str) -> list[str]:
    return sorted(e for e in os.listdir(path) if not e.startswith(".") and os.path.isdir(os.path.join(path, e)))


def _layout_hint(dataset: str) -> str:
    doms = ", ".join(DATASETS[dataset]["domains"])
    return f"expected <raw>/<domain>/<class>/<image> with one folder per {dataset} domain ({doms}, any case)"


def scan_raw(dataset: str, raw: str) -> tuple[dict[str, str], dict[str, dict[str, list[str]]], list[str]]:
    """Read the raw layout. Returns ({domain: raw folder}, {domain: {class folder: [sorted files]}}, notes)."""
    spec = DATASETS[dataset]
    if not os.path.isdir(raw):
        raise DataError(f"raw download folder not found: {raw} ({_layout_hint(dataset)})")
    lookup = {d: d for d in spec["domains"]}
    lookup.update(spec["aliases"])
    found: dict[str, str] = {}
    notes: list[str] = []
    for entry in _dirs(raw):
        dom = lookup.get(entry.lower())
        if dom is None:
            notes.append(f"ignored folder {os.path.join(raw, entry)} (not a {dataset} domain)")
            continue
        if dom in found:
            raise DataError(f"two folders of {raw} map to domain {dom!r}: {found[dom]!r} and {entry!r}")
        found[dom] = entry
    missing = [d for d in spec["domains"] if d not in found]
    if missing:
        hint = ""
        for sub in _dirs(raw):
            if all(any(lookup.get(e.lower()) == d for e in _dirs(os.path.join(raw, sub))) for d in missing):
                hint = f"; did you mean --raw {os.path.join(raw, sub)}?"
                break
        raise DataError(f"raw layout: {raw} has no folder for domain(s) {', '.join(missing)} "
                        f"(found: {', '.join(_dirs(raw)) or 'nothing'}; {_layout_hint(dataset)}){hint}")
    files: dict[str, dict[str, list[str]]] = {}
    for dom in spec["domains"]:
        ddir = os.path.join(raw, found[dom])
        loose = [e for e in sorted(os.listdir(ddir)) if _is_image(e) and os.path.isfile(os.path.join(ddir, e))]
        if loose:
            raise DataError(f"raw layout: images directly in {ddir} (e.g. {loose[0]}); "
                            f"{_layout_hint(dataset)}")
        classes = _dirs(ddir)
        if not classes:
            raise DataError(f"raw layout: no class folders in {ddir} ({_layout_hint(dataset)})")
        lowered = [c.lower() for c in classes]
        dup = sorted({c for c in lowered if lowered.count(c) > 1})
        if dup:
            raise DataError(f"raw layout: class folders of {ddir} differ only in case: {', '.join(dup)}")
        files[dom] = {}
        for cls in classes:
            cdir = os.path.join(ddir, cls)
            imgs = sorted(e for e in os.listdir(cdir) if _is_image(e) and os.path.isfile(os.path.join(cdir, e)))
            if not imgs:
                notes.append(f"no images in {cdir}")
                continue
            files[dom][cls] = imgs
        if not files[dom]:
            raise DataError(f"raw layout: no images in the class folders of {ddir} (extensions: "
                            f"{', '.join(IMAGE_EXTS)}; {_layout_hint(dataset)})")
    return found, files, notes


def make_splits(dataset: str, dest_domain: dict[str, str], files: dict[str, dict[str, list[str]]],
                val_fraction: float, seed: int) -> tuple[dict[str, dict[str, list[list]]], list[str]]:
    """Pure part: ({domain: {"train"|"val"|"test": entries}}, sorted class names)."""
    classnames = sorted({cls.lower() for per_cls in files.values() for cls in per_cls})
    label = {c: i for i, c in enumerate(classnames)}
    domains = DATASETS[dataset]["domains"]
    part: dict[str, dict[str, list[list]]] = {}  # domain -> train/val/all entries of that domain
    for dom in domains:
        tr: list[list] = []
        va: list[list] = []
        for cls, names in files[dom].items():
            cname = cls.lower()
            entries = [[f"{dest_domain[dom]}/{cls}/{n}", label[cname], cname] for n in sorted(names)]
            order = list(range(len(entries)))
            random.Random(_group_seed(seed, dom, cname)).shuffle(order)
            val_idx = set(order[:num_val(len(entries), val_fraction)])
            for i, e in enumerate(entries):
                (va if i in val_idx else tr).append(e)
        part[dom] = {"train": tr, "val": va, "all": tr + va}
    out: dict[str, dict[str, list[list]]] = {}
    for held in domains:
        src = [d for d in domains if d != held]
        out[held] = {
            "train": sorted((e for d in src for e in part[d]["train"]), key=lambda e: e[0]),
            "val": sorted((e for d in src for e in part[d]["val"]), key=lambda e: e[0]),
            "test": sorted(part[held]["all"], key=lambda e: e[0]),
        }
    return out, classnames


def _encode(obj: Any) -> bytes:
    return (json.dumps(obj, indent=None, ensure_ascii=False) + "\n").encode("utf-8")


def _same_file(dest: str, src: str) -> bool:
    try:
        if os.path.samefile(dest, src):
            return True
        return os.path.isfile(dest) and os.path.getsize(dest) == os.path.getsize(src)
    except OSError:
        return False


def place_images(raw: str, image_dir: str, found: dict[str, str], dest_domain: dict[str, str],
                 files: dict[str, dict[str, list[str]]], link: str, force: bool) -> dict[str, int]:
    """Symlink/copy every image to ``<image_dir>/<dest domain>/<class>/<file>``; returns counts."""
    counts = {"created": 0, "kept": 0, "replaced": 0}
    for dom, per_cls in files.items():
        for cls, names in per_cls.items():
            ddir = os.path.join(image_dir, dest_domain[dom], cls)
            os.makedirs(ddir, exist_ok=True)
            for n in names:
                src = os.path.realpath(os.path.join(raw, found[dom], cls, n))
                dest = os.path.join(ddir, n)
                if os.path.lexists(dest):
                    if _same_file(dest, src):
                        counts["kept"] += 1
                        continue
                    if not force:
                        raise DataError(f"refusing to overwrite {dest}: it exists and is not {src} "
                                        f"(pass --force to replace it)")
                    if os.path.isdir(dest) and not os.path.islink(dest):
                        shutil.rmtree(dest)
                    else:
                        os.unlink(dest)
                    counts["replaced"] += 1
                else:
                    counts["created"] += 1
                if link == "symlink":
                    os.symlink(src, dest)
                else:
                    shutil.copyfile(src, dest)
    return counts


def build_splits(dataset: str, raw: str, root: str, val_fraction: float = DEFAULT_VAL_FRACTION, seed: int = 0,
                 link: str = "symlink", force: bool = False,
                 log: Optional[Callable[[str], None]] = print) -> dict[str, Any]:
    """Build ``<root>/<dataset>/test_on_<domain>.json`` (+ images, manifest); returns the manifest dict."""
    log = log or (lambda _msg: None)
    if dataset not in DATASETS:
        raise ConfigError(f"unknown --dataset {dataset!r} (choose from {', '.join(DATASETS)})")
    if link not in LINK_MODES:
        raise ConfigError(f"unknown --link {link!r} (choose from {', '.join(LINK_MODES)})")
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ConfigError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    val_fraction, seed = float(val_fraction), int(seed)
    raw = os.path.abspath(os.path.expanduser(raw))
    root = os.path.abspath(os.path.expanduser(root))
    spec = DATASETS[dataset]
    ds_dir = os.path.join(root, spec["folder"])
    image_dir = os.path.join(ds_dir, "images")

    found, files, notes = scan_raw(dataset, raw)
    if link == "none":
        if os.path.realpath(raw) != os.path.realpath(image_dir):
            raise ConfigError(f"--link none needs --raw to be the images folder {image_dir} (got {raw}); "
                              f"use --link symlink or copy to place the images there")
        renamed = [found[d] for d in spec["domains"] if found[d].lower() != d]
        if renamed:
            raise DataError(f"--link none: domain folder(s) {', '.join(renamed)} of {raw} are not named after "
                            f"a {dataset} domain ({', '.join(spec['domains'])}); use --link symlink or copy, "
                            f"which rename them")
    dest_domain = {d: (found[d] if link == "none" else spec["layout"][d]) for d in spec["domains"]}
    splits, classnames = make_splits(dataset, dest_domain, files, val_fraction, seed)
    for dom in spec["domains"]:
        absent = [c for c in classnames if c not in {k.lower() for k in files[dom]}]
        if absent:
            notes.append(f"WARNING: domain {dom} has no images of class(es) {', '.join(absent)} (every run on "
                         f"these splits warns about it in its log and record)")

    # refuse to clobber differing split files before touching the disk
    payload = {f"test_on_{d}.json": _encode(splits[d]) for d in spec["domains"]}
    unchanged = []
    for fname, data in payload.items():
        path = os.path.join(ds_dir, fname)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                old = f.read()
            if old == data:
                unchanged.append(fname)
            elif not force:
                raise DataError(f"refusing to overwrite {path}: it differs from the split built now (other "
                                f"--seed/--val-fraction or images?); pass --force to replace it")

    os.makedirs(ds_dir, exist_ok=True)
    placed = {"created": 0, "kept": 0, "replaced": 0}
    if link != "none":
        placed = place_images(raw, image_dir, found, dest_domain, files, link, force)
    for fname, data in payload.items():
        if fname not in unchanged:
            atomic_write_bytes(os.path.join(ds_dir, fname), data)

    manifest = {
        "builder": BUILDER, "builder_version": BUILDER_VERSION, "dataset": dataset, "source": raw,
        "link": link, "seed": seed, "val_fraction": val_fraction,
        "val_rule": "per (source domain, class): sorted files, shuffled with a (seed, domain, class) generator; "
                    "n_val = round(val_fraction * n), >= 1 when n >= 2, < n",
        "label_order": "index in the sorted list of lower-cased class folder names",
        "classnames": classnames,
        "domain_folders": {d: dest_domain[d] for d in spec["domains"]},
        "raw_domain_folders": {d: found[d] for d in spec["domains"]},
        "images_per_domain_class": {d: {c.lower(): len(n) for c, n in sorted(files[d].items())}
                                    for d in spec["domains"]},
        "splits": {fname: {"train": len(splits[d]["train"]), "val": len(splits[d]["val"]),
                           "test": len(splits[d]["test"]), "sha256": hashlib.sha256(payload[fname]).hexdigest()}
                   for d, fname in ((d, f"test_on_{d}.json") for d in spec["domains"])},
    }
    atomic_write_bytes(os.path.join(ds_dir, MANIFEST), (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))

    for n in notes:
        log(n if n.startswith("WARNING: ") else f"note: {n}")
    n_img = sum(len(v) for per in files.values() for v in per.values())
    log(f"{dataset}: {n_img} images, {len(classnames)} classes ({', '.join(classnames)}), "
        f"domains {', '.join(f'{d}={dest_domain[d]}' for d in spec['domains'])}")
    log(f"train/val split of the source domains: val_fraction={val_fraction:g} "
        f"({100 * (1 - val_fraction):.0f}/{100 * val_fraction:.0f} per domain and class), seed={seed}")
    if link != "none":
        log(f"images ({link}) under {image_dir}: {placed['created']} created, {placed['kept']} kept, "
            f"{placed['replaced']} replaced")
    for fname, info in manifest["splits"].items():
        state = "unchanged" if fname in unchanged else "written"
        log(f"  {fname}: train {info['train']}, val {info['val']}, test {info['test']} ({state})")
    log(f"manifest: {os.path.join(ds_dir, MANIFEST)}")
    return manifest


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    p.add_argument("--raw", required=True, help="raw download: <raw>/<domain>/<class>/<image>")
    p.add_argument("--root", required=True, help="data root (DATASET.ROOT); writes <root>/<dataset>/...")
    p.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION,
                   help="fraction of each source (domain, class) put in val (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default %(default)s)")
    p.add_argument("--link", choices=LINK_MODES, default="symlink",
                   help="how images reach <root>/<dataset>/images (default %(default)s; none: --raw is that folder)")
    p.add_argument("--force", action="store_true", help="overwrite differing split files / clashing images")
    args = p.parse_args(argv)
    try:
        build_splits(args.dataset, args.raw, args.root, val_fraction=args.val_fraction, seed=args.seed,
                     link=args.link, force=args.force)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
