import math
import os

from dassl.data.datasets import Datum
from dassl.utils import read_json, write_json


class OxfordPets:
    """Only the split helpers of the family's oxford_pets.py (which other datasets call statically)."""

    @staticmethod
    def save_split(train, val, test, filepath, path_prefix):
        def _extract(items):
            out = []
            for item in items:
                impath = item.impath.replace(path_prefix, "")
                if impath.startswith("/"):
                    impath = impath[1:]
                out.append((impath, item.label, item.classname))
            return out

        split = {"train": _extract(train), "val": _extract(val), "test": _extract(test)}
        write_json(split, filepath)
        print(f"Saved split to {filepath}")

    @staticmethod
    def read_split(filepath, path_prefix):
        def _convert(items):
            return [Datum(impath=os.path.join(path_prefix, impath), label=int(label), classname=classname)
                    for impath, label, classname in items]

        print(f"Reading split from {filepath}")
        split = read_json(filepath)
        return _convert(split["train"]), _convert(split["val"]), _convert(split["test"])

    @staticmethod
    def subsample_classes(*args, subsample="all"):
        assert subsample in ["all", "base", "new"]
        if subsample == "all":
            return args
        labels = sorted({item.label for item in args[0]})
        m = math.ceil(len(labels) / 2)
        selected = labels[:m] if subsample == "base" else labels[m:]
        relabeler = {y: y_new for y_new, y in enumerate(selected)}
        output = []
        for dataset in args:
            output.append([Datum(impath=item.impath, label=relabeler[item.label], classname=item.classname)
                           for item in dataset if item.label in selected])
        return output
