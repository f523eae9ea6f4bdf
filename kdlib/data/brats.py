"""Find and read BraTS2020 training subjects: the NIfTI release and the Kaggle H5 slices.

Both readers give the same `SubjectRecord` and the same `load_subject` output, so everything
downstream is format-blind. The file layouts are described in the README, "The real BraTS2020";
the labels are those of the BraTS benchmark (Menze et al., IEEE TMI 2015; Bakas et al. 2018).
What is checked in each file is in kdlib.data.checks.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from kdlib import MODALITIES
from kdlib.data.brats_h5 import H5_RE, discover_h5, load_h5
from kdlib.data.checks import check_no_empty_modality, check_same_space, check_seg
from kdlib.data.subjects import MAC_NOTE, MAC_PREFIX, SubjectRecord, grade_of, read_grades, why
from kdlib.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SUBJECT_RE = re.compile(r"^BraTS20_Training_\d+$")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
_SEARCH_DEPTH = 3  # how far below `root` discover() looks for the dataset folder


def discover(
    root: str | Path,
    fmt: str = "auto",
    channel_order: Sequence[str] = MODALITIES,
    volume_map: str | Path | Mapping[int, str] | None = None,
) -> list[SubjectRecord]:
    """Find every subject under `root` (the dataset folder or a folder above it), sorted by id.

    fmt: "nifti", "h5" or "auto" (NIfTI when both are present). channel_order and volume_map
    only concern the Kaggle H5 slices (see `discover_h5`).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist; check the path to the BraTS2020 data")
    if fmt not in ("auto", "nifti", "h5"):
        raise ConfigError(f"fmt={fmt!r} is not valid; choose one of ['auto', 'nifti', 'h5']")
    nifti_dir = _find_dir(root, _is_nifti_dir) if fmt in ("auto", "nifti") else None
    h5_dir = _find_dir(root, _is_h5_dir) if fmt in ("auto", "h5") else None
    if nifti_dir is not None:
        if h5_dir is not None:
            log.info("both NIfTI (%s) and H5 (%s) data found; reading NIfTI", nifti_dir, h5_dir)
        return discover_nifti(nifti_dir)
    if h5_dir is not None:
        return discover_h5(h5_dir, channel_order, volume_map)
    wanted = {
        "auto": "BraTS20_Training_* folders or volume_*_slice_*.h5 files",
        "nifti": "BraTS20_Training_* folders",
        "h5": "volume_*_slice_*.h5 files",
    }[fmt]
    raise DataError(
        f"no subjects found under {root} (looked {_SEARCH_DEPTH} folder levels down for {wanted}); "
        "point root at MICCAI_BraTS2020_TrainingData or at BraTS2020_training_data/content/data"
    )


def load_subject(record: SubjectRecord) -> tuple[np.ndarray, np.ndarray]:
    """Image float32 (4, X, Y, Z) in MODALITIES order, seg uint8 (X, Y, Z) with labels {0,1,2,4}."""
    if record.fmt == "nifti":
        return _load_nifti(record)
    if record.fmt == "h5":
        return load_h5(record)
    raise DataError(f"{record.subject_id}: unknown format {record.fmt!r}; expected 'nifti' or 'h5'")


# ---------------------------------------------------------------- locating the dataset folder


def _is_nifti_dir(d: Path) -> bool:
    return any(e.is_dir() and SUBJECT_RE.match(e.name) for e in os.scandir(d))


def _is_h5_dir(d: Path) -> bool:
    return any(H5_RE.match(e.name) for e in os.scandir(d))


def _find_dir(root: Path, test: Callable[[Path], bool]) -> Path | None:
    """Breadth-first search for the shallowest folder satisfying `test`, never entering subjects."""
    level = [root]
    for _ in range(_SEARCH_DEPTH + 1):
        found = [d for d in level if test(d)]
        if found:
            return min(found)
        level = sorted(
            Path(e.path)
            for d in level
            for e in os.scandir(d)
            if e.is_dir() and not SUBJECT_RE.match(e.name) and not e.name.startswith(".")
        )
    return None


# ---------------------------------------------------------------- NIfTI release


def _nifti_stem(name: str) -> str | None:
    low = name.lower()
    for suffix in NIFTI_SUFFIXES:
        if low.endswith(suffix):
            return low[: -len(suffix)]
    return None


def discover_nifti(data_dir: Path) -> list[SubjectRecord]:
    """Subjects of a NIfTI tree: `BraTS20_Training_*` folders, `name_mapping.csv` beside them."""
    grades = read_grades(data_dir / "name_mapping.csv")
    records = []
    for sub in sorted(p for p in data_dir.iterdir() if p.is_dir() and SUBJECT_RE.match(p.name)):
        sid = sub.name
        found = [p for p in sorted(sub.iterdir()) if p.is_file()]
        mac = [p for p in found if p.name.startswith(MAC_PREFIX)]
        images = [(p, _nifti_stem(p.name)) for p in found if p not in mac]
        images = [(p, s) for p, s in images if s is not None]
        segs = [p for p, s in images if "seg" in s]
        if len(segs) != 1:
            what = (
                "no file" if not segs else f"{len(segs)} files ({', '.join(p.name for p in segs)})"
            )
            raise DataError(
                f"{sub}: {what} whose name contains 'seg'; keep exactly one segmentation "
                f"(normally {sid}_seg.nii)"
            )
        files: dict[str, Path] = {}
        for m in MODALITIES:
            hits = [p for p, s in images if "seg" not in s and s.endswith(f"_{m}")]
            if len(hits) != 1:
                what = (
                    "missing" if not hits else f"found {len(hits)} times ({[p.name for p in hits]})"
                )
                raise DataError(
                    f"{sub}: modality {m} is {what}; it must be one file named {sid}_{m}.nii "
                    "(or .nii.gz)"
                )
            files[m] = hits[0]
        files["seg"] = segs[0]
        notes: tuple[str, ...] = (MAC_NOTE,) if mac else ()
        if _nifti_stem(segs[0].name) != f"{sid}_seg".lower():
            notes += (f"segmentation read from non-standard file name {segs[0].name}",)
            log.info("%s: %s", sid, notes[-1])
        grade = grade_of(sid, grades, data_dir / "name_mapping.csv")
        records.append(SubjectRecord(sid, grade, "nifti", files, notes))
    skipped = sum(MAC_NOTE in r.notes for r in records)
    if skipped:
        log.info("%s: %s in %d subject folder(s)", data_dir, MAC_NOTE, skipped)
    return records


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The volume (header dtype, scaling applied when the header asks) and its affine."""

    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as err:  # noqa: BLE001 - nibabel raises many types for damaged files
        raise DataError(
            f"cannot read {path} ({why(err)}); the file is damaged or truncated: "
            "download or unpack it again"
        ) from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{path} holds a {data.ndim}-D array {data.shape}; expected one 3-D volume")
    if data.dtype.kind == "f" and np.isnan(data).any():
        raise DataError(f"{path} contains NaN voxels; BraTS volumes must be finite: re-export it")
    return data, img.affine


def _load_nifti(record: SubjectRecord) -> tuple[np.ndarray, np.ndarray]:
    keys = (*MODALITIES, "seg")
    loaded = {k: _read_nifti(record.files[k]) for k in keys}
    shapes = {k: v.shape for k, (v, _) in loaded.items()}
    if len(set(shapes.values())) > 1:
        raise DataError(
            f"{record.files['seg'].parent}: the five files of {record.subject_id} differ in shape "
            f"{shapes}; they must share one grid (re-export or resample them together)"
        )
    check_same_space({k: a for k, (_, a) in loaded.items()}, record.files)
    image = np.stack([loaded[m][0].astype(np.float32, copy=False) for m in MODALITIES])
    check_no_empty_modality(image, [str(record.files[m]) for m in MODALITIES])
    return image, check_seg(loaded["seg"][0], record.files["seg"])
