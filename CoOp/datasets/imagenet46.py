"""Setup-I datasets: ImageNet with 40 % of the classes in-distribution (spec 4.1). ``46`` = a 4 : 6 class split.

Registered names: ``ImageNet46`` (training runs) and ``ImageNetOOD46`` (evaluation runs). Both read
``<root>/imagenet/``; ``ImageNetOOD46`` also reads one ImageNet variant, selected by ``TEST_OOD``.

Layout under ``DATASET.ROOT``::

    imagenet/classnames.txt                       "<wnid> <class name...>" per line (CoOp/CLIP names, 1000 lines)
    imagenet/images/train/<wnid>/*               ImageNet-1K train images
    imagenet/images/val/<wnid>/*                  ImageNet-1K val images, re-arranged into class folders
    imagenetv2/imagenetv2-matched-frequency-format-val/<0..999>/*   folder i = line i of classnames.txt
    imagenet-sketch/images/<wnid>/*
    imagenet-adversarial/imagenet-a/<wnid>/*     (200 classes; a README.txt here is ignored)
    imagenet-rendition/imagenet-r/<wnid>/*       (200 classes; a README.txt here is ignored)

**Class split.** :func:`imagenet46_class_split` = ``np.random.RandomState(seed).permutation(n)[:n_id]`` with
``seed = cfg.SEED``, ``n`` = number of lines of classnames.txt (1000) and ``n_id = round(0.4 * n)`` (400). Label k
is position k of that list (not sorted). This equals the official ``np.random.choice(all_classnames, 400,
replace=False)`` called right after ``set_random_seed(seed)``. The official call also *consumed* numpy's global
RNG; this module uses its own ``RandomState`` and leaves the global numpy RNG untouched, so later numpy draws of
a run (none in the data layer) could differ from the official ones. Membership is decided by class index / wnid
(the official code tests class *names*, which would conflate duplicated names; not reproduced).

**Splits of** ``ImageNet46`` (``K`` = ``DATASET.NUM_SHOTS``):

- ``train_x``: the official few-shot construction: ``generate_fewshot_dataset(full_train, K)`` on the full train
  list in wnid order, where every held-out (OOD) image carries label -1 and so all 600 OOD classes form *one*
  group from which K images are drawn and then discarded; the result is restricted to the ID classes → 400·K
  images. (Drawing and discarding the OOD group keeps python's ``random`` stream identical to a fresh official
  run; the official ``split_fewshot/shot_<K>-seed_<S>.pkl`` cache, shared with CoOp's ImageNet class, is not
  used.) ``K < 1``: all ID train images.
- ``test`` (= "test_id"): all ImageNet-val images of the ID classes (20,000).
- ``val``: 4 images per ID class sampled from ``test`` (1,600) -- **a subset of the test set**, as in the
  official code (used for best-epoch selection; Setup-I's detection threshold is also computed on it,
  ``TEST.OOD_ID_SPLIT val``).
- ``ood_test`` (open-set OOD): ``DATASET.SETUP1_OOD_SIZE`` (1000) images sampled uniformly (one
  ``random.sample``) from the ImageNet-val images of the held-out classes (30,000); label -1, class name = the
  held-out class name. ``SETUP1_OOD_SIZE < 1`` keeps all of them (see the ambiguity below).
- The official class also lists ImageNet-V2/Sketch/A/R (and crashes on their README.txt) without using them;
  here ``ImageNet46`` does not touch them, so they need not exist for training.

**Splits of** ``ImageNetOOD46``: same class split; ``val`` = 4 images per ID class sampled from the ID val
images; ``ood_test`` as above; ``test`` = ``TEST_OOD``: ``test_id`` (the ID val images), ``imagenet_v2``,
``imagenet_s``, ``imagenet_a`` or ``imagenet_r`` -- the variant's images whose class is an ID class, relabelled
to the base index (classification stays 400-way: ``classnames`` are always the 400 ID names in label order, even
when A/R cover only ~80 of them). ``train_x``: official evaluation runs pass no ``NUM_SHOTS`` (-1) and never
use the train list, so with ``K < 1`` it is empty and ``images/train`` is not read; ``K >= 1`` gives the same
``train_x`` as ``ImageNet46``.

**The ``preprocessed.pkl`` ambiguity (spec 4.1).** The official ``ImageNetOOD46`` reads its full lists from
``imagenet/preprocessed.pkl``, the cache file name of CoOp's standard ImageNet class. Written by that class, the
held-out images keep their 0..999 labels, every held-out class has 50 < 1000 val images and ``ood_test`` becomes
*all* 30,000 held-out val images; written by ``ImageNetOOD46`` itself, they carry -1 and ``ood_test`` is 1,000
random images. Default here: 1000 (the fresh-cache behaviour); ``DATASET.SETUP1_OOD_SIZE -1`` gives the other.

**Seeds 2 and 3 share seed 1's cache** (``DATASET.SETUP1_OOD_SAMPLE``). ``preprocessed.pkl`` has no seed in its
name, so in the official sweep (seed 1 first) the evaluation runs of seeds 2 and 3 read the labels written by
seed 1: a held-out class of seed S that was an ID class of seed 1 keeps its seed-1 label, so its 50 val images
form their own group and are all kept, while the classes held out in both seeds form the single -1 group from
which ``SETUP1_OOD_SIZE`` images are drawn (~240 x 50 + 1000 = ~13,000 open-set images). ``shared_cache``
(default, official) reproduces this for ``ImageNetOOD46``; ``per_seed`` samples every seed as a fresh cache would
(one -1 group). ``ImageNet46`` (training) always samples per seed: its official cache name carries the seed.
The record's ``protocol.dataset`` says which sample ran.

**Randomness.** Python's global ``random`` (seeded by ``set_random_seed``), consumed after every folder was
listed (a missing folder raises before anything is drawn), in this order: ``train_x`` (only when ``K >= 1``),
``val``, ``ood_test``.

**Caching.** None. Listing the folders with ``os.scandir`` (no ``stat``, no image opened) takes seconds even for
ImageNet's 1.28M train files, so there is no cache file to go stale or to be shared with another dataset class
(spec bug 12: the official ``preprocessed*.pkl``/``split_fewshot`` pickles are shared between classes).

**Config.** :func:`add_setup1_config` adds ``TEST_OOD`` and ``DATASET.SETUP1_OOD_SIZE`` to a config tree (call
it from the defaults); when the keys are absent the same defaults are used.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np

from dassl.data.datasets import DATASET_REGISTRY, Datum, DatasetBase
from dassl.utils.errors import ConfigError, DataError

TEST_OOD_DEFAULT = "test_id"
OOD_SIZE_DEFAULT = 1000
OOD_SAMPLE_MODES = ("shared_cache", "per_seed")
CACHE_SEED = 1  # the seed whose run writes the official preprocessed.pkl (the sweeps start with seed 1)

# TEST_OOD value -> (folder under DATASET.ROOT, how class folders are named, what belongs there)
VARIANTS: dict[str, tuple[str, str, str]] = {
    "imagenet_v2": (os.path.join("imagenetv2", "imagenetv2-matched-frequency-format-val"), "index",
                    "ImageNet-V2 matched-frequency: one folder per class named 0..999 (folder i = line i of "
                    "imagenet/classnames.txt)"),
    "imagenet_s": (os.path.join("imagenet-sketch", "images"), "wnid",
                   "ImageNet-Sketch: one folder per class named by wnid"),
    "imagenet_a": (os.path.join("imagenet-adversarial", "imagenet-a"), "wnid",
                   "ImageNet-A: one folder per class named by wnid"),
    "imagenet_r": (os.path.join("imagenet-rendition", "imagenet-r"), "wnid",
                   "ImageNet-R: one folder per class named by wnid"),
}
TEST_OOD_CHOICES = ("test_id",) + tuple(VARIANTS)


def add_setup1_config(cfg: Any) -> None:
    """Add the Setup-I keys to a yacs config (call from ``defaults.py``; no-op for keys already present).

    - ``TEST_OOD`` (``test_id`` | ``imagenet_v2`` | ``imagenet_s`` | ``imagenet_a`` | ``imagenet_r``): the
      ``test`` split of ``ImageNetOOD46`` (the official ``--test_ood`` flag).
    - ``DATASET.SETUP1_OOD_SIZE`` (1000): size of the open-set ``ood_test`` sample of ImageNet46/OOD46; < 1 = all
      held-out val images (the behaviour of an official run whose ``preprocessed.pkl`` came from CoOp's ImageNet).
    - ``DATASET.SETUP1_OOD_SAMPLE`` (``shared_cache``): ``shared_cache`` (official: evaluation runs of every seed
      group the held-out images by seed 1's labels) or ``per_seed``.
    """
    if "TEST_OOD" not in cfg:
        cfg.TEST_OOD = TEST_OOD_DEFAULT
    if "SETUP1_OOD_SIZE" not in cfg.DATASET:
        cfg.DATASET.SETUP1_OOD_SIZE = OOD_SIZE_DEFAULT
    if "SETUP1_OOD_SAMPLE" not in cfg.DATASET:
        cfg.DATASET.SETUP1_OOD_SAMPLE = OOD_SAMPLE_MODES[0]


def imagenet46_class_split(seed: int, n_classes: int = 1000, n_id: int = 400) -> list[int]:
    """The ID classes of Setup-I: ``RandomState(seed).permutation(n_classes)[:n_id]`` (label k = entry k).

    Equal to the official ``np.random.seed(seed); np.random.choice(n_classes, n_id, replace=False)`` (legacy
    numpy: ``choice`` without replacement is ``permutation()[:n]``), but without touching the global RNG.
    """
    if not 0 < n_id <= n_classes:
        raise ValueError(f"need 0 < n_id <= n_classes, got n_id={n_id}, n_classes={n_classes}")
    perm = np.random.RandomState(int(seed)).permutation(int(n_classes))
    return [int(i) for i in perm[:n_id]]


def read_classnames(path: str) -> list[tuple[str, str]]:
    """``[(wnid, class name), ...]`` in file order from a ``classnames.txt`` ("<wnid> <name...>" per line)."""
    if not os.path.isfile(path):
        raise DataError(f"ImageNet class list not found: {path} (expected CoOp's classnames.txt: one "
                        f"'<wnid> <class name>' line per ImageNet-1K class, 1000 lines sorted by wnid)")
    out: list[tuple[str, str]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split(" ", 1)
            if len(parts) != 2 or not parts[1].strip():
                raise DataError(f"malformed line {lineno} in {path}: {line!r} (expected '<wnid> <class name>')")
            out.append((parts[0], parts[1].strip()))
    if not out:
        raise DataError(f"ImageNet class list {path} is empty")
    wnids = [w for w, _ in out]
    if len(set(wnids)) != len(wnids):
        raise DataError(f"duplicated wnid in {path}")
    return out


def _require_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise DataError(f"folder not found: {path} (expected {what}; see the dataset layout in the README)")


def scan_class_folders(folder: str) -> dict[str, list[str]]:
    """``{sub-folder name: sorted file names}`` for the sub-folders of ``folder`` (no ``stat``, no image opened).

    Non-directory entries (e.g. ``README.txt`` of ImageNet-A/R) and hidden entries are ignored.
    """
    out: dict[str, list[str]] = {}
    with os.scandir(folder) as it:
        subdirs = [e.name for e in it if not e.name.startswith(".") and e.is_dir()]
    for name in sorted(subdirs):
        with os.scandir(os.path.join(folder, name)) as it:
            out[name] = sorted(e.name for e in it if not e.name.startswith(".") and not e.is_dir())
    return out


class ImageNetSetup1(DatasetBase):
    """Shared machinery of ``ImageNet46`` and ``ImageNetOOD46`` (see the module docstring).

    Class attributes: ``ID_FRACTION`` (0.4: 400 of 1000 classes), ``VAL_SHOTS`` (4). ``n_id`` in the
    constructor overrides ``round(ID_FRACTION * n_classes)``.
    """

    dataset_dir = "imagenet"
    ID_FRACTION = 0.4
    VAL_SHOTS = 4

    def __init__(self, cfg: Any, n_id: Optional[int] = None) -> None:
        self.read_class_split(cfg, n_id)
        self.build(cfg)

    # ---------------------------------------------------------------- class split
    def read_class_split(self, cfg: Any, n_id: Optional[int] = None) -> None:
        root = os.path.abspath(os.path.expanduser(cfg.DATASET.ROOT))
        self.root = root
        self.dataset_root = os.path.join(root, self.dataset_dir)
        _require_dir(self.dataset_root, f"<root>/{self.dataset_dir}/ with classnames.txt and "
                                        f"images/{{train,val}}/<wnid>/*")
        self.all_classes = read_classnames(os.path.join(self.dataset_root, "classnames.txt"))
        n_classes = len(self.all_classes)
        if n_id is None:
            n_id = int(round(self.ID_FRACTION * n_classes))
        seed = int(cfg.SEED)
        if seed < 0:
            raise ConfigError(f"{type(self).__name__} needs a seed >= 0 (--seed S): the seed selects the "
                              f"{n_id} in-distribution classes")
        if n_classes != 1000:
            print(f"Note: {type(self).__name__}: {n_classes} classes in classnames.txt (ImageNet-1K has 1000)")
        self.seed = seed
        self.class_split = imagenet46_class_split(seed, n_classes, n_id)
        self.id_label = {idx: k for k, idx in enumerate(self.class_split)}  # base index -> label
        self.wnid_index = {w: i for i, (w, _) in enumerate(self.all_classes)}
        self.id_wnids = [self.all_classes[i][0] for i in self.class_split]
        self.id_classnames = [self.all_classes[i][1] for i in self.class_split]
        dup = sorted({c for c in self.id_classnames if self.id_classnames.count(c) > 1})
        if dup and getattr(cfg, "VERBOSE", False):
            print(f"Note: ID classes with the same name (identical text prompts): {dup}")

    def split_record(self) -> dict[str, Any]:
        """The class split as plain data (for writing to the run directory, spec 8.5)."""
        return {"dataset": type(self).__name__, "seed": self.seed, "n_classes": len(self.all_classes),
                "class_split": list(self.class_split), "id_wnids": list(self.id_wnids),
                "id_classnames": list(self.id_classnames)}

    def set_label_space(self) -> None:
        """Always the ID classes in label order (``n_id``-way), whatever the splits contain."""
        self._num_classes = len(self.class_split)
        self._lab2cname = {k: c for k, c in enumerate(self.id_classnames)}
        self._classnames = list(self.id_classnames)

    # ---------------------------------------------------------------- reading
    def image_split_dir(self, split: str) -> str:
        path = os.path.join(self.dataset_root, "images", split)
        _require_dir(path, f"the ImageNet {split} images in one folder per class named by wnid "
                           f"(<root>/{self.dataset_dir}/images/{split}/<wnid>/*)")
        return path

    def read_imagenet_split(self, split: str) -> list[Datum]:
        """All images of ``images/<split>`` in wnid order; ID classes get their label, the others -1."""
        folder = self.image_split_dir(split)
        out: list[Datum] = []
        for wnid, files in scan_class_folders(folder).items():
            idx = self.wnid_index.get(wnid)
            if idx is None:
                continue  # not an ImageNet-1K class of classnames.txt
            label = self.id_label.get(idx, -1)
            cname = self.all_classes[idx][1]
            d = os.path.join(folder, wnid)
            out.extend(Datum(impath=os.path.join(d, f), label=label, classname=cname) for f in files)
        if not any(item.label >= 0 for item in out):
            raise DataError(f"no image of an in-distribution class under {folder} (expected "
                            f"<wnid>/<image> for the wnids of classnames.txt)")
        return out

    def read_variant(self, name: str) -> list[Datum]:
        """Images of an ImageNet variant whose class is an ID class, relabelled to the base index."""
        sub, naming, what = VARIANTS[name]
        folder = os.path.join(self.root, sub)
        _require_dir(folder, what)
        out: list[Datum] = []
        folders = scan_class_folders(folder)
        if naming == "index":
            keys = sorted((int(k), k) for k in folders if k.isdigit())
            resolved = [(i, k) for i, k in keys if i < len(self.all_classes)]
        else:
            resolved = [(self.wnid_index[k], k) for k in folders if k in self.wnid_index]
        if not resolved:
            raise DataError(f"no class folder found under {folder} (expected {what})")
        for idx, key in resolved:
            label = self.id_label.get(idx)
            if label is None:
                continue
            d = os.path.join(folder, key)
            out.extend(Datum(impath=os.path.join(d, f), label=label, classname=self.id_classnames[label])
                       for f in folders[key])
        if not out:
            print(f"WARNING: {folder} holds no image of the {len(self.class_split)} in-distribution classes")
        return out

    # ---------------------------------------------------------------- sampling
    def sample_train_x(self, full_train: list[Datum], num_shots: int) -> list[Datum]:
        """Official K-shot construction (the OOD images form one label -1 group, drawn and discarded)."""
        if num_shots < 1:
            return [item for item in full_train if item.label >= 0]
        sampled = self.generate_fewshot_dataset(full_train, num_shots=num_shots)
        return [item for item in sampled if item.label >= 0]

    SHARED_CACHE = False  # whether SETUP1_OOD_SAMPLE shared_cache applies (the evaluation class)

    def ood_sample_mode(self, cfg: Any) -> str:
        """The open-set sample that runs: ``per_seed`` or ``shared_cache`` (only evaluation runs, seed != 1)."""
        mode = str(getattr(cfg.DATASET, "SETUP1_OOD_SAMPLE", OOD_SAMPLE_MODES[0]))
        if mode not in OOD_SAMPLE_MODES:
            raise ConfigError(f"DATASET.SETUP1_OOD_SAMPLE must be one of {OOD_SAMPLE_MODES}, got {mode!r}")
        shared = mode == "shared_cache" and self.SHARED_CACHE and self.seed != CACHE_SEED
        return "shared_cache" if shared else "per_seed"

    def sample_ood_test(self, ood_val: list[Datum], cfg: Any) -> list[Datum]:
        size = int(getattr(cfg.DATASET, "SETUP1_OOD_SIZE", OOD_SIZE_DEFAULT))
        self.ood_sample = self.ood_sample_mode(cfg)
        if size < 1:
            return list(ood_val)
        if self.ood_sample == "per_seed":
            return self.generate_fewshot_dataset(ood_val, num_shots=size)  # one group (label -1)
        cache_label = {idx: k for k, idx in enumerate(imagenet46_class_split(CACHE_SEED, len(self.all_classes),
                                                                              len(self.class_split)))}
        relabelled = [Datum(impath=d.impath, classname=d.classname, label=cache_label.get(
            self.wnid_index[os.path.basename(os.path.dirname(d.impath))], -1)) for d in ood_val]
        sampled = self.generate_fewshot_dataset(relabelled, num_shots=size)
        return [Datum(impath=d.impath, label=-1, classname=d.classname) for d in sampled]

    def protocol_notes(self) -> dict[str, Any]:
        """What the run record's ``protocol.dataset`` says about this dataset's sampling."""
        return {"setup1_ood_sample": getattr(self, "ood_sample", "per_seed"), "setup1_cache_seed": CACHE_SEED,
                "ood_test_size": len(self.ood_test or [])}

    def build(self, cfg: Any) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


@DATASET_REGISTRY.register()
class ImageNet46(ImageNetSetup1):
    """Setup-I training dataset: K-shot ``train_x``, ``val`` ⊂ ``test`` (ID ImageNet-val), open-set ``ood_test``."""

    def build(self, cfg: Any) -> None:
        full_train = self.read_imagenet_split("train")
        full_val = self.read_imagenet_split("val")
        test = [item for item in full_val if item.label >= 0]
        ood_val = [item for item in full_val if item.label < 0]
        # python `random` draws, official order: train_x, val (from test), ood_test
        train_x = self.sample_train_x(full_train, cfg.DATASET.NUM_SHOTS)
        val = self.generate_fewshot_dataset(test, num_shots=self.VAL_SHOTS)
        ood_test = self.sample_ood_test(ood_val, cfg)
        DatasetBase.__init__(self, train_x=train_x, val=val, test=test, ood_test=ood_test)
        self.set_label_space()


@DATASET_REGISTRY.register()
class ImageNetOOD46(ImageNetSetup1):
    """Setup-I evaluation dataset: ``test`` chosen by ``TEST_OOD`` (ID val or an ImageNet variant)."""

    SHARED_CACHE = True

    def build(self, cfg: Any) -> None:
        test_ood = str(getattr(cfg, "TEST_OOD", TEST_OOD_DEFAULT))
        if test_ood not in TEST_OOD_CHOICES:
            raise ConfigError(f"unknown TEST_OOD {test_ood!r} (one of: {', '.join(TEST_OOD_CHOICES)})")
        self.test_ood = test_ood
        num_shots = cfg.DATASET.NUM_SHOTS
        full_train = self.read_imagenet_split("train") if num_shots >= 1 else []
        full_val = self.read_imagenet_split("val")
        id_val = [item for item in full_val if item.label >= 0]
        ood_val = [item for item in full_val if item.label < 0]
        test = id_val if test_ood == "test_id" else self.read_variant(test_ood)
        # python `random` draws: train_x (K >= 1 only), val, ood_test
        train_x = self.sample_train_x(full_train, num_shots) if num_shots >= 1 else []
        val = self.generate_fewshot_dataset(id_val, num_shots=self.VAL_SHOTS)
        ood_test = self.sample_ood_test(ood_val, cfg)
        DatasetBase.__init__(self, train_x=train_x, val=val, test=test, ood_test=ood_test)
        self.set_label_space()
