"""The Dassl API as CoOp-family code uses it (upstream Dassl.pytorch behaviour)."""
from __future__ import annotations

import copyreg
import io
import json
import os
import pickle
import sys

import pytest
import torch
import torch.nn as nn

from dassl.data.datasets import Datum, read_split, save_split, subsample_classes
from dassl.engine.trainer import SimpleTrainer
from dassl.metrics import compute_accuracy
from dassl.utils import (listdir_nohidden, load_pretrained_weights, mkdir_if_missing, read_json, setup_logger,
                         write_json)

UPSTREAM_FIELDS = {"_impath": "/d/images/banded/a.jpg", "_label": 3, "_domain": 1, "_classname": "banded"}


def test_compute_accuracy_topk_by_hand():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.5, 0.4, 0.1]])
    target = torch.tensor([1, 2, 2, 1])
    # top-1 predictions 1, 0, 2, 0 -> 2 of 4 correct; top-2 adds sample 4 (second choice 1) -> 3 of 4
    top1, top2 = compute_accuracy(logits, target, topk=(1, 2))
    assert top1.shape == (1,) and top1.item() == pytest.approx(50.0)
    assert top2.item() == pytest.approx(75.0)
    assert compute_accuracy([logits, None], target)[0].item() == pytest.approx(50.0)


def test_json_helpers_and_mkdir(tmp_path):
    path = tmp_path / "a" / "b" / "split.json"
    write_json({"train": [["x.jpg", 0, "dog"]]}, str(path))
    assert json.loads(path.read_text()) == {"train": [["x.jpg", 0, "dog"]]}
    assert path.read_text().startswith('{\n    "train"')  # Dassl's indent=4 layout
    assert read_json(str(path)) == {"train": [["x.jpg", 0, "dog"]]}
    mkdir_if_missing(str(tmp_path / "c" / "d"))
    mkdir_if_missing(str(tmp_path / "c" / "d"))
    assert (tmp_path / "c" / "d").is_dir()


def test_listdir_nohidden_default_is_unsorted_like_dassl(tmp_path):
    for name in ("b", "a", ".hidden", "c"):
        (tmp_path / name).mkdir()
    expected = [f for f in os.listdir(tmp_path) if not f.startswith(".")]
    assert listdir_nohidden(str(tmp_path)) == expected
    assert listdir_nohidden(str(tmp_path), sort=True) == ["a", "b", "c"]


def test_load_pretrained_weights_skips_mismatched_layers(tmp_path, capsys):
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    before = model[1].weight.detach().clone()
    ckpt = {"state_dict": {"module.0.weight": torch.ones(2, 3), "module.0.bias": torch.zeros(2),
                           "1.weight": torch.ones(5, 5), "extra.weight": torch.ones(1)}}
    torch.save(ckpt, tmp_path / "w.pth")
    discarded = load_pretrained_weights(model, str(tmp_path / "w.pth"))
    assert torch.equal(model[0].weight, torch.ones(2, 3)) and torch.equal(model[0].bias, torch.zeros(2))
    assert torch.equal(model[1].weight, before)
    assert sorted(discarded) == ["1.weight", "extra.weight"]
    assert "discarded" in capsys.readouterr().out
    torch.save({"other": torch.ones(1)}, tmp_path / "none.pth")
    with pytest.warns(UserWarning, match="cannot be loaded"):
        load_pretrained_weights(model, str(tmp_path / "none.pth"))


def test_setup_logger_none_is_a_no_op():
    stdout = sys.stdout
    assert setup_logger(None) is None and sys.stdout is stdout


class _UpstreamWriter(pickle.Pickler):
    """Writes every Datum as upstream Dassl's plain object pickles: NEWOBJ of the class + its instance dict
    (the state given here, not what this project's Datum would write)."""

    def reducer_override(self, obj):
        if isinstance(obj, Datum):
            return copyreg.__newobj__, (Datum,), dict(UPSTREAM_FIELDS)
        return NotImplemented


class _PlainDatum:
    """Stands in for upstream's class when reading our pickles (no __setstate__: the dict is applied)."""


def test_datum_reads_upstream_pickles():
    buf = io.BytesIO()
    _UpstreamWriter(buf, protocol=pickle.HIGHEST_PROTOCOL).dump({"train": [Datum("ignored")], "val": []})
    item = pickle.loads(buf.getvalue())["train"][0]
    assert isinstance(item, Datum)
    assert (item.impath, item.label, item.domain, item.classname) == ("/d/images/banded/a.jpg", 3, 1, "banded")
    assert item.domainname == ""


def test_datum_pickles_in_upstream_layout():
    class _Reader(pickle.Unpickler):
        def find_class(self, module, name):
            assert (module, name) == ("dassl.data.datasets.base_dataset", "Datum")
            return _PlainDatum

    data = pickle.dumps([Datum("/d/images/banded/a.jpg", 3, 1, "banded")], protocol=pickle.HIGHEST_PROTOCOL)
    item = _Reader(io.BytesIO(data)).load()[0]
    # upstream Dassl's four attributes, plus the two of the official CRoFT Datum (always written: its DataManager
    # reads domainname of every item; upstream ignores them)
    assert vars(item) == dict(UPSTREAM_FIELDS, _domainname="", _alldomain=None)
    again = pickle.loads(pickle.dumps(Datum("p", 1, 0, "c", "sketch")))
    assert (again.impath, again.domainname) == ("p", "sketch")


def test_split_files_round_trip_in_coop_format(tmp_path):
    prefix = str(tmp_path / "images")
    split = {"train": [["banded/a.jpg", 0, "banded"], ["dotted/b.jpg", 1, "dotted"]],
             "val": [["banded/c.jpg", 0, "banded"]], "test": [["dotted/d.jpg", 1, "dotted"]]}
    (tmp_path / "split.json").write_text(json.dumps(split))
    train, val, test = read_split(str(tmp_path / "split.json"), prefix)
    assert [(d.impath, d.label, d.classname) for d in train] == [
        (os.path.join(prefix, "banded/a.jpg"), 0, "banded"), (os.path.join(prefix, "dotted/b.jpg"), 1, "dotted")]
    save_split(train, val, test, str(tmp_path / "out" / "split.json"), prefix)
    assert read_json(str(tmp_path / "out" / "split.json")) == split


def test_subsample_classes_base_and_new():
    items = [Datum(f"{y}.jpg", y, 0, f"c{y}") for y in range(5)]
    (base,) = subsample_classes(items, subsample="base")   # ceil(5/2) = 3 base classes
    (new,) = subsample_classes(items, subsample="new")
    assert [(d.label, d.classname) for d in base] == [(0, "c0"), (1, "c1"), (2, "c2")]
    assert [(d.label, d.classname) for d in new] == [(0, "c3"), (1, "c4")]


def test_default_model_inference_is_dassls_self_model_input():
    class _T:
        image_encoder = None

        def model(self, x):
            return x * 2

    x = torch.ones(2, 3)
    assert torch.equal(SimpleTrainer.model_inference(_T(), x).logits, x * 2)  # as an InferenceOutput
