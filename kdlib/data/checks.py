"""What the BraTS readers check in the files they read: CSV text encodings, whole-number labels,
empty modalities and the orientation of the volumes. Each check names the file and the fix."""

from __future__ import annotations

import codecs
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from kdlib.errors import DataError

log = logging.getLogger(__name__)

LABELS = (0, 1, 2, 4)
"""BraTS2020 segmentation labels: background, NCR/NET, edema, enhancing tumour."""
LABEL_TOLERANCE = 1e-3  # a float label this close to a whole number is that number


def read_csv(path: Path, **kw: Any) -> pd.DataFrame:
    """A CSV file as UTF-8 (a byte-order mark is fine) or UTF-16 with a byte-order mark (read with
    a warning); any other encoding or a malformed file is a DataError naming the file."""
    path = Path(path)
    encoding = "utf-8-sig"
    with open(path, "rb") as f:
        if f.read(2) in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
            encoding = "utf-16"
            log.warning("%s is UTF-16 text; reading it as such (save it as UTF-8 to silence this)",
                        path)
    try:
        return pd.read_csv(path, encoding=encoding, **kw)
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
            "save it as UTF-8 (Excel: 'CSV UTF-8'; or iconv -f WINDOWS-1252 -t UTF-8)"
        ) from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        first = (str(err).splitlines() or [""])[0]
        raise DataError(f"{path} is not a readable CSV table ({first}); fix or replace it") from None


def check_seg(seg: np.ndarray, where: Path | str) -> np.ndarray:
    """The segmentation as uint8 labels in LABELS; float files must hold whole numbers (a
    segmentation resampled with interpolation holds 1.5 or 3.6, which no rounding can repair)."""
    if seg.dtype.kind == "f":
        whole = np.rint(seg)
        off = np.abs(seg - whole) > LABEL_TOLERANCE
        if off.any():
            examples = sorted({round(float(v), 3) for v in seg[off][:1000]})[:5]
            raise DataError(
                f"{where}: segmentation holds {int(off.sum())} non-integer value(s) such as "
                f"{examples}; labels must be whole numbers {list(LABELS)}, so it was probably "
                "resampled with interpolation: re-export it with nearest-neighbour interpolation "
                "(or take the original BraTS file)"
            )
        seg = whole
    labels = np.unique(seg)
    bad = sorted(set(labels.tolist()) - set(LABELS))
    if bad:
        raise DataError(
            f"{where}: segmentation labels {bad} are not BraTS2020 labels {list(LABELS)} "
            "(BraTS2021+ data uses 3 for enhancing tumour: map 3 -> 4 first)"
        )
    return seg.astype(np.uint8)


def check_no_empty_modality(image: np.ndarray, sources: Sequence[str]) -> None:
    """DataError when one modality (channel) is all zeros while another is not: a failed export.
    sources[c] names where channel c came from."""
    empty = [c for c in range(len(image)) if not image[c].any()]
    if empty and len(empty) < len(image):
        raise DataError(
            f"{sources[empty[0]]} is all zeros while the subject's other modalities are not: a "
            f"failed export ({len(empty)} empty modality(ies)); export or download it again"
        )


def _axes(affine: np.ndarray) -> str:
    return "".join(nib.aff2axcodes(affine))


def check_same_space(affines: Mapping[str, np.ndarray], files: Mapping[str, Path]) -> None:
    """DataError when a volume's axes point another way than the first volume's (a flipped or
    swapped axis: voxel (i, j, k) is another place in each); a warning when only the origin or the
    voxel size differ."""
    first = next(iter(affines))
    ref = affines[first]
    for key, affine in affines.items():
        if np.allclose(affine, ref, atol=1e-3):
            continue
        if _axes(affine) != _axes(ref):
            raise DataError(
                f"{files[key]}: its voxel axes point {_axes(affine)} while {files[first].name} "
                f"points {_axes(ref)} (a flipped or swapped axis), so the volumes do not overlay; "
                "re-export the file in the images' orientation (nibabel.as_closest_canonical on "
                "all five files), or, if only its header is wrong, give it the images' affine"
            )
        log.warning("%s: affine differs from %s in origin or voxel size (axes agree); the voxel "
                    "grids are taken to correspond", files[key], files[first].name)
