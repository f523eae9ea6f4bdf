"""A slice viewer for the notebooks: ipywidgets in JupyterLab, a static figure everywhere else."""

from __future__ import annotations

import os
from collections.abc import Sequence

import ipywidgets as w
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import display
from matplotlib.figure import Figure

from kdlib import MODALITIES
from kdlib.data.brats import SubjectRecord, load_subject
from kdlib.errors import ConfigError
from kdlib.paths import STATIC_ENV
from kdlib.style import figsize, thesis_style


def slice_figure(image: np.ndarray, seg: np.ndarray, z: int, modalities: Sequence[str] = MODALITIES,
                 overlay: bool = True, title: str = "") -> Figure:
    """One axial slice `z` of a subject: a panel per modality, tumour sub-regions outlined."""
    z = int(np.clip(z, 0, image.shape[-1] - 1))
    with thesis_style():
        fig, axes = plt.subplots(1, len(modalities), figsize=figsize(1.0, 0.3), layout="constrained",
                                 squeeze=False)
        for ax, name in zip(axes[0], modalities):
            img = image[MODALITIES.index(name), :, :, z].T  # x right, y up: radiological display
            ax.imshow(img, cmap="gray", origin="lower")
            if overlay:
                for label, colour in ((2, "#E69F00"), (1, "#56B4E9"), (4, "#D55E00")):
                    if (seg[:, :, z] == label).any():
                        ax.contour((seg[:, :, z] == label).T, levels=[0.5], colors=colour,
                                   linewidths=0.7, origin="lower")
            ax.set_title(name)
            ax.axis("off")
        if title:
            fig.suptitle(f"{title}, slice {z} (ED orange, NCR/NET blue, ET red)", fontsize=8)
    return fig


def show_viewer(records: Sequence[SubjectRecord], subject: str = "", static: bool | None = None) -> None:
    """Subject, modality, slice slider and overlay toggle (ipywidgets); with `static` (default: when
    $KDLIB_STATIC_FIGURES is set, as under papermill) the tumour's middle slice of one subject."""
    if not records:
        raise ConfigError("show_viewer needs at least one subject record")
    by_id = {r.subject_id: r for r in records}
    if subject and subject not in by_id:
        raise ConfigError(f"subject {subject!r} not found; e.g. {sorted(by_id)[:5]}")
    first = by_id.get(subject) or records[0]
    static = bool(os.environ.get(STATIC_ENV)) if static is None else static
    loaded: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def volume(sid: str) -> tuple[np.ndarray, np.ndarray]:
        if sid not in loaded:
            loaded.clear()  # one subject in memory at a time
            loaded[sid] = load_subject(by_id[sid])
        return loaded[sid]

    def centre(seg: np.ndarray) -> int:
        zs = np.nonzero(seg.any(axis=(0, 1)))[0]
        return int(zs.mean()) if len(zs) else seg.shape[-1] // 2

    if static:
        image, seg = volume(first.subject_id)
        fig = slice_figure(image, seg, centre(seg), title=f"{first.subject_id} ({first.grade})")
        display(fig)
        plt.close(fig)
        return

    image, seg = volume(first.subject_id)
    pick = w.Dropdown(options=sorted(by_id), value=first.subject_id, description="subject")
    mods = w.SelectMultiple(options=MODALITIES, value=MODALITIES, description="modalities")
    z = w.IntSlider(value=centre(seg), min=0, max=image.shape[-1] - 1, description="slice")
    overlay = w.Checkbox(value=True, description="tumour overlay")
    out = w.Output()

    def draw(*_) -> None:
        image, seg = volume(pick.value)
        z.max = image.shape[-1] - 1
        with out:
            out.clear_output(wait=True)
            fig = slice_figure(image, seg, z.value, mods.value or MODALITIES, overlay.value,
                               f"{pick.value} ({by_id[pick.value].grade})")
            display(fig)
            plt.close(fig)

    def new_subject(_) -> None:
        z.value = centre(volume(pick.value)[1])
        draw()

    pick.observe(new_subject, names="value")
    for widget in (mods, z, overlay):
        widget.observe(draw, names="value")
    display(w.VBox([w.HBox([pick, overlay]), w.HBox([mods, z]), out]))
    draw()
