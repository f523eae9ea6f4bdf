"""Calibration of the workbook's comparison statistics on real data (kdlib.calibration).

A/A experiments (two arms that differ only by seed: every rejection is a false positive) and power
experiments (the A/A differences shifted by 2 SD; post-hoc logit adjustment against the plain
model, a real gain) on scikit-learn's digits made into long-tailed pseudo-patients, through
kdlib's own make_splits / fold_subjects and comparison functions. Prints, for the cv design and
the fixed-test-set (holdout) design, the rate of every test and interval at alpha = 0.05 with its
binomial standard error.

    python benchmarks/calibrate_stats.py                 # 200 replicates, 5 folds x 4 repeats
    python benchmarks/calibrate_stats.py --quick         # 40 replicates (20 holdout)
    python benchmarks/calibrate_stats.py --sweep         # also 1..repeats-1 repeats, same runs
    python benchmarks/calibrate_stats.py --k 10 --repeats 2 --seeds 2 --replicates 400
"""

from __future__ import annotations

import argparse
import time

import pandas as pd

from kdlib.calibration import CalibrationConfig, calibrate, summary
from kdlib.power import min_detectable_gain


def _print(table: pd.DataFrame) -> None:
    for _, r in table.iterrows():
        print(f"  {r['kind']:<15} {r['rate']:6.3f} +- {r['binomial_se']:.3f}  "
              f"(n={r['replicates']}, target {r['target'] or '-'})  {r['what']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicates", type=int, default=200)
    ap.add_argument("--holdout-replicates", type=int, default=None,
                    help="replicates of the holdout experiment (default: --replicates)")
    ap.add_argument("--quick", action="store_true", help="40 replicates (20 holdout)")
    ap.add_argument("--k", type=int, default=5, help="folds of the cv design")
    ap.add_argument("--repeats", type=int, default=4, help="repeats of the cv design")
    ap.add_argument("--seeds", type=int, default=1, help="seeds per split")
    ap.add_argument("--sweep", action="store_true",
                    help="also analyse the first 1..repeats-1 repeats of the same runs")
    ap.add_argument("--holdout-k", type=int, default=5)
    ap.add_argument("--holdout-repeats", type=int, default=2)
    ap.add_argument("--designs", default="cv,holdout", help="experiments to run: cv, holdout")
    ap.add_argument("--n-boot", type=int, default=100,
                    help="patient-bootstrap draws (holdout; the combined interval uses their SE)")
    ap.add_argument("--rope", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--csv", default=None, help="write the per-replicate outcomes here")
    args = ap.parse_args()
    reps = 40 if args.quick else args.replicates
    hreps = 20 if args.quick else (args.holdout_replicates or args.replicates)

    cfg = CalibrationConfig(k_folds=args.k, repeats=args.repeats, seeds=args.seeds,
                            replicates=reps, seed=args.seed)
    print(f"Calibration on scikit-learn digits as pseudo-patients (HGG:LGG {cfg.hgg_per_lgg:g}:1, "
          f"{cfg.images_per_patient[0]} healthy + {cfg.images_per_patient[1]} tumour images per "
          f"patient, training ratio {cfg.ratio:g}:1), softmax regression, metric f1_LGG, "
          f"alpha = 0.05, ROPE +-{args.rope:g}")
    designs = args.designs.split(",")
    start, cpu = time.perf_counter(), time.process_time()
    repeats = range(1, args.repeats + 1) if args.sweep else [args.repeats]
    cv = calibrate(cfg, args.rope, repeats, progress=True) if "cv" in designs else pd.DataFrame()
    cv_time = time.perf_counter() - start
    parts = [cv.assign(design="cv")]
    for r, part in cv.groupby("r") if len(cv) else []:
        sd = float((part["aa_sd"] ** 2).mean() ** 0.5)
        q = float(part["ttr"].mean())
        mdg = min_detectable_gain(sd, args.k, int(r), 1, test_train_ratio=q)
        print(f"\n== cv design: {args.k} folds x {r} repeats x {args.seeds} seed(s) = "
              f"{args.k * r * args.seeds} runs per arm, {len(part)} replicates; n_test/n_train "
              f"{q:.3f}; predicted minimum detectable gain (kdlib.power) {mdg:.3f} = "
              f"{mdg / sd:.2f} SD")
        _print(summary(part, None, args.rope))
    if "holdout" in designs:
        hcfg = CalibrationConfig(design="holdout", k_folds=args.holdout_k,
                                 repeats=args.holdout_repeats, seeds=args.seeds,
                                 replicates=hreps, n_boot=args.n_boot, seed=args.seed)
        h_start = time.perf_counter()
        ho = calibrate(hcfg, args.rope, progress=True)
        h_time = time.perf_counter() - h_start
        parts.append(ho.assign(design="holdout"))
        print(f"\n== holdout design: fixed test set (20 %), {args.holdout_k} folds x "
              f"{args.holdout_repeats} repeats x {args.seeds} seed(s), {len(ho)} replicates, "
              f"patient bootstrap {hcfg.n_boot} draws")
        _print(summary(None, ho, args.rope))
        print(f"\nholdout experiment: {h_time:.0f} s")
    print(f"cv experiment: {cv_time:.0f} s; total {time.perf_counter() - start:.0f} s wall clock, "
          f"{time.process_time() - cpu:.0f} s CPU (one process, one thread)")
    if args.csv:
        pd.concat(parts, ignore_index=True).to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
