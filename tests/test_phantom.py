"""The phantom simulation: settings, tissue contrasts, and a dataset whose grades are learnable but
not separable by one pixel statistic."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from kdlib import MODALITIES
from kdlib.config import from_dict
from kdlib.data import phantom
from kdlib.data.phantom import PhantomConfig, phantom_subject
from kdlib.errors import ConfigError

SHAPE = (64, 64, 40)


@pytest.fixture(scope="module")
def cohort():
    """12 HGG + 12 LGG subjects (tiny shape) with their tissue maps, for the statistics tests."""
    cfg = PhantomConfig(shape=SHAPE)
    return [(g, *phantom._subject(i, g, cfg)) for i, g in enumerate(["HGG", "LGG"] * 12, start=1)]


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    "values, key",
    [
        ({"n_hgg": -1}, "n_hgg"),
        ({"n_lgg": 1.5}, "n_lgg"),
        ({"n_hgg": 0, "n_lgg": 0}, "n_hgg + n_lgg"),
        ({"shape": (64, 64)}, "shape"),
        ({"shape": (8, 64, 64)}, "shape"),
        ({"difficulty": 1.5}, "difficulty"),
        ({"difficulty": "hard"}, "difficulty"),
        ({"compress": "yes"}, "compress"),
        ({"seed": -3}, "seed"),
        ({"workers": 0}, "workers"),
        ({"h5_channel_order": ["t1", "t2"]}, "h5_channel_order"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_bad_settings_name_the_key(values, key):
    with pytest.raises(ConfigError, match=key.replace("+", r"\+")):
        from_dict(PhantomConfig, values, "phantom")


def test_config_from_yaml_lists():
    cfg = from_dict(PhantomConfig, {"shape": [96, 96, 64], "h5_channel_order": list(MODALITIES)})
    assert cfg.shape == (96, 96, 64) and cfg.h5_channel_order == MODALITIES
    assert PhantomConfig().n_hgg == 293 and PhantomConfig().n_lgg == 76
    with pytest.raises(ConfigError, match="grade"):
        phantom_subject(1, "GBM", cfg)


# ---------------------------------------------------------------- image content


def test_relative_contrasts_on_tissue_masks(cohort):
    order = {
        "t1": ("WM", "GM", "CSF"),
        "t1ce": ("WM", "GM", "CSF"),
        "t2": ("CSF", "GM", "WM"),
        "flair": ("GM", "WM", "CSF"),
    }
    for grade, image, seg, tissue in cohort[:4]:
        healthy = seg == 0
        for m, mod in enumerate(MODALITIES):
            x = image[m]
            med = {
                name: np.median(x[(tissue == k) & healthy])
                for k, name in ((1, "CSF"), (2, "GM"), (3, "WM"))
            }
            hi, mid, lo = order[mod]
            assert med[hi] > med[mid] > med[lo], (mod, med)
        flair, t1ce = image[0], image[2]
        assert np.median(flair[seg == 2]) > 1.3 * np.median(flair[(tissue == 3) & healthy])
        if (seg == 4).sum() > 20:
            assert np.median(t1ce[seg == 4]) > 1.2 * np.median(t1ce[(tissue == 3) & healthy])


def test_grade_shows_in_subregion_statistics(cohort):
    frac = {"HGG": [], "LGG": []}
    for grade, image, seg, tissue in cohort:
        n = np.array([(seg == lab).sum() for lab in (1, 2, 4)], float)
        frac[grade].append(n / n.sum())
    hgg, lgg = np.array(frac["HGG"]), np.array(frac["LGG"])
    assert hgg[:, 2].mean() > 2 * lgg[:, 2].mean()  # more enhancing tumour
    assert lgg[:, 0].mean() > hgg[:, 0].mean()  # larger non-enhancing core
    assert hgg[:, 1].mean() > 0.5  # edema is the largest HGG sub-region


def slice_features(cohort):
    from kdlib.data.cache import normalise

    rows = []
    for subject, (grade, image, seg, _) in enumerate(cohort):
        x = np.stack([normalise(v) for v in image])
        for z in np.flatnonzero((seg > 0).sum((0, 1)) >= 10):
            brain = x[0, :, :, z] != 0
            feats = [f(x[m, :, :, z][brain]) for m in range(4) for f in (np.mean, np.max, np.std)]
            rows.append((subject, int(grade == "HGG"), feats))
    return (
        np.array([r[0] for r in rows]),
        np.array([r[1] for r in rows]),
        np.array([r[2] for r in rows]),
    )


def test_no_single_pixel_statistic_separates_the_grades(cohort):
    from sklearn.metrics import roc_auc_score

    _, y, features = slice_features(cohort)
    aucs = [max(a, 1 - a) for a in (roc_auc_score(y, f) for f in features.T)]
    assert 0.5 * len(y) > y.sum() > 0.3 * len(y)
    assert max(aucs) < 0.95, aucs
    assert max(aucs) > 0.6  # yet the grade is visible


def test_flair_alone_shows_the_grade_less_than_flair_t1ce_t2(cohort):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    groups, y, features = slice_features(cohort)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))

    def auc(cols):
        p = cross_val_predict(
            model, features[:, cols], y, groups=groups, cv=GroupKFold(4), method="predict_proba"
        )[:, 1]
        return roc_auc_score(y, p)

    flair, three = auc([0, 1, 2]), auc([0, 1, 2, 6, 7, 8, 9, 10, 11])
    assert three > flair + 0.03, (flair, three)


def test_difficulty_controls_grade_overlap():
    rng_h = {
        d: [
            phantom._phenotype(phantom._subject_rng(0, i), g, d)["h"]
            for i in range(200)
            for g in ("HGG", "LGG")
        ]
        for d in (0.0, 0.5, 1.0)
    }
    crossed = {
        d: np.mean([(h < 0.5) == (k % 2 == 0) for k, h in enumerate(v)]) for d, v in rng_h.items()
    }
    assert crossed[0.0] < 0.01 < crossed[0.5] < crossed[1.0] < 0.5


def test_render_slices_with_contours(cohort, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(os.environ.get("KDLIB_PHANTOM_PNG_DIR", tmp_path))
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, (grade, image, seg, _) in enumerate(cohort[:2]):
        zs = np.flatnonzero((seg > 0).any((0, 1)))
        fig, axes = plt.subplots(3, 4, figsize=(8, 6))
        for row, z in enumerate(np.linspace(zs[0], zs[-1], 5).astype(int)[1:4]):
            for m, mod in enumerate(MODALITIES):
                ax = axes[row, m]
                ax.imshow(np.rot90(image[m, :, :, z]), cmap="gray")
                ax.contour(np.rot90(seg[:, :, z] > 0), levels=[0.5], colors="y", linewidths=0.6)
                ax.contour(
                    np.rot90(np.isin(seg[:, :, z], (1, 4))),
                    levels=[0.5],
                    colors="r",
                    linewidths=0.6,
                )
                ax.set_title(f"{grade} {mod} z={z}", fontsize=7)
                ax.axis("off")
        path = out / f"phantom_{k + 1:03d}_{grade}.png"
        fig.savefig(path, dpi=60)
        plt.close(fig)
        paths.append(path)
    assert all(p.stat().st_size > 5000 for p in paths)
