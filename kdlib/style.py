"""Thesis figure style: text-width sizes, serif rcParams, one colour and marker per method."""

from __future__ import annotations

import contextlib
import hashlib
import re
import sys
from collections.abc import Iterator, Sequence
from functools import wraps
from pathlib import Path

import matplotlib as mpl
from matplotlib.figure import Figure

from kdlib.errors import ConfigError

TEXTWIDTH_PT = 418.25
"""LaTeX \\textwidth in pt (\\showthe\\textwidth); 418.25 pt = 5.79 in."""

OKABE_ITO = ("#000000", "#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7")
TOL_MUTED = ("#332288", "#88CCEE", "#44AA99", "#117733", "#999933", "#DDCC77", "#CC6677",
             "#882255", "#AA4499")
METHOD_COLORS: dict[str, str] = {
    "ce": "#000000", "baseline": "#000000", "kd": "#E69F00", "dkd": "#0072B2", "bkd": "#D55E00",
    "kd+logit_adjusted": "#CC79A7", "weighted_ce": "#999999", "class_balanced": "#56B4E9",
    "focal": "#009E73", "logit_adjusted": "#332288", "ldam_drw": "#44AA99",
    "teacher": "#882255", "kd_original": "#DDCC77", "ce+posthoc": "#999933",
    "student alone": "#000000", "distilled": "#117733",
}
"""Fixed method -> colour (Okabe-Ito, then Paul Tol's muted); other names get a stable hash colour."""
CLASS_COLORS: dict[str, str] = {"healthy": "#999999", "HGG": "#D55E00", "LGG": "#0072B2"}
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
"""What a figure or table name (and profile) may look like: a safe file name, no path."""

STYLE: dict[str, object] = {
    "font.family": ["STIXGeneral", "DejaVu Serif"], "font.serif": ["STIXGeneral", "DejaVu Serif"],
    "mathtext.fontset": "stix", "axes.formatter.use_mathtext": True,
    "font.size": 9, "axes.titlesize": 9, "axes.labelsize": 9, "xtick.labelsize": 8,
    "ytick.labelsize": 8, "legend.fontsize": 8, "legend.title_fontsize": 8, "figure.titlesize": 10,
    "axes.linewidth": 0.6, "xtick.major.width": 0.6, "ytick.major.width": 0.6,
    "lines.linewidth": 1.2, "lines.markersize": 4, "axes.spines.top": False,
    "axes.spines.right": False, "legend.frameon": False, "grid.linewidth": 0.4, "grid.alpha": 0.5,
    "axes.prop_cycle": mpl.cycler(color=OKABE_ITO), "image.cmap": "viridis",
    "figure.dpi": 150, "savefig.dpi": 300, "pdf.fonttype": 42, "ps.fonttype": 42,
}


def figsize(width_fraction: float = 1.0, aspect: float = 0.62,
            textwidth_pt: float = TEXTWIDTH_PT) -> tuple[float, float]:
    """(width, height) in inches for a figure `width_fraction` of the LaTeX text width."""
    width = textwidth_pt / 72.27 * width_fraction
    return width, width * aspect


@contextlib.contextmanager
def thesis_style() -> Iterator[None]:
    """Context manager: the thesis rcParams (serif, 8-9 pt, colour-blind palette, TrueType PDF)."""
    with mpl.rc_context(STYLE):
        yield


def use_thesis_style() -> None:
    """Set the thesis rcParams for the rest of the session (notebooks); in a notebook with the
    inline backend, figures are shown as laid out, untrimmed (kdlib's figures fit their size; the
    default "tight" trim draws every figure twice)."""
    mpl.rcParams.update(STYLE)
    if "matplotlib_inline.config" in sys.modules:  # `%matplotlib inline` has run
        from matplotlib_inline.config import InlineBackend
        if InlineBackend.initialized():
            inline = InlineBackend.instance()
            inline.print_figure_kwargs = {**inline.print_figure_kwargs, "bbox_inches": None}


def _styled(fn):
    @wraps(fn)
    def wrapper(*args, **kwargs):
        with thesis_style():
            return fn(*args, **kwargs)
    return wrapper


def _hash(name: str, n: int) -> int:
    return int(hashlib.md5(str(name).encode()).hexdigest(), 16) % n


def method_color(name: str) -> str:
    """The colour of a method in every figure: METHOD_COLORS, else a stable hash into Tol's palette."""
    return METHOD_COLORS.get(str(name), TOL_MUTED[_hash(name, len(TOL_MUTED))])


def method_marker(name: str) -> str:
    """A stable marker per method name (second visual cue besides colour)."""
    keys = list(METHOD_COLORS)
    return MARKERS[keys.index(name) % len(MARKERS)] if name in keys else MARKERS[_hash(name, 9)]


def slug(text: str) -> str:
    """A figure-name-safe version of a display name: `teacher cnn_s` -> `teacher_cnn_s`."""
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", str(text)).strip("_")


def check_name(what: str, value) -> None:
    """Raise ConfigError unless `value` is a str matching NAME_PATTERN (e.g. what="figure name")."""
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        raise ConfigError(f"{what}={value!r}: use letters, digits, '_', '-', '.' only "
                          "(starting with a letter or digit)")


def save_figure(fig: Figure, name: str, profile: str = "default", root: str | Path = "figures",
                dpi: int = 300, formats: Sequence[str] = ("pdf", "png")) -> dict[str, Path]:
    """Write <root>/<profile>/<name>.pdf (TrueType fonts, fonttype 42) and .png; return the paths.

    The files have the figure's own size (`figsize`: a fraction of the LaTeX text width, so that
    `\\includegraphics` at that width keeps the 8-9 pt fonts); kdlib's plots use constrained
    layout with legends placed "outside", which keeps everything inside the figure."""
    check_name("figure name", name)
    check_name("figure profile", profile)
    out_dir = Path(root) / profile
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    with mpl.rc_context({"pdf.fonttype": 42, "ps.fonttype": 42}):
        for fmt in formats:
            paths[fmt] = out_dir / f"{name}.{fmt}"
            meta = {"CreationDate": None} if fmt == "pdf" else None
            fig.savefig(paths[fmt], format=fmt, dpi=dpi, metadata=meta)
    return paths
