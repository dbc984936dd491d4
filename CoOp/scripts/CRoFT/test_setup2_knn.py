#!/usr/bin/env python
"""KNN open-set detection over K (the official K list) from the feature dumps of the Setup-II evaluation runs.

Reads every ``scores.npz`` under ``--eval-root`` (written by ``test_setup2_energy.py``): the bank is the
source-domain ``val`` features, the ID side all held-out-domain images (as the official script; only the
correctly classified ones with ``--id-correct-only`` or a run's ``TEST.KNN_ID_CORRECT_ONLY True``), the OOD side
the open-set images. Prints one Markdown table (mean ± std over seeds of the per-seed averages over held-out
domains, percent) per method/setting and writes ``<eval-root>/setup2_knn.csv``.
"""
import argparse
import os
import sys
from collections import defaultdict

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from dassl.engine.records import is_done, load_record  # noqa: E402
from dassl.engine.ood_eval import id_keep_mask  # noqa: E402
from dassl.evaluation import ood  # noqa: E402
from dassl.evaluation.scores import ScoreInputs, compute_score  # noqa: E402
from launch.collect import cell, markdown, write_csv  # noqa: E402
from launch.sweep import COOP_DIR  # noqa: E402

OFFICIAL_K = [1, 5, 10, 25, 50, 100, 200, 300, 400, 500]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--eval-root", default="eval_open_ood")
    p.add_argument("--k", nargs="+", type=int, default=OFFICIAL_K)
    p.add_argument("--fpr", default="fpr95_tpr_id", choices=["fpr95_tpr_id", "fpr95_tpr_ood"],
                   help="FPR95 convention (default: the official KNN table's, fpr95_tpr_id)")
    p.add_argument("--id-correct-only", action="store_true",
                   help="ID side = correctly classified held-out images only (default: all, as the official script; "
                        "also on when the run set TEST.KNN_ID_CORRECT_ONLY True)")
    args = p.parse_args(argv)
    root = args.eval_root if os.path.isabs(args.eval_root) else os.path.join(COOP_DIR, args.eval_root)
    # (group, ood dataset, k) -> seed -> list over domains of (fpr, auroc)
    res = defaultdict(lambda: defaultdict(list))
    found = 0
    for dirpath, _, files in os.walk(root):
        if "scores.npz" not in files or not is_done(dirpath):
            continue
        rec = load_record(dirpath)
        z = np.load(os.path.join(dirpath, "scores.npz"))
        if "val__features" not in z.files:
            continue
        found += 1
        id_split = rec["config"]["TEST"]["OOD_ID_SPLIT"]
        # official KNN script: every held-out image is ID; TEST.KNN_ID_CORRECT_ONLY True keeps the correct ones
        only_correct = bool(rec["config"]["TEST"].get("KNN_ID_CORRECT_ONLY", False) or args.id_correct_only)
        keep = id_keep_mask(z[f"{id_split}__logits"], z[f"{id_split}__labels"], only_correct)
        bank = torch.from_numpy(z["val__features"]).double()
        id_f = torch.from_numpy(z[f"{id_split}__features"][keep]).double()
        ood_f = torch.from_numpy(z["ood_test__features"]).double()
        group = os.path.relpath(dirpath, root).split(os.sep)
        label = "/".join(group[:2])
        for k in args.k:
            if k > len(bank):
                continue
            s_id = compute_score("knn", ScoreInputs(features=id_f, bank=bank, k=k))
            s_ood = compute_score("knn", ScoreInputs(features=ood_f, bank=bank, k=k))
            m = ood.ood_metrics(s_id, s_ood)
            res[(label, k)][rec["seed"]].append((100 * m[args.fpr], 100 * m["auroc"]))
    if not found:
        print(f"No evaluation runs with feature dumps under {root}")
        return 1
    rows, csv_rows = [], []
    for (label, k), per_seed in sorted(res.items()):
        f = [float(np.mean([v[0] for v in vals])) for vals in per_seed.values()]
        a = [float(np.mean([v[1] for v in vals])) for vals in per_seed.values()]
        rows.append([label, str(k), cell(f), cell(a)])
        csv_rows.append([label, k, np.mean(f), np.std(f), np.mean(a), np.std(a), len(f)])
    print(f"> FPR95: knn → {args.fpr}" + (" (official KNN convention)" if args.fpr == "fpr95_tpr_id" else ""))
    print("> ID side: " + ("correctly classified held-out images" if args.id_correct_only else
                           "all held-out images (official), unless a run set TEST.KNN_ID_CORRECT_ONLY True") + "\n")
    print(markdown(["runs", "K", "FPR95↓", "AUROC↑"], rows))
    path = os.path.join(root, "setup2_knn.csv")
    write_csv(path, ["runs", "k", "fpr95_mean", "fpr95_std", "auroc_mean", "auroc_std", "n_seeds"], csv_rows)
    print(f"\nCSV written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
