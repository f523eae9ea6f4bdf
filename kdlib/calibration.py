"""Calibration of the comparison statistics on real data: A/A and power experiments.

The data set is scikit-learn's handwritten digits (Alpaydin & Kaynak 1998; 1,797 real 8x8 images)
mapped onto the workbook's task: pseudo-patients of a few images each, with a grade HGG or LGG
(LGG the minority, HGG:LGG about 4:1 as in BraTS2020); a patient's images are labelled `healthy`
(digits 0, 1, 2, 4, 6) or its grade (HGG: digits 3, 5, 7; LGG: 8, 9). Every replicate regroups the
images into new patients, draws new partitions with kdlib's own make_splits / fold_subjects and
trains with new seeds; the runs then go through the workbook's own comparison functions.

The model is a softmax regression trained by minibatch SGD as the workbook trains its CNNs: the
seed sets the initial weights and the batch order, the same seed in every split (as TrainConfig's
seed), and the epoch with the best validation macro-F1 is kept. An A/A pair differs only by seed;
the real method is post-hoc logit adjustment (Menon et al., ICLR 2021) of the same model against
the plain model, as the workbook's `ce+posthoc` against `ce`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats as sps
from sklearn.datasets import load_digits
from tqdm.auto import tqdm

from kdlib import CLASSES, MINORITY
from kdlib.comparisons import (
    bayes_correlated_ttest,
    holdout_interval,
    repeated_cv_ttest,
    split_differences,
)
from kdlib.data.splits import SplitConfig, fold_subjects, make_splits
from kdlib.errors import ConfigError
from kdlib.metrics import PROB_COLUMNS, slice_scores
from kdlib.stats import bootstrap_difference, bootstrap_fold_mean

DIGITS = {"healthy": (0, 1, 2, 4, 6), "HGG": (3, 5, 7), "LGG": (8, 9)}
METRIC = f"f1_{MINORITY}"
GUARD = "macro_f1"


@dataclass(frozen=True)
class CalibrationConfig:
    """One calibration experiment: design (cv: k_folds x repeats; holdout: a fixed test set and
    k_folds x repeats re-drawn folds), seeds per split, replicates, the patients and the model."""

    design: str = "cv"
    k_folds: int = 5
    repeats: int = 2
    seeds: int = 1
    replicates: int = 200
    images_per_patient: tuple[int, int] = (4, 4)  # healthy, tumour
    hgg_per_lgg: float = 2.0
    ratio: float | None = 8.0
    epochs: int = 5
    lr: float = 0.3
    batch: int = 32
    init_sd: float = 0.3
    n_boot: int = 200
    seed: int = 0

    def __post_init__(self) -> None:
        if self.design not in ("cv", "holdout"):
            raise ConfigError(f"design={self.design!r} is not valid; choose 'cv' or 'holdout'")
        for name in ("k_folds", "repeats", "seeds", "replicates", "epochs", "batch", "n_boot"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}={v!r} must be an integer >= 1")


def pseudo_patients(rng: np.random.Generator, images_per_patient: tuple[int, int] = (4, 4),
                    hgg_per_lgg: float = 2.0) -> tuple[np.ndarray, pd.DataFrame]:
    """Digits regrouped into pseudo-patients: x (n, 64) in [0, 1] and a slice table subject_id,
    slice, label, grade (one row per image). Every HGG-digit image is used; LGG patients are
    len(HGG patients) / hgg_per_lgg, so LGG is the minority grade."""
    x_all, digit = load_digits(return_X_y=True)
    pools = {c: rng.permutation(np.flatnonzero(np.isin(digit, d))) for c, d in DIGITS.items()}
    n_h, n_t = images_per_patient
    n_hgg = min(len(pools["HGG"]) // n_t,
                int(len(pools["healthy"]) // n_h / (1 + 1 / hgg_per_lgg)))
    n_lgg = min(len(pools["LGG"]) // n_t, max(2, round(n_hgg / hgg_per_lgg)))
    grades = ["HGG"] * n_hgg + ["LGG"] * n_lgg
    if len(grades) * n_h > len(pools["healthy"]):
        raise ConfigError(f"{len(grades)} patients x {n_h} healthy images exceed the "
                          f"{len(pools['healthy'])} healthy digits; use fewer images per patient")
    order = rng.permutation(len(grades))
    rows, idx, used = [], [], {"healthy": 0, "HGG": 0, "LGG": 0}
    for p in order:
        g, sid = grades[p], f"P{p:03d}"
        for label, n in (("healthy", n_h), (g, n_t)):
            take = pools[label][used[label]:used[label] + n]
            used[label] += n
            idx.extend(take)
            rows.extend((sid, len(rows), label, g) for _ in take)
    table = pd.DataFrame(rows, columns=["subject_id", "slice", "label", "grade"])
    return x_all[np.array(idx)] / 16.0, table


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _macro_f1(y: np.ndarray, yhat: np.ndarray) -> float:
    k = len(CLASSES)
    cm = np.bincount(y * k + yhat, minlength=k * k).reshape(k, k)
    return float(np.mean(2 * np.diag(cm) / np.maximum(cm.sum(axis=0) + cm.sum(axis=1), 1)))


def train_softmax(x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, seed: int,
                  epochs: int = 5, lr: float = 0.3, batch: int = 32, init_sd: float = 0.3
                  ) -> np.ndarray:
    """Softmax regression by minibatch SGD: the seed draws the initial weights and the batch
    order; returns the weights (65, 3) of the epoch with the best validation macro-F1."""
    rng = np.random.default_rng(seed)
    xb, xv = np.c_[x, np.ones(len(x))], np.c_[x_val, np.ones(len(x_val))]
    w = rng.normal(0.0, init_sd, (xb.shape[1], len(CLASSES)))
    best, best_w = -np.inf, w
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for start in range(0, len(y), batch):
            i = order[start:start + batch]
            g = _softmax(xb[i] @ w)
            g[np.arange(len(i)), y[i]] -= 1.0
            w = w - lr * xb[i].T @ g / len(i)
        score = _macro_f1(y_val, (xv @ w).argmax(axis=1))
        if score > best:
            best, best_w = score, w.copy()
    return best_w


def _logits(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.c_[x, np.ones(len(x))] @ w


def _arms(cfg: CalibrationConfig, rep: int) -> dict[str, list[int]]:
    """Seeds of the two A/A arms in this replicate: fresh per replicate, the same in every split."""
    base = 2 * cfg.seeds * rep + 1_000_003 * cfg.seed
    return {"A": [base + 2 * j for j in range(cfg.seeds)],
            "B": [base + 2 * j + 1 for j in range(cfg.seeds)]}


def _predictions(table: pd.DataFrame, p: np.ndarray) -> pd.DataFrame:
    return table[["subject_id", "slice", "label"]].assign(
        **{c: p[:, i] for i, c in enumerate(PROB_COLUMNS)}).reset_index(drop=True)


def replicate_runs(cfg: CalibrationConfig, rep: int) -> tuple[pd.DataFrame, dict]:
    """Train one replicate: a run table (method A, B and A+LA, repeat, fold, ratio, seed, metrics,
    n_test_slices, n_train_slices) and, for the holdout design, each run's test predictions."""
    rng = np.random.default_rng([cfg.seed, rep])
    x, table = pseudo_patients(rng, cfg.images_per_patient, cfg.hgg_per_lgg)
    y = table["label"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    subjects = table[["subject_id", "grade"]].drop_duplicates()
    splits = make_splits(subjects, SplitConfig(design=cfg.design, k_folds=cfg.k_folds,
                                               repeats=cfg.repeats, seed=int(rng.integers(2**31))))
    rows, preds = [], {}
    for repeat in range(cfg.repeats):
        for fold in range(cfg.k_folds):
            for j in range(cfg.seeds):
                # seed index j draws the LGG subsample, shared by both arms as in the workbook
                sets = fold_subjects(splits, fold, cfg.ratio, j, repeat)
                tr, va, te = (table["subject_id"].isin(sets[s]).to_numpy()
                              for s in ("train", "val", "test"))
                log_prior = np.log(np.bincount(y[tr], minlength=len(CLASSES)) / tr.sum())
                for arm, seeds in _arms(cfg, rep).items():
                    seed = seeds[j]
                    w = train_softmax(x[tr], y[tr], x[va], y[va], seed, cfg.epochs, cfg.lr,
                                      cfg.batch, cfg.init_sd)
                    z = _logits(w, x[te])
                    for method, p in ((arm, _softmax(z)), (f"{arm}+LA", _softmax(z - log_prior))):
                        if method == "B+LA":
                            continue
                        m = slice_scores(y[te], p, ranking=False)
                        rows.append({"method": method, "repeat": repeat, "fold": fold,
                                     "ratio": cfg.ratio, "seed": j, METRIC: m[METRIC],
                                     GUARD: m[GUARD],
                                     "balanced_accuracy": m["balanced_accuracy"],
                                     "n_test_slices": int(te.sum()),
                                     "n_train_slices": int(tr.sum())})
                        if cfg.design == "holdout":
                            preds[(method, repeat, fold, j)] = _predictions(table[te], p)
    return pd.DataFrame(rows), preds


def _cv_outcomes(runs: pd.DataFrame, rope: float) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, (method, base) in {"aa": ("A", "B"), "la": ("A+LA", "A")}.items():
        d = split_differences(runs, method, base, METRIC)
        ttr = float(d["test_train_ratio"].mean())
        tt = repeated_cv_ttest(d["diff"], ttr)
        by = bayes_correlated_ttest(d["diff"], ttr, rope)
        out.update({f"{name}_mean": tt["mean"], f"{name}_sd": tt["sd"], f"{name}_se": tt["se"],
                    f"{name}_df": tt["df"], f"{name}_p": tt["p"], f"{name}_ci_low": tt["ci_low"],
                    f"{name}_ci_high": tt["ci_high"], f"{name}_scale": by["scale"],
                    f"{name}_p_better": by["p_better"], f"{name}_p_worse": by["p_worse"],
                    f"{name}_p_rope": by["p_rope"], f"{name}_n": tt["n"], "ttr": ttr})
    return out


def _holdout_outcomes(runs: pd.DataFrame, preds: dict, cfg: CalibrationConfig, rep: int
                      ) -> dict[str, float]:
    """A/A on a fixed test set: the combined interval, the patient bootstrap of the split-mean
    gain, and the bootstrap's own check on two halves of the test set."""
    d = split_differences(runs, "A", "B", METRIC)
    keys = sorted(k[1:] for k in preds if k[0] == "A")
    a, b = [preds[("A", *k)] for k in keys], [preds[("B", *k)] for k in keys]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        boot = bootstrap_fold_mean(a, b, [METRIC], n_boot=cfg.n_boot, seed=rep).iloc[0]
        h = holdout_interval(d["diff"], float(boot["se"]), float(d["test_train_ratio"].mean()))
        plain = holdout_interval(d["diff"], float(boot["se"]), None)
        # what the patient bootstrap measures: test-set sampling of one fixed pair of models.
        # Two disjoint halves of the test set are two independent test sets for that pair.
        subjects = np.array(sorted(a[0]["subject_id"].unique()))
        half = set(np.random.default_rng([cfg.seed, rep, 1]).permutation(subjects)[
            : len(subjects) // 2])
        z = []
        for part in (a[0]["subject_id"].isin(half), ~a[0]["subject_id"].isin(half)):
            r = bootstrap_difference(a[0][part], b[0][part.to_numpy()], [METRIC],
                                     n_boot=cfg.n_boot, seed=rep).iloc[0]
            z.append((r["estimate"], r["se"]))
    return {"aa_mean": h["mean"], "aa_se": h["se"], "aa_df": h["df"], "aa_p": h["p"],
            "plain_se": plain["se"], "plain_df": plain["df"], "plain_p": plain["p"],
            "aa_sd": float(d["diff"].std(ddof=1)), "aa_n": len(d),
            "boot_low": float(boot["low"]), "boot_high": float(boot["high"]),
            "boot_se": float(boot["se"]),
            "half_z": (z[0][0] - z[1][0]) / np.sqrt(z[0][1] ** 2 + z[1][1] ** 2)}


def calibrate(cfg: CalibrationConfig, rope: float = 0.02, repeats: Sequence[int] | None = None,
              progress: bool = False) -> pd.DataFrame:
    """Run cfg.replicates replicates; one row per replicate and number of repeats analysed (`r`:
    the first r repeats of the same runs, default cfg.repeats only) with the A/A and (cv) the
    logit-adjustment outcomes: mean, sd, se, df, p, interval, Bayesian probabilities."""
    repeats = [cfg.repeats] if repeats is None else sorted(repeats)
    if not repeats or repeats[0] < 1 or repeats[-1] > cfg.repeats:
        raise ConfigError(f"repeats={repeats!r} must lie in 1..{cfg.repeats} (cfg.repeats)")
    rows = []
    for rep in tqdm(range(cfg.replicates), disable=not progress, desc=f"{cfg.design} replicates"):
        runs, preds = replicate_runs(cfg, rep)
        for r in repeats:
            part = runs[runs["repeat"] < r]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = _cv_outcomes(part, rope) if cfg.design == "cv" else _holdout_outcomes(
                    part, {k: v for k, v in preds.items() if k[1] < r}, cfg, rep)
            rows.append({"replicate": rep, "k": cfg.k_folds, "r": r, "s": cfg.seeds, **out})
    return pd.DataFrame(rows)


def _rate(hits: np.ndarray) -> tuple[float, float, int]:
    hits = np.asarray(hits, dtype=float)
    hits = hits[np.isfinite(hits)]
    n = len(hits)
    p = float(hits.mean()) if n else np.nan
    return p, float(np.sqrt(p * (1 - p) / n)) if n else np.nan, n


def _t_reject(mean: pd.Series, se: pd.Series, df: pd.Series, alpha: float) -> np.ndarray:
    return (np.abs(mean) / se > sps.t.ppf(1 - alpha / 2, df)).to_numpy(float)


def summary(cv: pd.DataFrame | None, holdout: pd.DataFrame | None, rope: float = 0.02,
            alpha: float = 0.05, decision: float = 0.95) -> pd.DataFrame:
    """Rejection rates with binomial SEs: under the null (A/A) and under alternatives (the real
    logit-adjustment gain; the A/A differences shifted by 2 SD; the ROPE boundary)."""
    rows = []

    def add(kind, what, hits, target):
        p, se, n = _rate(hits)
        rows.append({"kind": kind, "what": what, "rate": p, "binomial_se": se,
                     "replicates": n, "target": target})

    if cv is not None and len(cv):
        sd = float(np.sqrt(np.mean(cv["aa_sd"] ** 2)))
        mean_la = float(cv["la_mean"].mean())
        t_crit = sps.t.ppf(1 - alpha / 2, cv["aa_df"])
        add("false positive", "corrected repeated k-fold t-test, p < alpha",
            (cv["aa_p"] < alpha).astype(float), "0.025-0.075")
        add("false positive", "effect-size interval (corrected t) excludes 0",
            ((cv["aa_ci_low"] > 0) | (cv["aa_ci_high"] < 0)).astype(float), "0.025-0.075")
        add("false positive", "uncorrected t-test over the k x r splits (for contrast)",
            (np.abs(cv["aa_mean"]) / (cv["aa_sd"] / np.sqrt(cv["aa_n"])) > t_crit).astype(float),
            "none (shows why the correction is needed)")
        boundary = sps.t.sf(rope, cv["aa_df"], cv["aa_mean"] + rope, cv["aa_scale"])
        add("false positive", f"Bayesian: P(better) > {decision} at a true gain of +ROPE "
            f"({rope:g}, the boundary of 'better')", (boundary > decision).astype(float),
            "0.025-0.075")
        add("false positive", f"Bayesian: P(better) or P(worse) > {decision} at a true gain of 0",
            ((cv["aa_p_better"] > decision) | (cv["aa_p_worse"] > decision)).astype(float),
            "<= 0.05 (0 lies inside the ROPE)")
        add("power", f"corrected t at a gain of 2 SD ({2 * sd:.3f}; per-split A/A SD {sd:.3f})",
            _t_reject(cv["aa_mean"] + 2 * sd, cv["aa_se"], cv["aa_df"], alpha), ">= 0.80")
        add("power", f"corrected t, logit adjustment vs plain (mean gain {mean_la:+.3f} = "
            f"{mean_la / sd:.1f} SD)", (cv["la_p"] < alpha).astype(float), "")
        add("coverage miss", "effect-size interval misses the mean logit-adjustment gain "
            f"({mean_la:+.3f}, over all replicates)",
            ((cv["la_ci_low"] > mean_la) | (cv["la_ci_high"] < mean_la)).astype(float),
            "about 0.05")
    if holdout is not None and len(holdout):
        add("false positive", "holdout: combined interval (bootstrap + corrected training "
            "variance) excludes 0", (holdout["aa_p"] < alpha).astype(float), "0.025-0.075")
        add("false positive", "holdout: combined interval with the splits taken as independent "
            "(s^2/n) excludes 0", (holdout["plain_p"] < alpha).astype(float),
            "none (shows why the correction is needed)")
        add("false positive", "holdout: patient-bootstrap interval alone excludes 0 (not an "
            "interval of the method's gain)",
            ((holdout["boot_low"] > 0) | (holdout["boot_high"] < 0)).astype(float),
            "none (it does not carry training variance)")
        add("false positive", "patient bootstrap, what it measures: two independent halves of "
            "the test set differ beyond 1.96 combined SE (one fixed pair of models)",
            (np.abs(holdout["half_z"]) > sps.norm.ppf(1 - alpha / 2)).astype(float),
            "0.025-0.075")
        hsd = float(np.sqrt(np.mean(holdout["aa_sd"] ** 2)))
        add("power", f"holdout combined interval at a gain of 2 SD ({2 * hsd:.3f})",
            _t_reject(holdout["aa_mean"] + 2 * hsd, holdout["aa_se"], holdout["aa_df"], alpha),
            "")
    return pd.DataFrame(rows)
