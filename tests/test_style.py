"""kdlib.style: the sizes, the rcParams, the method colours and markers are fixed; figure names
are checked."""

import hashlib

import matplotlib
import matplotlib.pyplot as plt
import pandas as pd
import pytest

from kdlib import style as S
from kdlib.errors import ConfigError

matplotlib.use("Agg")


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_figsize_and_style():
    assert S.figsize() == pytest.approx((5.787, 5.787 * 0.62), abs=1e-3)
    assert S.figsize(0.5, 1.0, textwidth_pt=72.27) == (0.5, 0.5)
    before = dict(matplotlib.rcParams)
    with S.thesis_style():
        assert matplotlib.rcParams["pdf.fonttype"] == 42
        assert matplotlib.rcParams["font.family"][0] == "STIXGeneral"
    assert matplotlib.rcParams["font.family"] == before["font.family"]


def test_method_colours_are_fixed_and_stable():
    assert S.method_color("ce") == "#000000" and S.method_color("kd") == S.METHOD_COLORS["kd"]
    expected = S.TOL_MUTED[int(hashlib.md5(b"my_new_method").hexdigest(), 16) % 9]
    assert S.method_color("my_new_method") == expected == S.method_color("my_new_method")
    # every method has its own colour; "baseline" and "student alone" are names for ce
    assert len(set(S.METHOD_COLORS.values())) == len(S.METHOD_COLORS) - 2
    assert S.method_color("baseline") == S.method_color("student alone") == S.method_color("ce")
    assert S.method_marker("kd") == S.method_marker("kd")


def test_saved_figures_have_the_text_width_and_keep_outside_legends(tmp_path):
    """No bbox cropping: the PNG is exactly figsize x dpi (so LaTeX keeps the font sizes), and a
    legend placed 'outside' by constrained layout is inside the saved figure."""
    with S.thesis_style():
        fig, ax = plt.subplots(figsize=S.figsize(1.0, 0.4), layout="constrained")
        ax.plot([0, 1], [0, 1], label="a long legend entry")
        legend = fig.legend(loc="outside lower center")
        paths = S.save_figure(fig, "width", root=tmp_path, dpi=100)
    image = plt.imread(paths["png"])
    width, height = S.figsize(1.0, 0.4)
    assert image.shape[:2] == (int(height * 100), int(width * 100))  # matplotlib truncates
    box = legend.get_window_extent().transformed(fig.dpi_scale_trans.inverted())
    assert 0 <= box.x0 < box.x1 <= width and 0 <= box.y0 < box.y1 <= height
    assert paths["pdf"].read_bytes().startswith(b"%PDF")


def test_save_figure_rejects_bad_names(tmp_path):
    with pytest.raises(ConfigError):
        S.save_figure(plt.figure(), "a/b", root=tmp_path)


def test_slug_makes_display_names_safe_figure_names():
    assert S.slug("teacher cnn_s") == "teacher_cnn_s"
    assert S.slug("kd+logit_adjusted") == "kd_logit_adjusted"
    assert S.slug(" a/b ") == "a_b"


@pytest.mark.parametrize("value", ["a/b", "../x", "_x", "", "x\n", 3, None])
def test_check_name_rejects_unsafe_names(value):
    with pytest.raises(ConfigError, match=r"figure name=.*letters, digits"):
        S.check_name("figure name", value)


def test_check_name_accepts_safe_names_and_guards_save_figure_and_write_table(tmp_path):
    from kdlib.tables import write_table

    for ok in ("q1_gain", "fig-2.v3", "0abc"):
        S.check_name("figure name", ok)
    with pytest.raises(ConfigError, match="figure profile="):
        S.save_figure(plt.figure(), "x", profile="a b", root=tmp_path)
    with pytest.raises(ConfigError, match="table name="):
        write_table(pd.DataFrame({"a": [1]}), "x\n", root=tmp_path)


@pytest.mark.parametrize("thesis", [True, False])
def test_notebook_shows_figures_untrimmed_in_the_thesis_style(thesis):
    """In a kernel with the inline backend, a figure is shown at its own size (one draw), not
    trimmed to its contents (IPython's default, which draws it twice)."""
    nbclient = pytest.importorskip("nbclient")
    import base64
    import io

    import nbformat
    from PIL import Image

    code = ("%matplotlib inline\nimport matplotlib.pyplot as plt\nfrom kdlib import style\n"
            + ("style.use_thesis_style()\n" if thesis else "")
            + "fig, ax = plt.subplots(figsize=(2, 1), dpi=150, layout='constrained')\n"
            "ax.plot([0, 1])\nplt.show()")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    png = next(o["data"]["image/png"] for o in nb.cells[0].outputs if "data" in o)
    size = Image.open(io.BytesIO(base64.b64decode(png))).size
    assert (size == (300, 150)) is thesis
