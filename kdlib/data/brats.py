"""Find and read BraTS2020 training subjects: the NIfTI release and the Kaggle H5 slices.

Both readers give the same `SubjectRecord` and the same `load_subject` output, so everything
downstream is format-blind. The file layouts are described in the README, "The real BraTS2020";
the labels are those of the BraTS benchmark (Menze et al., IEEE TMI 2015; Bakas et al. 2018).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pandas as pd

from kdlib import GRADES, MODALITIES
from kdlib.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SUBJECT_RE = re.compile(r"^BraTS20_Training_\d+$")
H5_RE = re.compile(r"^volume_(\d+)_slice_(\d+)\.h5$")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
LABELS = (0, 1, 2, 4)
"""BraTS2020 segmentation labels: background, NCR/NET, edema, enhancing tumour."""
MASK_LABELS = (1, 2, 4)
"""Label of each plane of the Kaggle H5 `mask` (disjoint one-hot planes)."""
_SEARCH_DEPTH = 3  # how far below `root` discover() looks for the dataset folder


@dataclass(frozen=True)
class SubjectRecord:
    """One subject on disk: its id, grade, format, files and anything unusual the reader noticed."""

    subject_id: str
    grade: str
    fmt: str
    files: dict[str, Path]
    notes: tuple[str, ...] = ()
    channel_order: tuple[str, ...] = MODALITIES  # h5 only: modality of each stored channel


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
        return _load_h5(record)
    raise DataError(f"{record.subject_id}: unknown format {record.fmt!r}; expected 'nifti' or 'h5'")


def _why(err: Exception) -> str:
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"


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


def read_grades(csv: Path) -> dict[str, str]:
    """Subject id -> grade from `name_mapping.csv` (columns Grade, BraTS_2020_subject_ID)."""
    if not csv.is_file():
        raise DataError(
            f"{csv} not found: the grades come from name_mapping.csv; copy it from the BraTS2020 "
            "release into this folder"
        )
    table = pd.read_csv(csv, dtype=str, skipinitialspace=True)
    table.columns = [c.strip() for c in table.columns]
    missing = [c for c in ("Grade", "BraTS_2020_subject_ID") if c not in table.columns]
    if missing:
        raise DataError(
            f"{csv} lacks column(s) {missing} (found {list(table.columns)}); use the original "
            "name_mapping.csv whose header starts with Grade,...,BraTS_2020_subject_ID"
        )
    grades = dict(zip(table["BraTS_2020_subject_ID"].str.strip(), table["Grade"].str.strip()))
    bad = {s: g for s, g in grades.items() if g not in GRADES}
    if bad:
        raise DataError(
            f"{csv}: grade must be one of {list(GRADES)}, found {dict(list(bad.items())[:5])}"
        )
    return grades


def _grade_of(subject_id: str, grades: dict[str, str], csv: Path) -> str:
    if subject_id not in grades:
        raise DataError(
            f"subject {subject_id} is not listed in {csv}; add a row for it (Grade HGG or LGG) "
            "or remove its folder"
        )
    return grades[subject_id]


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
        images = [(p, _nifti_stem(p.name)) for p in sorted(sub.iterdir()) if p.is_file()]
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
        notes = ()
        if _nifti_stem(segs[0].name) != f"{sid}_seg".lower():
            notes = (f"segmentation read from non-standard file name {segs[0].name}",)
            log.info("%s: %s", sid, notes[0])
        grade = _grade_of(sid, grades, data_dir / "name_mapping.csv")
        records.append(SubjectRecord(sid, grade, "nifti", files, notes))
    return records


def _read_nifti(path: Path) -> np.ndarray:

    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)  # header dtype, scaling applied when the header asks
    except Exception as err:  # noqa: BLE001 - nibabel raises many types for damaged files
        raise DataError(
            f"cannot read {path} ({_why(err)}); the file is damaged or truncated: "
            "download or unpack it again"
        ) from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{path} holds a {data.ndim}-D array {data.shape}; expected one 3-D volume")
    if data.dtype.kind == "f" and np.isnan(data).any():
        raise DataError(f"{path} contains NaN voxels; BraTS volumes must be finite: re-export it")
    return data


def _load_nifti(record: SubjectRecord) -> tuple[np.ndarray, np.ndarray]:
    volumes = {k: _read_nifti(record.files[k]) for k in (*MODALITIES, "seg")}
    shapes = {k: v.shape for k, v in volumes.items()}
    if len(set(shapes.values())) > 1:
        raise DataError(
            f"{record.subject_id}: volumes differ in shape {shapes}; all five files of a subject "
            "must share one grid (re-export or resample them together)"
        )
    image = np.stack([volumes[m].astype(np.float32, copy=False) for m in MODALITIES])
    return image, _check_seg(volumes["seg"], record.files["seg"])


def _check_seg(seg: np.ndarray, where: Path | str) -> np.ndarray:
    if seg.dtype.kind == "f":
        seg = np.rint(seg)
    labels = np.unique(seg)
    bad = sorted(set(labels.tolist()) - set(LABELS))
    if bad:
        raise DataError(
            f"{where}: segmentation labels {bad} are not BraTS2020 labels {list(LABELS)} "
            "(BraTS2021+ data uses 3 for enhancing tumour: map 3 -> 4 first)"
        )
    return seg.astype(np.uint8)


# ---------------------------------------------------------------- Kaggle H5 slices


def _volume_map(
    volume_map, volumes: list[int], data_dir: Path
) -> tuple[dict[int, str], tuple, dict]:
    """Volume number -> subject id, the note to attach, and grades given by the mapping (if any)."""
    if volume_map is None:
        note = (
            (
                "grade assumes H5 volume_N is BraTS20_Training_N (unverified convention); pass "
                "volume_map=CSV with columns volume,subject_id to state the mapping"
            ),
        )
        log.warning(
            "%s: H5 volumes mapped to subjects by the unverified convention volume_N -> "
            "BraTS20_Training_{N:03d}; pass volume_map (CSV: volume,subject_id) if yours differs",
            data_dir,
        )
        return {v: f"BraTS20_Training_{v:03d}" for v in volumes}, note, {}
    given_grades: dict[str, str] = {}
    if isinstance(volume_map, Mapping):
        mapping = {int(k): str(v) for k, v in volume_map.items()}
        source = "the volume_map setting"
    else:
        path = Path(volume_map)
        if not path.is_file():
            raise DataError(
                f"volume_map file {path} not found; give a CSV with columns volume,subject_id"
            )
        table = pd.read_csv(path)
        if not {"volume", "subject_id"} <= set(table.columns):
            raise DataError(
                f"{path} must have columns volume,subject_id (optional grade); "
                f"found {list(table.columns)}"
            )
        mapping = dict(
            zip(table["volume"].astype(int), table["subject_id"].astype(str).str.strip())
        )
        if "grade" in table.columns:
            given_grades = dict(zip(table["subject_id"].astype(str).str.strip(), table["grade"]))
        source = str(path)
    missing = sorted(set(volumes) - set(mapping))
    if missing:
        raise DataError(
            f"H5 volumes {missing[:10]} have no subject in {source}; add them to the mapping"
        )
    return mapping, (f"subject id from volume mapping {source}",), given_grades


def discover_h5(
    data_dir: Path,
    channel_order: Sequence[str] = MODALITIES,
    volume_map: str | Path | Mapping[int, str] | None = None,
) -> list[SubjectRecord]:
    """Subjects of the Kaggle slices: `volume_N_slice_M.h5` files, grouped by N, ordered by M.

    channel_order names the modality of each stored channel (default FLAIR, T1, T1ce, T2, as
    measured on the Kaggle files). Grades come from name_mapping.csv via `volume_map`
    (volume number -> subject id); without it volume N is assumed to be BraTS20_Training_{N:03d}.
    """
    channel_order = tuple(channel_order)
    if sorted(channel_order) != sorted(MODALITIES):
        raise ConfigError(
            f"channel_order={list(channel_order)} must order exactly {list(MODALITIES)}"
        )
    slices: dict[int, dict[int, Path]] = {}
    for e in os.scandir(data_dir):
        m = H5_RE.match(e.name)
        if m:
            slices.setdefault(int(m[1]), {})[int(m[2])] = Path(e.path)
    _check_meta(data_dir, slices)
    mapping, note, given = _volume_map(volume_map, sorted(slices), data_dir)
    grades = None if given else read_grades(_find_upwards(data_dir, "name_mapping.csv"))
    records = []
    for vol, files in slices.items():
        gaps = sorted(set(range(max(files) + 1)) - set(files))
        if gaps:
            raise DataError(
                f"{data_dir}: volume_{vol} lacks slice file(s) {gaps[:10]}; "
                "the download is incomplete"
            )
        sid = mapping[vol]
        grade = given[sid] if given else _grade_of(sid, grades, data_dir / "name_mapping.csv")
        if grade not in GRADES:
            raise DataError(
                f"volume_map gives grade {grade!r} for {sid}; use one of {list(GRADES)}"
            )
        keyed = {f"slice_{z}": files[z] for z in sorted(files)}
        records.append(SubjectRecord(sid, grade, "h5", keyed, note, channel_order))
    return sorted(records, key=lambda r: r.subject_id)


def _find_upwards(start: Path, name: str) -> Path:
    for folder in (start, *list(start.parents)[:_SEARCH_DEPTH]):
        if (folder / name).is_file():
            return folder / name
    return start / name  # read_grades reports it missing


def _check_meta(data_dir: Path, slices: dict[int, dict[int, Path]]) -> None:
    """Cross-check meta_data.csv (when present) against the files: a missing file is an error."""
    meta = data_dir / "meta_data.csv"
    if not meta.is_file():
        log.warning("%s has no meta_data.csv; using the .h5 files found", data_dir)
        return
    table = pd.read_csv(meta)
    if not {"volume", "slice"} <= set(table.columns):
        raise DataError(f"{meta} must have columns volume and slice; found {list(table.columns)}")
    listed = set(zip(table["volume"].astype(int), table["slice"].astype(int)))
    present = {(v, z) for v, zs in slices.items() for z in zs}
    lost = sorted(listed - present)
    if lost:
        raise DataError(
            f"{len(lost)} slice file(s) listed in {meta} are missing, e.g. "
            f"volume_{lost[0][0]}_slice_{lost[0][1]}.h5; the download is incomplete"
        )


def _read_h5_slice(path: Path) -> tuple[np.ndarray, np.ndarray]:

    try:
        with h5py.File(path, "r") as f:
            if "image" not in f or "mask" not in f:
                raise DataError(
                    f"{path} lacks dataset(s) {[k for k in ('image', 'mask') if k not in f]} "
                    f"(has {list(f)}); a Kaggle BraTS2020 slice holds 'image' and 'mask'"
                )
            image, mask = f["image"][()], f["mask"][()]
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - h5py raises OSError, KeyError, ValueError...
        raise DataError(f"cannot read {path} ({_why(err)}); download it again") from None
    if image.ndim != 3 or image.shape[2] != 4:
        raise DataError(f"{path}: image has shape {image.shape}; expected (X, Y, 4)")
    if mask.shape != image.shape[:2] + (3,):
        raise DataError(f"{path}: mask has shape {mask.shape}; expected {image.shape[:2] + (3,)}")
    if np.isnan(image).any():
        raise DataError(f"{path} contains NaN pixels; the slice must be finite: download it again")
    return image, mask


def _load_h5(record: SubjectRecord) -> tuple[np.ndarray, np.ndarray]:
    """Stack the slices; restore the zero background (each slice/channel minus its minimum).

    The Kaggle slices are z-scored per slice over the full frame, so the background holds the
    slice minimum; subtracting it gives background 0 and brain > 0, a per-slice affine transform
    of the original intensities (the original scale cannot be recovered).
    """
    order = [record.channel_order.index(m) for m in MODALITIES]
    keys = sorted(record.files, key=lambda k: int(k.split("_")[1]))
    images, segs = [], []
    for k in keys:
        path = record.files[k]
        image, mask = _read_h5_slice(path)
        if images and image.shape[:2] != images[0].shape[1:]:
            raise DataError(
                f"{path}: image shape {image.shape[:2]} differs from the subject's first slice "
                f"{images[0].shape[1:]}; all slices of a volume must share one frame"
            )
        image = image[..., order].transpose(2, 0, 1)
        images.append((image - image.min(axis=(1, 2), keepdims=True)).astype(np.float32))
        planes = mask > 0
        if (planes.sum(axis=2) > 1).any():
            raise DataError(f"{path}: mask planes overlap; they must be disjoint one-hot planes")
        segs.append((planes * np.array(MASK_LABELS, dtype=np.uint8)).sum(axis=2).astype(np.uint8))
    return np.stack(images, axis=-1), np.stack(segs, axis=-1)
