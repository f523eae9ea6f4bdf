"""A BraTS subject on disk (`SubjectRecord`), its grade from name_mapping.csv, and the readers'
notes: what the NIfTI and H5 readers (kdlib.data.brats, kdlib.data.brats_h5) share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdlib import GRADES, MODALITIES
from kdlib.data.checks import read_csv
from kdlib.errors import DataError

MAC_PREFIX = "._"  # AppleDouble metadata files that macOS writes beside copied files
MAC_NOTE = "skipped macOS metadata files named ._* (not data)"


@dataclass(frozen=True)
class SubjectRecord:
    """One subject on disk: its id, grade, format, files and anything unusual the reader noticed."""

    subject_id: str
    grade: str
    fmt: str
    files: dict[str, Path]
    notes: tuple[str, ...] = ()
    channel_order: tuple[str, ...] = MODALITIES  # h5 only: modality of each stored channel


def reader_notes(records: Sequence[SubjectRecord]) -> list[str]:
    """Each distinct note of the readers once, with the subjects it concerns (for printing)."""
    by_note: dict[str, list[str]] = {}
    for r in records:
        for note in r.notes:
            by_note.setdefault(note, []).append(r.subject_id)
    lines = []
    for note, ids in by_note.items():
        who = ", ".join(ids) if len(ids) <= 3 else f"{len(ids)} subjects ({ids[0]} ... {ids[-1]})"
        lines.append(f"{who}: {note}")
    return lines


def why(err: Exception) -> str:
    """`Type: first line of the message` of an exception, for one-line errors."""
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"


def read_grades(csv: Path) -> dict[str, str]:
    """Subject id -> grade from `name_mapping.csv` (columns Grade, BraTS_2020_subject_ID)."""
    if not csv.is_file():
        raise DataError(
            f"{csv} not found: the grades come from name_mapping.csv; copy it from the BraTS2020 "
            "release into this folder"
        )
    table = read_csv(csv, dtype=str, skipinitialspace=True)
    table.columns = [c.strip() for c in table.columns]
    missing = [c for c in ("Grade", "BraTS_2020_subject_ID") if c not in table.columns]
    if missing:
        raise DataError(
            f"{csv} lacks column(s) {missing} (found {list(table.columns)}); use the original "
            "name_mapping.csv whose header starts with Grade,...,BraTS_2020_subject_ID"
        )
    ids, grade = table["BraTS_2020_subject_ID"].str.strip(), table["Grade"].str.strip()
    per_subject = grade.groupby(ids).unique()
    conflict = per_subject[per_subject.map(len) > 1]
    if len(conflict):
        sid = conflict.index[0]
        rows = [int(i) + 2 for i in np.flatnonzero(ids == sid)]  # line numbers; header: line 1
        raise DataError(
            f"{csv} gives {len(conflict)} subject(s) two different grades, e.g. {sid} on lines "
            f"{rows} ({' and '.join(map(str, conflict.iloc[0]))}); keep one row per subject with its grade"
        )
    grades = dict(zip(ids, grade))
    bad = {s: g for s, g in grades.items() if g not in GRADES}
    if bad:
        raise DataError(
            f"{csv}: grade must be one of {list(GRADES)}, found {dict(list(bad.items())[:5])}"
        )
    return grades


def grade_of(subject_id: str, grades: dict[str, str], csv: Path) -> str:
    """The grade of `subject_id`, or a DataError saying how to add it to `csv`."""
    if subject_id not in grades:
        raise DataError(
            f"subject {subject_id} is not listed in {csv}; add a row for it (Grade HGG or LGG) "
            "or remove its folder"
        )
    return grades[subject_id]
