"""Synthetic BraTS2020 subjects: MNI152 anatomy warped per subject, four contrasts, and gliomas
whose hidden HGG-likeness drives every grade cue (`difficulty` makes the grades overlap)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from kdlib import GRADES, MODALITIES
from kdlib.config import check_range
from kdlib.errors import ConfigError

REAL_SHAPE = (240, 240, 155)
MNI_MM_PER_FRAME_MM = 1.1  # MNI152 brains are ~10% larger than the SRI24 brains of BraTS

# Relative intensities (T1 white matter ~ 0.85). Tissues: CSF, GM, WM; lesion: ED edema, NCR
# necrosis (HGG-like label 1), NET solid non-enhancing core (LGG-like label 1), ET enhancing rim.
# Enhancement is in T1ce, necrosis in T2/T1ce; FLAIR shows the whole lesion bright, grade faintly.
LEVELS = {
    "flair": {
        "CSF": 0.12,
        "GM": 0.58,
        "WM": 0.45,
        "ED": 0.92,
        "NCR": 0.84,
        "NET": 0.88,
        "ET": 0.86,
    },
    "t1": {"CSF": 0.28, "GM": 0.60, "WM": 0.85, "ED": 0.55, "NCR": 0.32, "NET": 0.50, "ET": 0.58},
    "t1ce": {"CSF": 0.30, "GM": 0.62, "WM": 0.85, "ED": 0.57, "NCR": 0.30, "NET": 0.52, "ET": 1.35},
    "t2": {"CSF": 1.00, "GM": 0.62, "WM": 0.45, "ED": 0.84, "NCR": 1.00, "NET": 0.86, "ET": 0.70},
}


@dataclass(frozen=True)
class PhantomConfig:
    """Settings of the synthetic dataset; `workers` only changes speed, never the files."""

    n_hgg: int = 293
    n_lgg: int = 76
    shape: tuple[int, int, int] = REAL_SHAPE
    difficulty: float = 0.5
    seed: int = 0
    compress: bool = False
    write_h5: bool = False
    h5_channel_order: tuple[str, ...] = MODALITIES
    misnamed_seg_355: bool = True
    workers: int = 1

    def __post_init__(self) -> None:
        for name in ("n_hgg", "n_lgg", "seed", "workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name}={value!r} must be an integer")
        check_range("n_hgg", self.n_hgg, 0, 999)
        check_range("n_lgg", self.n_lgg, 0, 999)
        check_range("seed", self.seed, 0)
        check_range("workers", self.workers, 1, 256)
        if not 1 <= self.n_hgg + self.n_lgg <= 999:
            raise ConfigError(
                f"n_hgg + n_lgg = {self.n_hgg + self.n_lgg} must lie in [1, 999] "
                "(subject ids have three digits)"
            )
        shape = tuple(self.shape) if isinstance(self.shape, (list, tuple)) else ()
        if len(shape) != 3 or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 16 for s in shape
        ):
            raise ConfigError(
                f"shape={self.shape!r} must be three integers >= 16, e.g. [240, 240, 155]"
            )
        object.__setattr__(self, "shape", shape)
        if isinstance(self.difficulty, bool) or not isinstance(self.difficulty, (int, float)):
            raise ConfigError(f"difficulty={self.difficulty!r} must be a number in [0, 1]")
        check_range("difficulty", self.difficulty, 0.0, 1.0)
        for name in ("compress", "write_h5", "misnamed_seg_355"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be true or false")
        order = (
            tuple(self.h5_channel_order) if isinstance(self.h5_channel_order, (list, tuple)) else ()
        )
        if sorted(order) != sorted(MODALITIES):
            raise ConfigError(
                f"h5_channel_order={self.h5_channel_order!r} must order exactly {list(MODALITIES)}"
            )
        object.__setattr__(self, "h5_channel_order", order)


# ---------------------------------------------------------------- anatomy


def _spacing(shape: tuple[int, int, int]) -> np.ndarray:
    """Millimetres of the real 240 x 240 x 155 frame per voxel of `shape` (1 at the real shape)."""
    return np.array(REAL_SHAPE, float) / np.array(shape, float)


@lru_cache(maxsize=1)
def _mni() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MNI152 2009 brain mask, GM and WM maps (1 mm) as shipped with nilearn, scaled to [0, 1]."""
    data = Path(importlib.util.find_spec("nilearn").origin).parent / "datasets" / "data"
    names = [f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")]
    if all(
        (data / n).is_file() for n in names
    ):  # direct read: importing nilearn.datasets costs ~4 s
        t1, gm, wm = (nib.load(data / n).get_fdata(dtype=np.float32) for n in names)
    else:  # nilearn.datasets is imported only here, where it is needed: it takes ~4 s
        from nilearn import datasets

        t1, gm, wm = (
            f(resolution=1).get_fdata(dtype=np.float32)
            for f in (
                datasets.load_mni152_template,
                datasets.load_mni152_gm_template,
                datasets.load_mni152_wm_template,
            )
        )
    t1, gm, wm = (a / a.max() for a in (t1, gm, wm))
    return t1 > 0.2, gm, wm  # the mask is nilearn's load_mni152_brain_mask


@lru_cache(maxsize=4)
def _templates(shape: tuple[int, int, int]) -> dict:
    """MNI152 mask/GM/WM maps (anti-aliased for `shape`), the frame -> MNI map, tumour sites."""
    mask, gm, wm = _mni()
    mask = ndi.binary_dilation(
        mask, iterations=2
    )  # a thin CSF rim at the surface, as after skull stripping
    maps = [mask.astype(np.float32), gm * mask, wm * mask]  # a list: stacking copies 100 MB
    step = _spacing(shape) * MNI_MM_PER_FRAME_MM
    sigma = np.maximum(0.0, step - 1.0) * 0.5
    if sigma.max() > 0.25:
        maps = [ndi.gaussian_filter(m, sigma) for m in maps]
    # frame voxel p -> MNI voxel: flip x and y (BraTS arrays are stored LPS), scale, centre on the brain
    idx = np.argwhere(mask)
    centre_mni = (idx.min(0) + idx.max(0)) / 2.0
    centre_frame = (np.array(shape) - 1) / 2.0
    diag = step * np.array([-1.0, -1.0, 1.0])
    to_mni = np.zeros((3, 4))
    to_mni[:, :3] = np.diag(diag)
    to_mni[:, 3] = centre_mni - diag * centre_frame
    # tumour sites: deep cerebral white matter, searched on the canonical (undeformed) frame
    every = 2 if np.prod(shape) > 2e5 else 1
    coarse = np.stack(np.meshgrid(*[np.arange(0, n, every) for n in shape], indexing="ij")).reshape(
        3, -1
    )
    mni = to_mni[:, :3] @ coarse + to_mni[:, 3:]
    depth = ndi.distance_transform_edt(mask[::2, ::2, ::2], sampling=2.0)  # 2 mm grid: fast enough
    wm_p = ndi.map_coordinates(wm, mni, order=1)
    deep = ndi.map_coordinates(depth, mni / 2, order=1) / MNI_MM_PER_FRAME_MM
    z_mm = coarse[2] * _spacing(shape)[2]
    ok = (wm_p > 0.5) & (deep > 22) & (z_mm > 0.45 * REAL_SHAPE[2]) & (z_mm < 0.8 * REAL_SHAPE[2])
    return {
        "maps": maps,
        "to_mni": to_mni,
        "sites": coarse[:, ok].T.astype(np.float32),
        "mni_box": np.array([idx.min(0), idx.max(0)], float),
    }


def _basis(n: int, n_ctrl: int) -> np.ndarray:
    """(n, n_ctrl) Gaussian bumps with unit-norm rows: coefficients N(0,1) give a unit-variance field."""
    centres = np.linspace(0, n - 1, n_ctrl)
    width = (n - 1) / max(n_ctrl - 1, 1)
    b = np.exp(-0.5 * ((np.arange(n)[:, None] - centres) / width) ** 2)
    return (b / np.sqrt((b**2).sum(1, keepdims=True))).astype(np.float32)


def smooth_field(rng: np.random.Generator, shape, n_ctrl, box=None) -> np.ndarray:
    """Smooth Gaussian random field, unit variance, sum of separable bumps (fast: three tensordots).

    box: optional ((x0, x1), (y0, y1), (z0, z1)) to evaluate only that part of the field.
    """
    coef = rng.standard_normal(tuple(n_ctrl), dtype=np.float32)
    out = coef
    for axis in range(3):
        b = _basis(shape[axis], n_ctrl[axis])
        if box is not None:
            b = b[box[axis][0] : box[axis][1]]
        out = np.tensordot(out, b, axes=([0], [1]))  # the new axis goes last: x, y, z in turn
    return out


def _ctrl(size, sp, mm: float) -> tuple[int, ...]:
    """Control points along each axis of `size` voxels (`sp` mm each) for a spacing of `mm`."""
    return tuple(max(2, round(n * s / mm) + 1) for n, s in zip(size, sp))


def _random_affine(rng: np.random.Generator) -> np.ndarray:
    """3x3 rotation (in-plane +-7 deg, tilt +-4 deg) times per-axis brain-size scaling (+-6%)."""
    ax, ay, az = (
        np.deg2rad(rng.uniform(-4, 4)),
        np.deg2rad(rng.uniform(-4, 4)),
        np.deg2rad(rng.uniform(-7, 7)),
    )
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx @ np.diag(1.0 / rng.uniform(0.94, 1.06, 3))


# ---------------------------------------------------------------- tumour


def _phenotype(rng: np.random.Generator, grade: str, difficulty: float) -> dict:
    """Tumour parameters from the hidden HGG-likeness h; difficulty makes the grades overlap."""
    t = difficulty
    sd = 0.05 + 0.4 * t
    h = float(np.clip(rng.normal(1 - 0.3 * t if grade == "HGG" else 0.3 * t, sd), 0, 1))
    j = 0.03 + 0.05 * t  # per-parameter jitter around what h implies
    return {
        "h": h,
        "volume_mm3": 1000 * (90 + 40 * h) * float(np.exp(rng.normal(0, 0.3))),
        "core_ratio": float(np.clip(0.78 - 0.14 * h + rng.normal(0, j), 0.45, 0.9)),
        "rim_cover": float(np.clip(1.25 * h - 0.2 + rng.normal(0, j + 0.05), 0, 1)),
        "rim_mm": float(rng.uniform(3, 7)),
        "necrotic": float(np.clip(h + rng.normal(0, 2 * j), 0, 1)),
        "et_gain": float(np.clip(0.6 + 0.4 * h + rng.normal(0, j), 0.3, 1.2)),
        "axes": np.exp(rng.normal(0, 0.12, 3)),
        "irregular": float(rng.uniform(0.1, 0.2)),
    }


def _tumour(
    rng: np.random.Generator,
    sp: np.ndarray,
    shape,
    pheno: dict,
    wm: np.ndarray,
    gm: np.ndarray,
    brain: np.ndarray,
    centre: np.ndarray,
    rot: np.ndarray,
):
    """Labels (uint8) of the tumour inside a box of the `shape` array, and that box (slices)."""
    radius = (3 * pheno["volume_mm3"] / (4 * np.pi)) ** (1 / 3)
    radii = radius * pheno["axes"] / np.prod(pheno["axes"]) ** (1 / 3)
    half = 1.35 * radii.max() / sp
    lo = np.maximum(0, np.floor(centre - half)).astype(int)
    hi = np.minimum(shape, np.ceil(centre + half) + 1).astype(int)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    size = tuple(hi - lo)
    pts = (
        np.stack(
            np.meshgrid(
                *[(np.arange(a, b) - c) * s for a, b, c, s in zip(lo, hi, centre, sp)],
                indexing="ij",
            ),
            -1,
        )
        @ rot
    )  # mm, in the tumour's own axes
    noise = [
        np.clip(smooth_field(rng, size, _ctrl(size, sp, mm)), -1.5, 1.5) for mm in (10, 8, 10, 8)
    ]
    amp = pheno["irregular"]
    d_whole = np.sqrt(((pts / radii) ** 2).sum(-1)) * (1 + amp * noise[0])
    shift = rng.normal(0, 0.15, 3) * radii
    core_r = radii * pheno["core_ratio"]
    d_core = np.sqrt((((pts - shift) / core_r) ** 2).sum(-1)) * (1 + amp * noise[1])
    inside = brain[box]
    core = (d_core < 1) & inside
    rim_mm = np.maximum(1.5, pheno["rim_mm"] * (1 + 0.5 * noise[3]))  # nodular, uneven rim
    rim = core & (d_core > 1 - rim_mm / core_r.mean())
    enh = rim & (noise[2] < np.quantile(noise[2], pheno["rim_cover"]))
    tissue = wm[box] + 0.6 * gm[box]  # edema spreads along white matter, not into CSF
    edema = (d_whole < 1) & inside & (tissue > 0.45) & ~core
    labels = np.zeros(size, np.uint8)
    labels[edema] = 2
    labels[core] = 1
    labels[enh] = 4
    return labels, box


# ---------------------------------------------------------------- one subject


def _subject_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, index)))


def phantom_subject(index: int, grade: str, cfg: PhantomConfig) -> tuple[np.ndarray, np.ndarray]:
    """Subject `index` (1-based) of grade HGG/LGG: image float32 (4, X, Y, Z) in MODALITIES order
    (integer-valued, exactly what the files hold) and seg uint8 (X, Y, Z) with labels {0, 1, 2, 4}."""
    image, seg, _ = _subject(index, grade, cfg, tissue=False)
    return image, seg


def _warp(rng: np.random.Generator, shape, tpl: dict, volume_mm3: float):
    """Warp the template into this subject's frame: random affine, elastic field, mass effect.

    Returns the crop of the frame that holds the brain, tissue probabilities CSF/GM/WM and the
    brain mask inside it, and the tumour centre (crop voxels, in deep white matter).
    """
    sp = _spacing(shape)
    lin, shift_mm = _random_affine(rng), rng.normal(0, [3.0, 3.0, 2.0])
    c_mm = (np.array(shape) - 1) / 2.0 * sp
    m_lin = tpl["to_mni"][:, :3] / sp @ lin  # frame mm -> MNI voxels
    m_off = tpl["to_mni"][:, :3] @ (c_mm / sp) + tpl["to_mni"][:, 3] - m_lin @ (c_mm + shift_mm)
    corners = np.array(np.meshgrid(*tpl["mni_box"].T, indexing="ij")).reshape(3, -1)
    frame = np.linalg.solve(m_lin, corners - m_off[:, None]) / sp[:, None]
    lo = np.clip(np.floor(frame.min(1) - 14 / sp), 0, None).astype(int)  # 14 mm room for the warps
    hi = np.minimum(np.ceil(frame.max(1) + 14 / sp) + 1, shape).astype(int)
    site = tpl["sites"][rng.integers(len(tpl["sites"]))].astype(float)
    centre_mm = np.clip(
        np.linalg.solve(lin, site * sp - c_mm) + c_mm + shift_mm, 0, (np.array(shape) - 1) * sp
    )
    pts = np.meshgrid(
        *[(np.arange(a, b) * s).astype(np.float32) for a, b, s in zip(lo, hi, sp)],
        indexing="ij",
        sparse=True,
    )
    # mass effect: sample nearer the tumour centre, so the anatomy is pushed away from it
    r_mass = 0.55 * (3 * volume_mm3 / (4 * np.pi)) ** (1 / 3)
    d = [p - np.float32(c) for p, c in zip(pts, centre_mm)]
    fall = np.float32(0.35) * np.exp(
        -(d[0] ** 2 + d[1] ** 2 + d[2] ** 2) / np.float32(2 * r_mass**2)
    )
    pts = [p - dd * fall for p, dd in zip(pts, d)]
    m32 = np.hstack([m_lin, m_off[:, None]]).astype(np.float32)  # float32 maths: half the memory
    box = tuple(zip(lo, hi))
    coords = np.empty((3, *(hi - lo)), np.float32)
    for k in range(3):
        elastic = smooth_field(rng, shape, _ctrl(shape, sp, 40.0), box) * np.float32(
            2.5 * MNI_MM_PER_FRAME_MM
        )
        coords[k] = (
            m32[k, 0] * pts[0] + m32[k, 1] * pts[1] + m32[k, 2] * pts[2] + m32[k, 3] + elastic
        )
    del pts, fall
    mask, gm, wm = (ndi.map_coordinates(m, coords, order=1, mode="constant") for m in tpl["maps"])
    total = np.maximum(np.maximum(mask, gm + wm), 1e-6)
    probs = {"GM": gm / total, "WM": wm / total}
    probs["CSF"] = np.clip(1 - probs["GM"] - probs["WM"], 0, 1)
    return tuple(slice(a, b) for a, b in zip(lo, hi)), probs, mask > 0.5, centre_mm / sp - lo


def _subject(index: int, grade: str, cfg: PhantomConfig, tissue: bool = True):
    """phantom_subject plus the main tissue of each voxel (uint8: 0 outside, 1 CSF, 2 GM, 3 WM)."""
    if grade not in GRADES:
        raise ConfigError(f"grade={grade!r} must be one of {list(GRADES)}")
    shape, sp = cfg.shape, _spacing(cfg.shape)
    rng = _subject_rng(cfg.seed, index)
    pheno = _phenotype(rng, grade, cfg.difficulty)
    crop, probs, brain, centre = _warp(rng, shape, _templates(shape), pheno["volume_mm3"])
    csize = brain.shape
    box = tuple((c.start, c.stop) for c in crop)
    rot = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    labels, tbox = _tumour(rng, sp, csize, pheno, probs["WM"], probs["GM"], brain, centre, rot)
    soft = {
        name: ndi.gaussian_filter((labels == lab).astype(np.float32), 0.6)  # partial volume
        for name, lab in (("ED", 2), ("L1", 1), ("ET", 4))
    }
    weight = soft["ED"] + soft["L1"] + soft["ET"]
    texture = smooth_field(rng, labels.shape, _ctrl(labels.shape, sp, 12.0))
    vessels = np.exp(
        -((smooth_field(rng, shape, _ctrl(shape, sp, 9.0), box) / 0.12) ** 2)
    ) * np.sqrt(probs["CSF"])
    image = np.zeros((4, *shape), np.float32)
    idx = np.nonzero(brain)
    noise_frac = rng.uniform(0.02, 0.045)
    for m, mod in enumerate(MODALITIES):
        lv = {k: v * float(np.exp(rng.normal(0, 0.04))) for k, v in LEVELS[mod].items()}
        x = lv["CSF"] * probs["CSF"] + lv["GM"] * probs["GM"] + lv["WM"] * probs["WM"]
        if mod == "t1ce":
            x += (
                float(rng.uniform(0.2, 0.6)) * vessels
            )  # vessels and choroid plexus enhance a little
        core = pheno["necrotic"] * lv["NCR"] + (1 - pheno["necrotic"]) * lv["NET"]
        et = lv["WM"] + (lv["ET"] - lv["WM"]) * pheno["et_gain"] if mod == "t1ce" else lv["ET"]
        sub = x[tbox]
        edema = sub + np.clip(0.8 + 0.2 * texture, 0.4, 1.0) * (
            lv["ED"] - sub
        )  # infiltrates tissue
        x[tbox] = (
            sub * (1 - weight)
            + soft["ED"] * edema
            + soft["L1"] * core * (1 + 0.08 * texture)
            + soft["ET"] * et
        )
        bias = np.exp(
            float(rng.uniform(0.06, 0.18)) * smooth_field(rng, shape, _ctrl(shape, sp, 90.0), box)
        )
        scale = float(np.exp(rng.uniform(np.log(300), np.log(1500))))
        v = (x * bias)[idx] * scale
        sigma = noise_frac * lv["WM"] * scale  # Rician noise: magnitude of a complex Gaussian
        v = np.hypot(
            v + sigma * rng.standard_normal(v.size, dtype=np.float32),
            sigma * rng.standard_normal(v.size, dtype=np.float32),
        )
        image[(m, *crop)][idx] = np.clip(np.rint(v), 1, 32767)  # background stays exactly 0
    seg = np.zeros(shape, np.uint8)
    seg[crop][tbox] = labels * brain[tbox]
    if not tissue:
        return image, seg, None
    main = np.zeros(shape, np.uint8)
    main[crop] = (np.argmax(np.stack([probs["CSF"], probs["GM"], probs["WM"]]), 0) + 1) * brain
    return image, seg, main
