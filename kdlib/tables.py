"""Result tables: CSV for the record, LaTeX booktabs for the thesis (pandas Styler.to_latex)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from kdlib.errors import ConfigError
from kdlib.style import check_name

_NUMBER = re.compile(r"^\s*([-+\u2212]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)")
_NEGATIVE = re.compile(r"(?<![\w.])-(?=\d)")  # a minus sign, not a hyphen: "-0.04" -> "$-$0.04"
_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                  "^": r"\textasciicircum{}", "\u00b1": r"$\pm$", "\u2212": "$-$",
                  "\u00d7": r"$\times$", "\u2013": "--", "<": r"\textless{}", ">": r"\textgreater{}"}


def _fmt(x: float, digits: int) -> str:
    return "–" if x is None or not math.isfinite(float(x)) else f"{float(x):.{digits}f}"


def format_mean_std(mean: float, std: float, digits: int = 3) -> str:
    """'0.612 ± 0.013'; a NaN std (one run) gives just the mean, a NaN mean gives '–'."""
    if mean is None or not math.isfinite(float(mean)):
        return "–"
    if std is None or not math.isfinite(float(std)):
        return _fmt(mean, digits)
    return f"{_fmt(mean, digits)} ± {_fmt(std, digits)}"


def format_ci(estimate: float, low: float, high: float, digits: int = 2) -> str:
    """'0.61 [0.57, 0.65]'; a NaN interval gives just the estimate."""
    if estimate is None or not math.isfinite(float(estimate)):
        return "–"
    if not (math.isfinite(float(low)) and math.isfinite(float(high))):
        return _fmt(estimate, digits)
    return f"{_fmt(estimate, digits)} [{_fmt(low, digits)}, {_fmt(high, digits)}]"


def format_ci_column(df: pd.DataFrame, estimate: str, low: str, high: str, digits: int = 3
                     ) -> list[str]:
    """format_ci of every row of `df` (column names of the estimate and its interval)."""
    return [format_ci(e, lo, hi, digits) for e, lo, hi in zip(df[estimate], df[low], df[high])]


def mean_std_table(summary: pd.DataFrame, metrics: Sequence[str], by: Sequence[str] = ("method",),
                   digits: int = 3) -> pd.DataFrame:
    """Format the output of stats.summarize_runs: one 'mean ± std' column per metric."""
    out = summary.loc[:, list(by)].copy()
    for m in metrics:
        out[m] = [format_mean_std(a, b, digits)
                  for a, b in zip(summary[f"{m}_mean"], summary[f"{m}_std"])]
    return out


def latex_escape(text: str) -> str:
    """Escape LaTeX special characters (_ & % $ # { } ~ ^ \\), turn ± − × into math and the
    minus of a negative number into $-$."""
    text = "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))
    return _NEGATIVE.sub("$-$", text)


def leading_number(cell) -> float:
    """The value a cell is ranked by: the number itself, or the first number of a formatted cell."""
    if isinstance(cell, (int, float, np.integer, np.floating)) and not isinstance(cell, bool):
        return float(cell)
    match = _NUMBER.match(str(cell))
    return float(match.group(1).replace("\u2212", "-")) if match else np.nan


def _best_rows(df: pd.DataFrame, bold_best: Mapping[str, str]) -> dict[str, set[int]]:
    best: dict[str, set[int]] = {}
    for col, how in bold_best.items():
        if col not in df.columns:
            raise ConfigError(f"bold_best names column {col!r}, not in the table {list(df.columns)}")
        if how not in ("max", "min"):
            raise ConfigError(f"bold_best[{col!r}]={how!r} is not valid; choose 'max' or 'min'")
        values = np.array([leading_number(v) for v in df[col]], dtype=float)
        if np.isfinite(values).any():
            target = np.nanmax(values) if how == "max" else np.nanmin(values)
            best[col] = set(np.flatnonzero(np.isclose(values, target, rtol=0, atol=1e-12)))
    return best


def _numeric_like(col: pd.Series) -> bool:
    if pd.api.types.is_numeric_dtype(col):
        return True
    cells = [v for v in col if _cell(v, 3) != "–"]
    return bool(cells) and all(math.isfinite(leading_number(v)) for v in cells)


def _cell(value, digits: int) -> str:
    if isinstance(value, (float, np.floating)):
        return _fmt(value, digits)
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return "–"
    return str(value)


def to_latex(df: pd.DataFrame, bold_best: Mapping[str, str] | None = None,
             caption: str | None = None, label: str | None = None, digits: int = 3) -> str:
    """A booktabs table (\\toprule, \\midrule, \\bottomrule) inside a table float, written by
    pandas' Styler.to_latex; text cells are escaped, the best value of each bold_best column is
    set in bold (ties all bold)."""
    best = _best_rows(df, bold_best or {})
    align = "".join("r" if _numeric_like(df[c]) else "l" for c in df.columns)
    styler = (df.style.hide(axis="index")
              .format(lambda value: latex_escape(_cell(value, digits)))
              .format_index(latex_escape, axis="columns"))
    for col, rows in best.items():
        styler = styler.apply(lambda c, rows=rows: ["textbf:--rwrap;" if i in rows else ""
                                                    for i in range(len(c))], subset=[col])
    return styler.to_latex(column_format=align, position="tbp", position_float="centering",
                           hrules=True, label=label,
                           caption=latex_escape(caption) if caption else None)


def write_table(df: pd.DataFrame, name: str, profile: str = "default", root: str | Path = "figures",
                bold_best: Mapping[str, str] | None = None, caption: str | None = None,
                label: str | None = None, digits: int = 3) -> dict[str, Path]:
    """Write `df` as <root>/<profile>/<name>.csv and .tex (booktabs); return {"csv": .., "tex": ..}.

    A named index (e.g. after groupby) becomes the first column(s). `label` defaults to tab:<name>.
    """
    check_name("table name", name)
    check_name("table profile", profile)
    if not isinstance(df, pd.DataFrame) or df.empty:
        raise ConfigError(f"table {name!r}: nothing to write (empty or not a DataFrame)")
    if not isinstance(df.index, pd.RangeIndex) or any(n is not None for n in df.index.names):
        df = df.reset_index()
    df = df.rename(columns=str)
    out_dir = Path(root) / profile
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / f"{name}.csv", "tex": out_dir / f"{name}.tex"}
    df.to_csv(paths["csv"], index=False)
    tex = to_latex(df, bold_best, caption, label or f"tab:{name}", digits)
    paths["tex"].write_text(tex, encoding="utf-8")
    return paths
