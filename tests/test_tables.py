"""kdlib.tables: cell formats, LaTeX escaping, booktabs output with the best value in bold."""

import numpy as np
import pandas as pd
import pytest
from helpers_eval import synthetic_runs

from kdlib.errors import ConfigError
from kdlib.stats import summarize_runs
from kdlib.tables import (
    format_ci,
    format_mean_std,
    latex_escape,
    leading_number,
    mean_std_table,
    to_latex,
    write_table,
)


def test_formats():
    assert format_mean_std(0.61234, 0.0134) == "0.612 ± 0.013"
    assert format_mean_std(0.61234, np.nan) == "0.612"
    assert format_mean_std(np.nan, 0.1) == "–"
    assert format_ci(0.6123, 0.571, 0.6549) == "0.61 [0.57, 0.65]"
    assert format_ci(0.6123, np.nan, 0.7, digits=3) == "0.612"
    assert leading_number("0.612 ± 0.013") == pytest.approx(0.612)
    assert leading_number("-0.010 [-0.03, 0.01]") == pytest.approx(-0.01)
    assert np.isnan(leading_number("–")) and leading_number(3) == 3.0


def test_latex_escape():
    assert latex_escape("f1_LGG & 5% #1 {x}") == r"f1\_LGG \& 5\% \#1 \{x\}"
    assert latex_escape("0.61 ± 0.01") == r"0.61 $\pm$ 0.01"
    assert latex_escape("-0.03 [-0.05, -0.01] cnn-s") == "$-$0.03 [$-$0.05, $-$0.01] cnn-s"
    assert latex_escape("a~b^c\\") == r"a\textasciitilde{}b\textasciicircum{}c\textbackslash{}"


def test_write_table_csv_and_booktabs(tmp_path):
    df = pd.DataFrame({"method": ["ce", "kd_plus", "dkd"],
                       "f1_LGG": ["0.401 ± 0.020", "0.452 ± 0.031", "0.452 ± 0.010"],
                       "ece": [0.081, 0.052, 0.064], "n_runs": [3, 3, 3]})
    paths = write_table(df, "main_results", profile="demo", root=tmp_path,
                        bold_best={"f1_LGG": "max", "ece": "min"}, caption="LGG F1 & ECE")
    assert paths == {"csv": tmp_path / "demo" / "main_results.csv",
                     "tex": tmp_path / "demo" / "main_results.tex"}
    back = pd.read_csv(paths["csv"])
    pd.testing.assert_frame_equal(back, df)
    tex = paths["tex"].read_text()
    for part in (r"\toprule", r"\midrule", r"\bottomrule", r"\begin{tabular}{lrrr}",
                 r"\caption{LGG F1 \& ECE}", r"\label{tab:main_results}",
                 r"method & f1\_LGG & ece & n\_runs \\", r"kd\_plus"):
        assert part in tex
    assert tex.count(r"\textbf{0.452 $\pm$") == 2  # a tie: both bold
    assert r"\textbf{0.052}" in tex and r"\textbf{0.081}" not in tex
    assert tex.index(r"\toprule") < tex.index(r"\midrule") < tex.index(r"\bottomrule")


def test_mean_std_table_from_runs_and_index(tmp_path):
    s = summarize_runs(synthetic_runs(), ["macro_f1", "f1_LGG"])
    t = mean_std_table(s, ["macro_f1", "f1_LGG"])
    assert list(t.columns) == ["method", "macro_f1", "f1_LGG"] and "±" in t.loc[0, "f1_LGG"]
    paths = write_table(t.set_index("method"), "t2", root=tmp_path, bold_best={"f1_LGG": "max"})
    assert pd.read_csv(paths["csv"]).columns[0] == "method"
    tex = paths["tex"].read_text()
    best = t.loc[t["f1_LGG"].map(leading_number).idxmax(), "f1_LGG"]
    assert rf"\textbf{{{latex_escape(best)}}}" in tex


def test_nan_cells_and_bad_arguments(tmp_path):
    df = pd.DataFrame({"method": ["a", "b"], "auc": [0.7, np.nan]})
    tex = to_latex(df, bold_best={"auc": "max"})
    assert r"\textbf{0.700}" in tex and "--" in tex
    with pytest.raises(ConfigError, match="not in the table"):
        write_table(df, "x", root=tmp_path, bold_best={"f1": "max"})
    with pytest.raises(ConfigError, match="'max' or 'min'"):
        write_table(df, "x", root=tmp_path, bold_best={"auc": "best"})
    with pytest.raises(ConfigError, match="letters, digits"):
        write_table(df, "../x", root=tmp_path)
    with pytest.raises(ConfigError, match="nothing to write"):
        write_table(df.iloc[:0], "x", root=tmp_path)


def test_format_ci_column():
    from kdlib.tables import format_ci_column

    df = pd.DataFrame({"e": [0.5, 0.25], "lo": [0.4, float("nan")], "hi": [0.6, 0.3]})
    assert format_ci_column(df, "e", "lo", "hi", digits=2) == ["0.50 [0.40, 0.60]", "0.25"]
