#!/usr/bin/env python
"""KNN open-set detection over K (the official K list) from the feature dumps of the Setup-II evaluation runs.

Takes every flag of the Setup-II evaluation driver (``test_setup2_energy.py``: ``--preset``, ``--dry-run``,
``--datasets``, ``--cfgs``, ``--domains``, ``--seeds``, ``--ood``, ``--jobs``, ``--launcher``, ... and ``KEY VALUE``
overrides after ``--``) and plans the same evaluation runs; those not yet done are run first (with the launcher),
then the table is computed from the planned runs' ``scores.npz``: the bank is the source-domain ``val`` features,
the ID side all held-out-domain images (as the official script; only the correctly classified ones with
``--id-correct-only`` or a run's ``TEST.KNN_ID_CORRECT_ONLY True``), the OOD side the open-set images. Prints one
Markdown table (mean ± std over seeds of the per-seed averages over held-out domains, percent) and writes
``<eval-root>/setup2_knn.csv``. A K larger than some run's bank is not computed: its row says ``K > bank (n)``.
"""
import argparse
import os
import sys
from collections import defaultdict

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from dassl.engine.ood_eval import id_keep_mask  # noqa: E402
from dassl.engine.records import is_done, load_record  # noqa: E402
from dassl.evaluation import ood  # noqa: E402
from dassl.evaluation.scores import ScoreInputs, compute_score  # noqa: E402
from launch import setup2  # noqa: E402
from launch.collect import cell, markdown, write_csv  # noqa: E402
from launch.sweep import split_opts  # noqa: E402

OFFICIAL_K = [1, 5, 10, 25, 50, 100, 200, 300, 400, 500]


def knn_parser(add_help: bool = False) -> argparse.ArgumentParser:
    """The KNN table's own flags (every other flag is the evaluation driver's)."""
    p = argparse.ArgumentParser(add_help=add_help, allow_abbrev=False, usage=argparse.SUPPRESS)
    g = p.add_argument_group("KNN table (the other flags are test_setup2_energy.py's)")
    g.add_argument("--k", nargs="+", type=int, default=OFFICIAL_K, help="K values (default: the official list)")
    g.add_argument("--fpr", default="fpr95_tpr_id", choices=["fpr95_tpr_id", "fpr95_tpr_ood"],
                   help="FPR95 convention (default: the official KNN table's, fpr95_tpr_id)")
    g.add_argument("--id-correct-only", action="store_true",
                   help="ID side = correctly classified held-out images only (default: all, as the official script; "
                        "also on when the run set TEST.KNN_ID_CORRECT_ONLY True)")
    return p


def split_argv(argv) -> tuple[argparse.Namespace, list[str]]:
    """(the KNN flags, the evaluation driver's command line: every other flag and the ``--`` overrides)."""
    flags, opts = split_opts(argv)
    knn, rest = knn_parser().parse_known_args(flags)
    return knn, rest + (["--", *opts] if opts else [])


def run_dirs(jobs) -> list[str]:
    return [d for j in jobs for d in j.run_dirs()]


def knn_results(args, dirs):
    """(label, k) -> {"seeds": seed -> [(fpr, auroc) per domain], "banks": bank sizes smaller than k}; and the
    planned directories without a finished run or without feature dumps."""
    res = defaultdict(lambda: {"seeds": defaultdict(list), "banks": []})
    skipped = []
    for d in dirs:
        path = os.path.join(d, "scores.npz")
        if not is_done(d) or not os.path.isfile(path):
            skipped.append(d)
            continue
        z = np.load(path)
        if "val__features" not in z.files:
            skipped.append(d)
            continue
        rec = load_record(d)
        id_split = rec["config"]["TEST"]["OOD_ID_SPLIT"]
        # official KNN script: every held-out image is ID; TEST.KNN_ID_CORRECT_ONLY True keeps the correct ones
        only_correct = bool(rec["config"]["TEST"].get("KNN_ID_CORRECT_ONLY", False) or args.id_correct_only)
        keep = id_keep_mask(z[f"{id_split}__logits"], z[f"{id_split}__labels"], only_correct)
        bank = torch.from_numpy(z["val__features"]).double()
        id_f = torch.from_numpy(z[f"{id_split}__features"][keep]).double()
        ood_f = torch.from_numpy(z["ood_test__features"]).double()
        label = "/".join(os.path.relpath(d, args.eval_root).split(os.sep)[:2])
        for k in args.k:
            if k > len(bank):  # the official faiss search would return sentinel distances: not computed
                res[(label, k)]["banks"].append(len(bank))
                continue
            s_id = compute_score("knn", ScoreInputs(features=id_f, bank=bank, k=k))
            s_ood = compute_score("knn", ScoreInputs(features=ood_f, bank=bank, k=k))
            m = ood.ood_metrics(s_id, s_ood)
            res[(label, k)]["seeds"][rec["seed"]].append((100 * m[args.fpr], 100 * m["auroc"]))
    return res, skipped


def print_table(args, res) -> None:
    rows, csv_rows = [], []
    for (label, k), r in sorted(res.items()):
        if r["banks"]:
            note = f"K > bank ({min(r['banks'])})"
            rows.append([label, str(k), note, note])
            csv_rows.append([label, k, "", "", "", "", 0, note])
            continue
        f = [float(np.mean([v[0] for v in vals])) for vals in r["seeds"].values()]
        a = [float(np.mean([v[1] for v in vals])) for vals in r["seeds"].values()]
        rows.append([label, str(k), cell(f), cell(a)])
        csv_rows.append([label, k, np.mean(f), np.std(f), np.mean(a), np.std(a), len(f), ""])
    print(f"> FPR95: knn → {args.fpr}" + (" (official KNN convention)" if args.fpr == "fpr95_tpr_id" else ""))
    print("> ID side: " + ("correctly classified held-out images" if args.id_correct_only else
                           "all held-out images (official), unless a run set TEST.KNN_ID_CORRECT_ONLY True") + "\n")
    print(markdown(["runs", "K", "FPR95↓", "AUROC↑"], rows))
    if any(r["banks"] for r in res.values()):
        print("\nK > bank (n): K exceeds the n source-domain val features of some runs of the row (not computed)")
    path = os.path.join(args.eval_root, "setup2_knn.csv")
    write_csv(path, ["runs", "k", "fpr95_mean", "fpr95_std", "auroc_mean", "auroc_std", "n_seeds", "note"],
              csv_rows)
    print(f"\nCSV written to {path}")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(split_opts(argv)[0]):
        print(__doc__.split("\n")[0] + "\n")
        knn_parser(add_help=True).print_help()
        print()
        return setup2.main(["--help"], trainer="CRoFT", evaluate=True)
    try:
        knn, driver_argv = split_argv(argv)
        if any(k < 1 for k in knn.k):
            raise SystemExit(f"error: --k takes positive integers, got {' '.join(map(str, knn.k))}")
    except SystemExit as err:
        if isinstance(err.code, str):
            print(err.code, file=sys.stderr)
            return 2
        raise
    # the evaluation sweep (test_setup2_energy.py with these flags): runs what is not done yet, usually nothing
    code = setup2.main(driver_argv, trainer="CRoFT", evaluate=True)
    if code == 2:
        return code
    args, jobs = setup2.plan(driver_argv, trainer="CRoFT", evaluate=True)
    if args.dry_run:
        return code
    for key, value in vars(knn).items():
        setattr(args, key, value)
    res, skipped = knn_results(args, run_dirs(jobs))
    if skipped:
        print(f"{len(skipped)} planned evaluation runs have no finished feature dump (left out), e.g. {skipped[0]}")
    if not res:
        print(f"No evaluation runs with feature dumps among the {len(skipped)} planned under {args.eval_root}")
        return 1
    print_table(args, res)
    return code


if __name__ == "__main__":
    sys.exit(main())
