"""The Kaggle H5 copy of BraTS2020: `volume_N_slice_M.h5` slices (`image` (X, Y, 4) z-scored per
slice, `mask` (X, Y, 3) one-hot planes) grouped into subjects through a volume -> subject mapping."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from kdlib import GRADES, MODALITIES
from kdlib.data.checks import check_no_empty_modality, read_csv
from kdlib.data.subjects import MAC_NOTE, MAC_PREFIX, SubjectRecord, grade_of, read_grades, why
from kdlib.errors import ConfigError, DataError

log = logging.getLogger(__name__)

H5_RE = re.compile(r"^volume_(\d+)_slice_(\d+)\.h5$")
MASK_LABELS = (1, 2, 4)
"""Label of each plane of the Kaggle H5 `mask` (disjoint one-hot planes)."""
_UP_DEPTH = 3  # how many folders above the slices name_mapping.csv is looked for


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
        table = read_csv(path)
        if not {"volume", "subject_id"} <= set(table.columns):
            raise DataError(
                f"{path} must have columns volume,subject_id (optional grade); "
                f"found {list(table.columns)}"
            )
        table["subject_id"] = table["subject_id"].astype(str).str.strip()
        per_volume = table.groupby("volume")["subject_id"].unique()
        if (per_volume.map(len) > 1).any():
            vol = per_volume.index[per_volume.map(len) > 1][0]
            raise DataError(
                f"{path} lists volume {vol} with different subjects "
                f"{list(per_volume[vol])}; keep one row per volume"
            )
        mapping = dict(zip(table["volume"].astype(int), table["subject_id"]))
        if "grade" in table.columns:
            given_grades = dict(zip(table["subject_id"], table["grade"]))
        source = str(path)
    missing = sorted(set(volumes) - set(mapping))
    if missing:
        raise DataError(
            f"H5 volumes {missing[:10]} have no subject in {source}; add them to the mapping"
        )
    by_subject: dict[str, list[int]] = {}
    for v in volumes:
        by_subject.setdefault(mapping[v], []).append(v)
    shared = {s: vs for s, vs in by_subject.items() if len(vs) > 1}
    if shared:
        sid, vols = next(iter(shared.items()))
        raise DataError(
            f"{source} sends several H5 volumes to one subject (e.g. volumes {vols} -> {sid}; "
            f"{len(shared)} subject(s) in all), which would merge their slices into one patient; "
            "give each volume its own subject_id"
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
    mac = 0
    for e in os.scandir(data_dir):
        m = H5_RE.match(e.name)
        if m:
            slices.setdefault(int(m[1]), {})[int(m[2])] = Path(e.path)
        mac += e.name.startswith(MAC_PREFIX)
    if not _check_meta(data_dir, slices):
        _check_slice_counts(data_dir, slices)
    mapping, note, given = _volume_map(volume_map, sorted(slices), data_dir)
    if mac:
        note += (MAC_NOTE,)
        log.info("%s: %s (%d files)", data_dir, MAC_NOTE, mac)
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
        grade = given[sid] if given else grade_of(sid, grades, data_dir / "name_mapping.csv")
        if grade not in GRADES:
            raise DataError(
                f"volume_map gives grade {grade!r} for {sid}; use one of {list(GRADES)}"
            )
        keyed = {f"slice_{z}": files[z] for z in sorted(files)}
        records.append(SubjectRecord(sid, grade, "h5", keyed, note, channel_order))
    return sorted(records, key=lambda r: r.subject_id)


def _find_upwards(start: Path, name: str) -> Path:
    for folder in (start, *list(start.parents)[:_UP_DEPTH]):
        if (folder / name).is_file():
            return folder / name
    return start / name  # read_grades reports it missing


def _check_meta(data_dir: Path, slices: dict[int, dict[int, Path]]) -> bool:
    """Cross-check meta_data.csv against the files (a missing file is an error); False if absent."""
    meta = data_dir / "meta_data.csv"
    if not meta.is_file():
        log.warning("%s has no meta_data.csv; using the .h5 files found", data_dir)
        return False
    table = read_csv(meta)
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
    return True


def _check_slice_counts(data_dir: Path, slices: dict[int, dict[int, Path]]) -> None:
    """Without meta_data.csv, volumes must have equal slice counts: else a last slice is missing."""
    counts = pd.Series({v: max(zs) + 1 for v, zs in slices.items()}, dtype=int)
    if counts.nunique() > 1:
        usual = int(counts.mode().max())
        odd = counts[counts != usual].sort_index()
        raise DataError(
            f"{data_dir}: volume_{odd.index[0]} has {odd.iloc[0]} slices while most volumes have "
            f"{usual} ({len(odd)} volume(s) differ), so a last slice may be missing; download "
            "the missing files, or add meta_data.csv (columns volume,slice) listing every slice"
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
        raise DataError(f"cannot read {path} ({why(err)}); download it again") from None
    if image.ndim != 3 or image.shape[2] != 4:
        raise DataError(f"{path}: image has shape {image.shape}; expected (X, Y, 4)")
    if mask.shape != image.shape[:2] + (3,):
        raise DataError(f"{path}: mask has shape {mask.shape}; expected {image.shape[:2] + (3,)}")
    if np.isnan(image).any():
        raise DataError(f"{path} contains NaN pixels; the slice must be finite: download it again")
    return image, mask


def load_h5(record: SubjectRecord) -> tuple[np.ndarray, np.ndarray]:
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
    image = np.stack(images, axis=-1)
    folder = record.files[keys[0]].parent
    stem = record.files[keys[0]].name.rsplit("_slice_", 1)[0]
    check_no_empty_modality(image, [f"{folder}/{stem}_slice_*.h5 channel "
                                    f"{record.channel_order.index(m)} ({m})" for m in MODALITIES])
    return image, np.stack(segs, axis=-1)
