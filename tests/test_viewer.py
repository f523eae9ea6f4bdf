"""kdlib.viewer: the slice figure, the static viewer on phantom subjects, the widget viewer."""

from __future__ import annotations

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.figure import Figure

from kdlib import MODALITIES
from kdlib import workbook as wb
from kdlib.data.brats import discover, load_subject
from kdlib.errors import ConfigError
from kdlib.paths import STATIC_ENV
from kdlib.viewer import show_viewer, slice_figure

matplotlib.use("Agg")


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KDLIB_HOME", str(home))
        ds = wb.get_dataset("viewer", "phantom", progress=False,
                            phantom={"n_hgg": 1, "n_lgg": 1, "shape": [32, 32, 24]})["dataset"]
        yield discover(ds["root"], fmt=ds["fmt"])


@pytest.fixture
def shown(monkeypatch):
    """Whatever show_viewer displays, in order."""
    out = []
    monkeypatch.setattr("kdlib.viewer.display", lambda *objs, **kw: out.extend(objs))
    return out


def centre(seg):
    zs = np.nonzero(seg.any(axis=(0, 1)))[0]
    return int(zs.mean())


def test_slice_figure_one_panel_per_modality():
    rng = np.random.default_rng(0)
    image = rng.random((4, 12, 10, 6)).astype(np.float32)
    seg = np.zeros((12, 10, 6), np.uint8)
    seg[3:7, 3:6, 2] = 2
    seg[4:6, 4:5, 2] = 4
    fig = slice_figure(image, seg, 2, title="S1")
    assert isinstance(fig, Figure) and len(fig.axes) == 4
    assert [ax.get_title() for ax in fig.axes] == list(MODALITIES)
    shown_img = fig.axes[1].images[0].get_array()
    np.testing.assert_array_equal(np.asarray(shown_img), image[1, :, :, 2].T)
    assert fig.get_suptitle().startswith("S1, slice 2")
    assert len(fig.axes[0].collections) >= 2  # ED and ET outlined

    fig = slice_figure(image, seg, 99, modalities=("t2", "flair"), overlay=False)
    assert [ax.get_title() for ax in fig.axes] == ["t2", "flair"]
    np.testing.assert_array_equal(np.asarray(fig.axes[0].images[0].get_array()),
                                  image[3, :, :, 5].T)  # z clipped to the last slice
    assert all(len(ax.collections) == 0 for ax in fig.axes) and fig.get_suptitle() == ""


def test_static_viewer_shows_the_tumour_centre(records, shown):
    assert sorted(r.grade for r in records) == ["HGG", "LGG"]
    second = records[1]
    assert show_viewer(records, second.subject_id, static=True) is None
    assert len(shown) == 1 and isinstance(shown[0], Figure)
    fig = shown[0]
    assert len(fig.axes) == len(MODALITIES)
    _, seg = load_subject(second)
    z = centre(seg)
    assert fig.get_suptitle().startswith(f"{second.subject_id} ({second.grade}), slice {z}")
    assert not plt.fignum_exists(fig.number)  # closed after display

    shown.clear()
    show_viewer(records, static=True)  # default: the first subject
    assert records[0].subject_id in shown[0].get_suptitle()


def test_static_by_default_when_the_runner_sets_the_variable(records, shown, monkeypatch):
    monkeypatch.setenv(STATIC_ENV, "1")
    show_viewer(records)
    assert len(shown) == 1 and isinstance(shown[0], Figure)


def test_viewer_errors(records, shown):
    with pytest.raises(ConfigError, match="'BraTS20_Training_999' not found") as err:
        show_viewer(records, "BraTS20_Training_999", static=True)
    assert records[0].subject_id in str(err.value)
    with pytest.raises(ConfigError, match="at least one subject"):
        show_viewer([], static=True)
    assert shown == []


def test_widget_viewer_redraws_on_change(records, shown, monkeypatch):
    import ipywidgets as w

    monkeypatch.delenv(STATIC_ENV, raising=False)
    show_viewer(records)
    box = shown[0]
    assert isinstance(box, w.VBox) and isinstance(shown[1], Figure)
    (pick, overlay), (mods, z) = box.children[0].children, box.children[1].children
    _, seg0 = load_subject(records[0])
    assert pick.value == records[0].subject_id and z.value == centre(seg0)
    z.value = 3
    assert shown[-1].get_suptitle().startswith(
        f"{records[0].subject_id} ({records[0].grade}), slice 3")
    mods.value = ("t1",)
    assert [ax.get_title() for ax in shown[-1].axes] == ["t1"]
    overlay.value = False
    assert all(len(ax.collections) == 0 for ax in shown[-1].axes)
    pick.value = records[1].subject_id
    _, seg1 = load_subject(records[1])
    assert z.value == centre(seg1)
    assert shown[-1].get_suptitle().startswith(
        f"{records[1].subject_id} ({records[1].grade}), slice {centre(seg1)}")
