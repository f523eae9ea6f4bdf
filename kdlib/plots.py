"""Thesis figures: one style, one colour per method everywhere, one function per figure kind.

Every figure function takes DataFrames/arrays, draws inside `kdlib.style.thesis_style()` and
returns the Figure; `kdlib.style.save_figure` writes it as vector PDF (TrueType fonts embedded)
and 300-dpi PNG.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from kdlib import CLASSES, MINORITY, MODALITIES
from kdlib.errors import DataError
from kdlib.metrics import arrays, check_predictions, confusion, reliability_table, slice_scores
from kdlib.style import CLASS_COLORS, OKABE_ITO, _styled, figsize, method_color, method_marker


def _need(df: pd.DataFrame, cols: Sequence[str], what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise DataError(f"{what}: column(s) {missing} missing; the table has {list(df.columns)}")


def _nonempty(df: pd.DataFrame, what: str, why: str = "the table has no rows") -> None:
    if df.empty:
        raise DataError(f"{what}: nothing to plot ({why})")


def _pretty(col: str) -> str:
    named = {"val_macro_f1": "macro-F1 (val)", f"val_f1_{MINORITY}": f"{MINORITY} F1 (val)",
             "macro_f1": "macro-F1", f"f1_{MINORITY}": f"{MINORITY} F1",
             f"recall_{MINORITY}": f"{MINORITY} recall", "balanced_accuracy": "balanced accuracy"}
    return named.get(col, col.replace("_", " "))


def _legend_below(fig: Figure, handles: list, labels: list[str] | None = None) -> None:
    if handles:
        ncols = min(len(handles), 5)
        fig.legend(handles=handles, labels=labels, loc="outside lower center", ncols=ncols)


def _first(df: pd.DataFrame, given: str | None, candidates: Sequence[str]) -> str:
    """The column to use: `given`, else the first candidate the table has (run tables from
    kdlib.results.load_runs call the student `model`, synthetic ones `student`)."""
    if given is not None:
        return given
    return next((c for c in candidates if c in df.columns), candidates[0])


def _runs(preds: pd.DataFrame | Mapping[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    if isinstance(preds, pd.DataFrame):
        return {"": check_predictions(preds)}
    return {str(k): check_predictions(v, f"predictions of {k}") for k, v in preds.items()}


@_styled
def plot_class_distribution(table: pd.DataFrame, split: str = "split", label: str = "label",
                            order: Sequence[str] | None = None, normalize: bool = False) -> Figure:
    """Slices per class in each split (train/val/test or folds) as grouped bars with counts."""
    _need(table, [split, label], "plot_class_distribution")
    counts = table.groupby([split, label]).size().unstack(fill_value=0)
    counts = counts.reindex(index=list(order or pd.unique(table[split])), columns=CLASSES,
                            fill_value=0)
    if normalize:
        counts = counts.div(counts.sum(axis=1), axis=0)
    fig, ax = plt.subplots(figsize=figsize(1.0, 0.42), layout="constrained")
    x, w = np.arange(len(counts)), 0.8 / len(CLASSES)
    for j, c in enumerate(CLASSES):
        bars = ax.bar(x + (j - 1) * w, counts[c], w, color=CLASS_COLORS[c], label=c)
        ax.bar_label(bars, fmt="{:.2f}" if normalize else "{:,.0f}", fontsize=6.5, padding=1)
    ax.set_xticks(x, [str(s) for s in counts.index])
    ax.set_ylabel("fraction of slices" if normalize else "slices")
    ax.margins(y=0.1)
    _legend_below(fig, *ax.get_legend_handles_labels())
    return fig


@_styled
def plot_example_slices(images: np.ndarray, masks: np.ndarray, labels: Sequence,
                        modalities: Sequence[str] = MODALITIES, n_per_class: int = 1) -> Figure:
    """Grid: one row per example slice of each class, one column per modality, tumour contours
    (whole tumour solid, enhancing tumour dashed). Picks the slices with the largest tumour."""
    images, masks = np.asarray(images, dtype=np.float32), np.asarray(masks)
    labels = np.array([CLASSES[v] if isinstance(v, (int, np.integer)) else str(v) for v in labels])
    if images.ndim != 4 or masks.shape != (images.shape[0], *images.shape[2:]) or \
            len(labels) != len(images) or images.shape[1] != len(modalities):
        raise DataError(f"plot_example_slices: need images (n, C, S, S), masks (n, S, S), n labels "
                        f"and C={len(modalities)} modality names; got {images.shape}, "
                        f"{masks.shape}, {len(labels)} labels")
    size = (masks > 0).sum(axis=(1, 2)) + (images != 0).any(axis=1).sum(axis=(1, 2)) * 1e-9
    picks = [(c, i) for c in CLASSES for i in np.argsort(-size * (labels == c))[:n_per_class]
             if labels[i] == c]
    if not picks:
        raise DataError("plot_example_slices: no slice with a class label in CLASSES")
    rows, cols = len(picks), len(modalities)
    fig, axes = plt.subplots(rows, cols, figsize=figsize(1.0, rows / cols * 1.02),
                             layout="constrained", squeeze=False)
    for r, (c, i) in enumerate(picks):
        for m in range(cols):
            ax, img = axes[r, m], images[i, m]
            lo, hi = np.percentile(img, [1, 99.5]) if img.any() else (0, 1)
            ax.imshow(img, cmap="gray", vmin=lo, vmax=max(hi, lo + 1e-6), interpolation="nearest")
            if (masks[i] > 0).any():
                ax.contour(masks[i] > 0, levels=[0.5], colors=OKABE_ITO[1], linewidths=0.8)
            if (masks[i] == 4).any():
                ax.contour(masks[i] == 4, levels=[0.5], colors=OKABE_ITO[2], linewidths=0.7,
                           linestyles="--")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.spines[:].set_visible(False)
            if r == 0:
                ax.set_title(modalities[m])
            if m == 0:
                ax.set_ylabel(c)
    _legend_below(fig, [Line2D([], [], color=OKABE_ITO[1], lw=1),
                        Line2D([], [], color=OKABE_ITO[2], lw=1, ls="--")],
                  ["whole tumour", "enhancing tumour"])
    return fig


@_styled
def plot_intensity_histograms(images: np.ndarray, labels: Sequence,
                              modalities: Sequence[str] = MODALITIES, bins: int = 60,
                              max_pixels: int = 200_000, seed: int = 0) -> Figure:
    """Density of brain-pixel intensities per modality (panel) and class (line). Pixels equal to
    the slice's corner value in that channel (background after skull stripping) are left out."""
    images = np.asarray(images, dtype=np.float32)
    labels = np.array([CLASSES[v] if isinstance(v, (int, np.integer)) else str(v) for v in labels])
    if images.ndim != 4 or images.shape[1] != len(modalities) or len(labels) != len(images):
        raise DataError(f"plot_intensity_histograms: need images (n, {len(modalities)}, S, S) and "
                        f"n labels; got {images.shape} and {len(labels)} labels")
    rng = np.random.default_rng(seed)
    ncols = 2 if len(modalities) == 4 else len(modalities)
    nrows = int(np.ceil(len(modalities) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=figsize(1.0, 0.3 * nrows + 0.12),
                             layout="constrained", squeeze=False)
    for m, ax in zip(range(len(modalities)), axes.flat):
        ch = images[:, m]
        brain = ch != ch[:, :1, :1]
        values = {}
        for c in CLASSES:
            v = ch[(labels == c)[:, None, None] & brain]
            values[c] = rng.choice(v, max_pixels, replace=False) if len(v) > max_pixels else v
        pooled = np.concatenate(list(values.values()))
        edges = np.linspace(*np.percentile(pooled, [0.5, 99.5]), bins + 1) if len(pooled) else bins
        for c, v in values.items():
            if len(v):
                ax.hist(v, bins=edges, density=True, histtype="step", color=CLASS_COLORS[c],
                        label=c, lw=1.1)
        ax.set_title(modalities[m])
        ax.set_yticks([])
        if m >= len(modalities) - ncols:
            ax.set_xlabel("normalised intensity")
    for ax in axes.flat[len(modalities):]:
        ax.set_visible(False)
    _legend_below(fig, [Line2D([], [], color=CLASS_COLORS[c]) for c in CLASSES], list(CLASSES))
    return fig


@_styled
def plot_learning_curves(history: pd.DataFrame, panels: Sequence | None = None,
                         hue: str = "method", run: str = "run_id", x: str = "epoch",
                         aggregate: bool = True) -> Figure:
    """Loss, val macro-F1 and val LGG F1 per epoch: one line per run, or (aggregate=True) the mean
    over the runs of each `hue` group (folds) with a +-1 std band. A panel may list several
    columns (e.g. train and val loss: solid, dashed)."""
    _need(history, [x], "plot_learning_curves")
    if panels is None:
        loss = [c for c in ("train_loss", "loss", "val_loss") if c in history.columns][:2]
        panels = [p for p in (loss, "val_macro_f1", f"val_f1_{MINORITY}") if p]
    panels = [[p] if isinstance(p, str) else list(p) for p in panels]
    _need(history, [c for p in panels for c in p], "plot_learning_curves")
    h = history.copy()
    if hue not in h.columns:
        h[hue] = "run"
    if run not in h.columns:
        h[run] = "run"
    fig, axes = plt.subplots(1, len(panels), figsize=figsize(1.0, 0.36), layout="constrained",
                             squeeze=False)
    styles = ("-", "--", ":", "-.")
    for ax, cols in zip(axes[0], panels):
        for j, col in enumerate(cols):
            for name, g in h.groupby(hue, sort=False):
                color = method_color(name)
                if aggregate:
                    s = g.groupby(x)[col].agg(["mean", "std"])
                    ax.plot(s.index, s["mean"], color=color, ls=styles[j % 4])
                    ax.fill_between(s.index, s["mean"] - s["std"].fillna(0),
                                    s["mean"] + s["std"].fillna(0), color=color, alpha=0.18, lw=0)
                else:
                    for _, r in g.groupby(run, sort=False):
                        ax.plot(r[x], r[col], color=color, ls=styles[j % 4], lw=0.8, alpha=0.8)
        ax.set_xlabel(x)
        ax.set_ylabel(_pretty(cols[0]) if len(cols) == 1 else
                      "loss" if all("loss" in c for c in cols) else ", ".join(map(_pretty, cols)))
    handles = [Line2D([], [], color=method_color(n), label=str(n)) for n in pd.unique(h[hue])]
    multi = max(map(len, panels))
    handles += [Line2D([], [], color="0.3", ls=styles[j], label=c.split("_")[0])
                for j, c in enumerate(next(p for p in panels if len(p) == multi))] if multi > 1 else []
    _legend_below(fig, handles)
    return fig


def _annotate_matrix(ax, values: np.ndarray, fmt: str) -> None:
    top = np.nanmax(values) if np.isfinite(values).any() else 1
    for (i, j), v in np.ndenumerate(values):
        ax.text(j, i, "–" if not np.isfinite(v) else fmt.format(v), ha="center", va="center",
                fontsize=8, color="white" if np.isfinite(v) and v > 0.55 * top else "black")


@_styled
def plot_confusion(pred: pd.DataFrame) -> Figure:
    """Confusion matrix as counts (left) and normalised by true class (right)."""
    cm = confusion(pred).to_numpy(float)
    norm = confusion(pred, "true").to_numpy(float)
    fig, axes = plt.subplots(1, 2, figsize=figsize(1.0, 0.44), layout="constrained")
    for ax, values, fmt, title in ((axes[0], cm, "{:,.0f}", "counts"),
                                   (axes[1], norm, "{:.2f}", "normalised by true class")):
        ax.imshow(values, cmap="Blues", vmin=0)
        _annotate_matrix(ax, values, fmt)
        ax.set_xticks(range(3), CLASSES)
        ax.set_yticks(range(3), CLASSES)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
        ax.spines[:].set_visible(False)
    return fig


@_styled
def plot_roc_pr(preds: pd.DataFrame | Mapping[str, pd.DataFrame],
                classes: Sequence[str] = CLASSES) -> Figure:
    """One-vs-rest ROC and precision-recall curves. One run: two panels, a curve per class with
    its AUC / AP. Several runs ({name: predictions}): a column per class, a curve per run."""
    runs = _runs(preds)
    single = len(runs) == 1 and "" in runs
    ncols = 1 if single else len(classes)
    fig, axes = plt.subplots(1 if single else 2, 2 if single else ncols, layout="constrained",
                             figsize=figsize(1.0, 0.44 if single else 0.62), squeeze=False)
    roc_axes, pr_axes = (axes[0, :1], axes[0, 1:]) if single else (axes[0], axes[1])
    from sklearn.metrics import precision_recall_curve, roc_curve  # 0.7 s: here, not at import

    for name, pred in runs.items():
        y, P = arrays(pred)
        sc = slice_scores(y, P)
        for k, c in enumerate(classes):
            i = CLASSES.index(c)
            if not (y == i).any() or (y == i).all():
                continue
            color = CLASS_COLORS[c] if single else method_color(name)
            fpr, tpr, _ = roc_curve(y == i, P[:, i])
            prec, rec, _ = precision_recall_curve(y == i, P[:, i])
            lab = f"{c} ({{}} {{:.2f}})" if single else name
            roc_axes[0 if single else k].plot(fpr, tpr, color=color,
                                              label=lab.format("AUC", sc[f"auc_{c}"]))
            pr_axes[0 if single else k].plot(rec, prec, color=color, drawstyle="steps-post",
                                             label=lab.format("AP", sc[f"ap_{c}"]))
    for k, (ra, pa) in enumerate(zip(roc_axes, pr_axes)):
        ra.plot([0, 1], [0, 1], color="0.7", lw=0.6, ls=":")
        ra.set(xlabel="false positive rate", xlim=(0, 1), ylim=(0, 1.02))
        pa.set(xlabel="recall", xlim=(0, 1), ylim=(0, 1.02))
        if k == 0:
            ra.set_ylabel("true positive rate")
            pa.set_ylabel("precision")
        else:
            ra.tick_params(labelleft=False)
            pa.tick_params(labelleft=False)
        if single:
            ra.legend(loc="lower right", fontsize=7)
            pa.legend(loc="lower left", fontsize=7)
        else:
            ra.set_title(classes[k])
    if not single:
        _legend_below(fig, [Line2D([], [], color=method_color(n)) for n in runs], list(runs))
    return fig


@_styled
def plot_reliability(preds: pd.DataFrame | Mapping[str, pd.DataFrame],
                     n_bins: int = 15) -> Figure:
    """Reliability diagrams: accuracy against confidence (max probability, left) and fraction of
    LGG slices against p_LGG (one-vs-rest, right), per run, ECE in the legend."""
    runs = _runs(preds)
    fig, axes = plt.subplots(1, 2, figsize=figsize(1.0, 0.5), layout="constrained")
    handles, labels = [], []
    for name, pred in runs.items():
        y, P = arrays(pred)
        sc = slice_scores(y, P, ranking=False)
        color = "#000000" if name == "" else method_color(name)
        marker = method_marker(name) if name else "o"
        for ax, cls in ((axes[0], None), (axes[1], MINORITY)):
            t = reliability_table(pred, cls, n_bins)
            t = t[t["count"] > 0]
            ax.plot(t["confidence"], t["accuracy"], marker=marker, color=color, ms=3.5)
        handles.append(Line2D([], [], color=color, marker=marker, ms=3.5))
        labels.append(f"{name}{': ' if name else ''}ECE {sc['ece']:.3f}, "
                      f"{MINORITY} ECE {sc[f'ece_{MINORITY}']:.3f}")
    for ax, xl, yl in ((axes[0], "confidence (max probability)", "accuracy"),
                       (axes[1], f"mean $p_{{\\mathrm{{{MINORITY}}}}}$",
                        f"fraction of {MINORITY} slices")):
        ax.plot([0, 1], [0, 1], color="0.6", lw=0.6, ls=":")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel=xl, ylabel=yl)
    fig.legend(handles, labels, loc="outside lower center", ncols=1 if len(runs) < 3 else 2,
               fontsize=7)
    return fig


@_styled
def plot_per_class_f1(table: pd.DataFrame, hue: str = "method", prefix: str = "f1_",
                      classes: Sequence[str] = CLASSES) -> Figure:
    """Per-class score of each method with its interval. `table` is long (hue, metric, estimate,
    low, high; e.g. bootstrap_metrics rows with a method column) or stats.summarize_runs output
    (hue, <prefix><c>_mean, <prefix><c>_std: bars are +-1 std)."""
    metrics = [f"{prefix}{c}" for c in classes]
    if "metric" in table.columns:
        _need(table, [hue, "estimate"], "plot_per_class_f1")
        long = table[table["metric"].isin(metrics)].copy()
        for c in ("low", "high"):
            long[c] = long[c] if c in long.columns else long["estimate"]
    else:
        _need(table, [hue, *[f"{m}_mean" for m in metrics]], "plot_per_class_f1")
        long = pd.concat([pd.DataFrame({hue: table[hue], "metric": m, "estimate": table[f"{m}_mean"],
                                        "low": table[f"{m}_mean"] - table[f"{m}_std"].fillna(0),
                                        "high": table[f"{m}_mean"] + table[f"{m}_std"].fillna(0)})
                          for m in metrics])
    _nonempty(long, "plot_per_class_f1", f"no row of the metrics {metrics}")
    names = list(pd.unique(long[hue]))
    fig, ax = plt.subplots(figsize=figsize(1.0, 0.42), layout="constrained")
    w = 0.7 / max(len(names), 1)
    for j, name in enumerate(names):
        g = long[long[hue] == name].set_index("metric").reindex(metrics)
        xs = np.arange(len(metrics)) + (j - (len(names) - 1) / 2) * w
        ax.errorbar(xs, g["estimate"], yerr=[g["estimate"] - g["low"], g["high"] - g["estimate"]],
                    fmt=method_marker(name), color=method_color(name), capsize=2, lw=1, label=name)
    ax.set_xticks(range(len(metrics)), list(classes))
    ax.set_ylabel(f"{prefix.strip('_').replace('f1', 'F1')}")
    ax.grid(axis="y")
    _legend_below(fig, *ax.get_legend_handles_labels())
    return fig


@_styled
def plot_gain_vs_ratio(gains: pd.DataFrame, hue: str = "method", x: str = "ratio",
                       y: str = "mean_diff", low: str = "ci_low", high: str = "ci_high") -> Figure:
    """Gain over the baseline against the training imbalance ratio (log2 axis), with CIs; input:
    compare_to_baseline(..., by=("method", "ratio"), pair_on=(..., "ratio"))."""
    _need(gains, [hue, x, y, low, high], "plot_gain_vs_ratio")
    _nonempty(gains, "plot_gain_vs_ratio")
    g = gains[np.isfinite(gains[x].astype(float))]
    if len(g) < len(gains):
        warnings.warn(f"plot_gain_vs_ratio: {len(gains) - len(g)} row(s) without a numeric {x} "
                      "(natural ratio?) are not drawn", stacklevel=3)
    _nonempty(g, "plot_gain_vs_ratio", f"no row with a numeric {x}")
    names = list(pd.unique(g[hue]))
    fig, ax = plt.subplots(figsize=figsize(1.0, 0.5), layout="constrained")
    ax.axhline(0, color="0.5", lw=0.6, ls="--")
    for j, name in enumerate(names):
        d = g[g[hue] == name].sort_values(x)
        xs = d[x].astype(float) * 2 ** (0.1 * (j - (len(names) - 1) / 2))
        ax.errorbar(xs, d[y], yerr=[d[y] - d[low], d[high] - d[y]], color=method_color(name),
                    fmt=f"-{method_marker(name)}", capsize=2, lw=1, label=name)
    ratios = sorted(g[x].astype(float).unique())
    ax.set_xscale("log", base=2)
    ax.set_xticks(ratios, [f"{r:g}:1" for r in ratios])
    ax.minorticks_off()
    metric = _pretty(str(gains["metric"].iloc[0])) if "metric" in gains.columns else y
    ax.set(xlabel="training imbalance (HGG : LGG subjects)", ylabel=f"$\\Delta$ {metric}")
    _legend_below(fig, *ax.get_legend_handles_labels())
    return fig


@_styled
def plot_gain_heatmap(gains: pd.DataFrame, row: str | None = None, col: str | None = None,
                      value: str = "mean_diff", p: str | None = "p_holm", alpha: float = 0.05,
                      row_order: Sequence | None = None, col_order: Sequence | None = None) -> Figure:
    """Teacher x student grid of the gain over the student's baseline (diverging colours around
    0); cells show the gain, the CI when ci_low/ci_high are present, and * when p < alpha.
    row/col default to teacher/student or teacher_model/model, whichever the table has."""
    row = _first(gains, row, ("teacher", "teacher_model"))
    col = _first(gains, col, ("student", "model"))
    _need(gains, [row, col, value], "plot_gain_heatmap")
    _nonempty(gains, "plot_gain_heatmap")
    if gains.duplicated([row, col]).any():
        raise DataError(f"plot_gain_heatmap: several rows per ({row}, {col}) cell; filter first "
                        "(one metric, one ratio)")

    def order(c, given):
        if given is not None:
            return list(given)
        if f"{c}_params" in gains.columns:
            return list(gains.sort_values(f"{c}_params")[c].unique())
        return sorted(gains[c].unique(), key=str)

    rows, cols = order(row, row_order), order(col, col_order)
    grid = gains.set_index([row, col])
    v = grid[value].unstack().reindex(index=rows, columns=cols).to_numpy(float)
    lim = np.nanmax(np.abs(v)) if np.isfinite(v).any() else 1.0
    fig, ax = plt.subplots(figsize=figsize(1.0, min(0.18 + 0.11 * len(rows), 0.9)),
                           layout="constrained")
    im = ax.imshow(v, cmap="PuOr", vmin=-lim, vmax=lim, aspect="auto")
    for (i, j), val in np.ndenumerate(v):
        if not np.isfinite(val):
            continue
        r = grid.loc[(rows[i], cols[j])]
        text = f"{val:+.3f}".replace("-", "\u2212")
        if p and p in grid.columns and r[p] < alpha:
            text += "*"
        if {"ci_low", "ci_high"} <= set(grid.columns):
            text += f"\n[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]".replace("-", "\u2212")
        ax.text(j, i, text, ha="center", va="center", fontsize=6.5,
                color="white" if abs(val) > 0.6 * lim else "black")
    ax.set_xticks(range(len(cols)), [str(c) for c in cols])
    ax.set_yticks(range(len(rows)), [str(r) for r in rows])
    ax.set(xlabel=col, ylabel=row)
    ax.spines[:].set_visible(False)
    metric = _pretty(str(gains["metric"].iloc[0])) if "metric" in gains.columns else value
    fig.colorbar(im, ax=ax, label=f"$\\Delta$ {metric}", shrink=0.9)
    return fig


def _count(n: float) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k" if n >= 1e3 else f"{n:.0f}"


@_styled
def plot_metric_vs_params(runs: pd.DataFrame, metric: str = f"f1_{MINORITY}",
                          params: str | None = None, hue: str = "method",
                          label: str | None = None) -> Figure:
    """Mean +- std (over folds/seeds) of a metric against the parameter count (log axis), one line
    per method; x ticks name the models. params/label default to student_params/student or
    params/model, whichever the run table has."""
    params = _first(runs, params, ("student_params", "params"))
    label = _first(runs, label, ("student", "model"))
    _need(runs, [metric, params, hue], "plot_metric_vs_params")
    _nonempty(runs, "plot_metric_vs_params")
    keys = [hue, params] + ([label] if label and label in runs.columns else [])
    s = runs.groupby(keys, dropna=False)[metric].agg(["mean", "std"]).reset_index()
    names = list(pd.unique(runs[hue]))
    fig, ax = plt.subplots(figsize=figsize(1.0, 0.5), layout="constrained")
    for j, name in enumerate(names):
        d = s[s[hue] == name].sort_values(params)
        xs = d[params].astype(float) * 10 ** (0.015 * (j - (len(names) - 1) / 2))
        ax.errorbar(xs, d["mean"], yerr=d["std"].fillna(0), color=method_color(name),
                    fmt=f"-{method_marker(name)}", capsize=2, lw=1, label=name)
    ax.set_xscale("log")
    ticks = s.drop_duplicates(params).sort_values(params)
    ax.set_xticks(ticks[params].astype(float),
                  [f"{t[label]}\n{_count(t[params])}" if len(keys) == 3 else _count(t[params])
                   for _, t in ticks.iterrows()])
    ax.minorticks_off()
    ax.set(xlabel="parameters (log scale)", ylabel=_pretty(metric))
    ax.grid(axis="y")
    _legend_below(fig, *ax.get_legend_handles_labels())
    return fig
