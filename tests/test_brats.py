"""Readers of the BraTS2020 NIfTI tree and the Kaggle H5 slices."""

from __future__ import annotations

import gzip
import logging

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import synth_subjects

from kdlib import MODALITIES
from kdlib.data.brats import SubjectRecord, discover, load_subject
from kdlib.data.subjects import MAC_NOTE, reader_notes
from kdlib.errors import ConfigError, DataError


def test_discover_nifti_records(nifti_tree):
    tree = nifti_tree(n_hgg=2, n_lgg=1)
    records = discover(tree.root)
    assert [r.subject_id for r in records] == [s.subject_id for s in tree.subjects]
    assert [r.grade for r in records] == ["HGG", "HGG", "LGG"]
    r = records[0]
    assert isinstance(r, SubjectRecord) and r.fmt == "nifti" and r.notes == ()
    assert set(r.files) == {*MODALITIES, "seg"}
    assert r.files["t1"].name == "BraTS20_Training_001_t1.nii"  # not t1ce


@pytest.mark.parametrize("gz", [False, True])
def test_load_nifti_gives_the_written_arrays(nifti_tree, gz):
    tree = nifti_tree(n_hgg=1, n_lgg=1, gz=gz)
    for r in discover(tree.root):
        image, seg = load_subject(r)
        truth = tree[r.subject_id]
        assert image.dtype == np.float32 and image.shape == (4, 32, 32, 16)
        assert seg.dtype == np.uint8 and set(np.unique(seg)) <= {0, 1, 2, 4}
        np.testing.assert_array_equal(image, truth.image.astype(np.float32))
        np.testing.assert_array_equal(seg, truth.seg)


def test_root_may_be_a_parent_folder(nifti_tree, tmp_path):
    tree = nifti_tree()
    assert [r.subject_id for r in discover(tmp_path)] == [r.subject_id for r in discover(tree.root)]


def test_header_dtype_is_used_not_assumed(nifti_tree):
    tree = nifti_tree(n_hgg=1, n_lgg=0)
    r = discover(tree.root)[0]
    truth = tree.subjects[0].image[0].astype(np.float32) / 4 + 0.5
    nib.save(nib.Nifti1Image(truth, np.eye(4)), r.files["flair"])  # float32 on disk
    image, _ = load_subject(r)
    np.testing.assert_array_equal(image[0], truth)


def test_subject_355_segmentation_quirk(nifti_tree):
    tree = nifti_tree(subjects=synth_subjects(1, 1, first=354))
    rec = {r.subject_id: r for r in discover(tree.root)}["BraTS20_Training_355"]
    assert rec.files["seg"].name == "W39_1998.09.19_Segm.nii"
    assert any("W39_1998.09.19_Segm.nii" in n for n in rec.notes)
    np.testing.assert_array_equal(load_subject(rec)[1], tree["BraTS20_Training_355"].seg)


def _fit_residual(x: np.ndarray, y: np.ndarray) -> float:
    """Largest residual of the least-squares fit y ~ a x + b."""
    A = np.stack([x.ravel(), np.ones(x.size)], axis=1)
    coef = np.linalg.lstsq(A, y.ravel(), rcond=None)[0]
    return float(np.abs(A @ coef - y.ravel()).max())


def test_h5_and_nifti_give_the_same_subjects(nifti_tree, h5_tree):
    nifti = nifti_tree(n_hgg=2, n_lgg=1)
    h5 = h5_tree(subjects=nifti.subjects)
    a, b = discover(nifti.root, fmt="nifti"), discover(h5.root)
    assert [(r.subject_id, r.grade) for r in a] == [(r.subject_id, r.grade) for r in b]
    assert b[0].fmt == "h5" and list(b[0].files)[:3] == ["slice_0", "slice_1", "slice_2"]
    for ra, rb in zip(a, b):
        (ia, sa), (ib, sb) = load_subject(ra), load_subject(rb)
        assert ia.shape == ib.shape and ib.dtype == np.float32
        np.testing.assert_array_equal(sa, sb)
        assert (ib[ia == 0] == 0).all()  # restored zero background
        for c in range(4):
            for z in range(ia.shape[3]):
                assert _fit_residual(ia[c, :, :, z], ib[c, :, :, z]) < 1e-4


def test_h5_channel_order_is_a_setting(h5_tree, tmp_path):
    order = ("t1", "t1ce", "t2", "flair")
    a = h5_tree(n_hgg=1, n_lgg=0, parent=tmp_path / "a")
    b = h5_tree(n_hgg=1, n_lgg=0, parent=tmp_path / "b", channel_order=order)
    ia, _ = load_subject(discover(a.root)[0])
    ib, _ = load_subject(discover(b.root, channel_order=order)[0])
    np.testing.assert_array_equal(ia, ib)
    wrong, _ = load_subject(discover(b.root)[0])
    assert not np.array_equal(ia, wrong)
    with pytest.raises(ConfigError, match="channel_order"):
        discover(b.root, channel_order=("t1", "t1", "t2", "flair"))


def test_h5_default_mapping_is_noted_and_warned_once(h5_tree, caplog):
    tree = h5_tree(n_hgg=2, n_lgg=1)
    with caplog.at_level(logging.WARNING, logger="kdlib.data.brats"):
        records = discover(tree.root)
    assert all(any("unverified" in n for n in r.notes) for r in records)
    assert sum("unverified" in m for m in caplog.messages) == 1


def test_h5_explicit_volume_mapping(h5_tree, tmp_path):
    tree = h5_tree(n_hgg=1, n_lgg=1)
    mapping = tmp_path / "volumes.csv"
    pd.DataFrame(
        {"volume": [1, 2], "subject_id": ["BraTS20_Training_002", "BraTS20_Training_001"]}
    ).to_csv(mapping, index=False)
    records = discover(tree.root, volume_map=mapping)
    assert [(r.subject_id, r.grade) for r in records] == [
        ("BraTS20_Training_001", "HGG"),
        ("BraTS20_Training_002", "LGG"),
    ]
    assert records[0].files["slice_0"].name == "volume_2_slice_0.h5"
    assert not any("unverified" in n for r in records for n in r.notes)
    np.testing.assert_array_equal(load_subject(records[1])[1], tree["BraTS20_Training_001"].seg)
    pd.DataFrame({"volume": [1], "subject_id": ["BraTS20_Training_001"]}).to_csv(
        mapping, index=False
    )
    with pytest.raises(DataError, match=r"volumes \[2\]"):
        discover(tree.root, volume_map=mapping)


def test_h5_mapping_may_give_grades_and_may_be_a_dict(h5_tree, tmp_path):
    tree = h5_tree(n_hgg=1, n_lgg=1)
    (tree.root / "name_mapping.csv").unlink()
    mapping = tmp_path / "volumes.csv"
    pd.DataFrame({"volume": [1, 2], "subject_id": ["A", "B"], "grade": ["LGG", "HGG"]}).to_csv(
        mapping, index=False
    )
    assert [(r.subject_id, r.grade) for r in discover(tree.root, volume_map=mapping)] == [
        ("A", "LGG"),
        ("B", "HGG"),
    ]
    with pytest.raises(DataError, match="name_mapping.csv not found"):
        discover(tree.root, volume_map={1: "BraTS20_Training_001", 2: "BraTS20_Training_002"})


def test_fmt_choice_and_auto_detection(nifti_tree, h5_tree, tmp_path):
    nifti = nifti_tree(parent=tmp_path / "both")
    h5_tree(subjects=nifti.subjects, parent=tmp_path / "both")
    assert discover(tmp_path / "both")[0].fmt == "nifti"
    assert discover(tmp_path / "both", fmt="h5")[0].fmt == "h5"
    with pytest.raises(ConfigError, match="fmt"):
        discover(tmp_path / "both", fmt="dicom")


# ---------------------------------------------------------------- bad input


def _subject_dir(tree, i=0):
    return tree.root / tree.subjects[i].subject_id


def test_missing_modality(nifti_tree):
    tree = nifti_tree()
    (_subject_dir(tree) / "BraTS20_Training_001_t1ce.nii").unlink()
    with pytest.raises(DataError, match=r"BraTS20_Training_001.*modality t1ce is missing"):
        discover(tree.root)


def test_two_segmentation_candidates(nifti_tree):
    tree = nifti_tree()
    d = _subject_dir(tree)
    (d / "old_seg.nii").write_bytes((d / "BraTS20_Training_001_seg.nii").read_bytes())
    with pytest.raises(DataError, match=r"2 files .*old_seg.nii"):
        discover(tree.root)


def test_no_segmentation(nifti_tree):
    tree = nifti_tree()
    (_subject_dir(tree, 1) / "BraTS20_Training_002_seg.nii").unlink()
    with pytest.raises(DataError, match=r"BraTS20_Training_002: no file whose name contains 'seg'"):
        discover(tree.root)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "truncated_gz"])
def test_unreadable_nifti(nifti_tree, damage):
    tree = nifti_tree(gz=damage == "truncated_gz")
    r = discover(tree.root)[0]
    path = r.files["t2"]
    data = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"not a nifti file at all")
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(gzip.compress(gzip.decompress(data)[:1000]))
    with pytest.raises(DataError, match=rf"cannot read .*{path.name}.*damaged or truncated"):
        load_subject(r)


def test_shapes_differ_within_subject(nifti_tree):
    tree = nifti_tree()
    r = discover(tree.root)[0]
    nib.save(nib.Nifti1Image(np.ones((32, 32, 15), np.int16), np.eye(4)), r.files["t2"])
    with pytest.raises(DataError, match="the five files of BraTS20_Training_001 differ in shape"
                       ) as err:
        load_subject(r)
    assert str(err.value).startswith(f"{r.files['t2'].parent}: ")  # names the folder


def test_nan_voxels(nifti_tree):
    tree = nifti_tree()
    r = discover(tree.root)[0]
    v = tree.subjects[0].image[0].astype(np.float32)
    v[10, 10, 5] = np.nan
    nib.save(nib.Nifti1Image(v, np.eye(4)), r.files["flair"])
    with pytest.raises(DataError, match=r"_flair.nii contains NaN"):
        load_subject(r)


def test_bad_segmentation_label(nifti_tree):
    tree = nifti_tree()
    r = discover(tree.root)[0]
    seg = tree.subjects[0].seg.copy()
    seg[seg == 4] = 3
    nib.save(nib.Nifti1Image(seg, np.eye(4)), r.files["seg"])
    with pytest.raises(DataError, match=r"labels \[3\]"):
        load_subject(r)


def test_subject_absent_from_name_mapping(nifti_tree):
    tree = nifti_tree()
    csv = tree.root / "name_mapping.csv"
    table = pd.read_csv(csv)
    table[table["BraTS_2020_subject_ID"] != "BraTS20_Training_002"].to_csv(csv, index=False)
    with pytest.raises(DataError, match="BraTS20_Training_002 is not listed in .*name_mapping.csv"):
        discover(tree.root)


def test_name_mapping_without_grade(nifti_tree):
    tree = nifti_tree()
    csv = tree.root / "name_mapping.csv"
    pd.read_csv(csv).drop(columns="Grade").to_csv(csv, index=False)
    with pytest.raises(DataError, match=r"lacks column\(s\) \['Grade'\]"):
        discover(tree.root)


def test_name_mapping_missing(nifti_tree):
    tree = nifti_tree()
    (tree.root / "name_mapping.csv").unlink()
    with pytest.raises(DataError, match="name_mapping.csv not found"):
        discover(tree.root)


def test_survival_info_is_optional(nifti_tree):
    tree = nifti_tree()
    (tree.root / "survival_info.csv").unlink()
    assert len(discover(tree.root)) == 3


def test_h5_without_image(h5_tree):
    tree = h5_tree(n_hgg=1, n_lgg=0)
    path = tree.root / "volume_1_slice_3.h5"
    with h5py.File(path, "w") as f:
        f["mask"] = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(DataError, match=r"volume_1_slice_3.h5 lacks dataset\(s\) \['image'\]"):
        load_subject(discover(tree.root)[0])


def test_h5_wrong_shape(h5_tree):
    tree = h5_tree(n_hgg=1, n_lgg=0)
    path = tree.root / "volume_1_slice_2.h5"
    with h5py.File(path, "w") as f:
        f["image"], f["mask"] = np.zeros((32, 32, 3)), np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(DataError, match=r"volume_1_slice_2.h5: image has shape \(32, 32, 3\)"):
        load_subject(discover(tree.root)[0])


def test_h5_missing_slice_file(h5_tree):
    tree = h5_tree(n_hgg=1, n_lgg=0)
    (tree.root / "volume_1_slice_4.h5").unlink()
    with pytest.raises(DataError, match="volume_1_slice_4.h5"):
        discover(tree.root)
    (tree.root / "meta_data.csv").unlink()
    with pytest.raises(DataError, match=r"volume_1 lacks slice file\(s\) \[4\]"):
        discover(tree.root)


def test_no_subjects_found(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DataError, match="no subjects found"):
        discover(tmp_path / "empty")
    with pytest.raises(DataError, match="does not exist"):
        discover(tmp_path / "nowhere")


# ---------------------------------------------------------------- inputs accepted silently before


def test_float_segmentation_must_hold_whole_labels(nifti_tree):
    tree = nifti_tree()
    r = discover(tree.root)[0]
    seg = tree.subjects[0].seg.astype(np.float32)
    nib.save(nib.Nifti1Image(seg, np.eye(4)), r.files["seg"])  # float but whole: fine
    np.testing.assert_array_equal(load_subject(r)[1], tree.subjects[0].seg)
    seg[seg == 1] = 1.5  # e.g. resampled with linear interpolation
    seg.flat[np.flatnonzero(seg == 2)[:3]] = 3.6
    nib.save(nib.Nifti1Image(seg, np.eye(4)), r.files["seg"])
    with pytest.raises(DataError, match=r"_seg.nii: segmentation holds \d+ non-integer value\(s\) "
                                        r"such as \[1.5, 3.6\].*nearest-neighbour"):
        load_subject(r)


def _append_rows(csv, rows):
    with open(csv, "a") as f:
        f.writelines(",".join(row) + "\n" for row in rows)


def test_name_mapping_with_one_subject_graded_twice(nifti_tree):
    tree = nifti_tree()
    csv = tree.root / "name_mapping.csv"
    _append_rows(csv, [["HGG", "NA", "NA", "NA", "NA", "BraTS20_Training_001"]])  # same grade
    assert [r.grade for r in discover(tree.root)] == ["HGG", "HGG", "LGG"]
    _append_rows(csv, [["LGG", "NA", "NA", "NA", "NA", "BraTS20_Training_001"]])
    with pytest.raises(DataError, match=r"name_mapping.csv gives 1 subject\(s\) two different "
                                        r"grades, e.g. BraTS20_Training_001 on lines \[2, 5, 6\] "
                                        r"\(HGG and LGG\); keep one row per subject"):
        discover(tree.root)


def test_an_all_zero_modality_is_a_failed_export(nifti_tree, h5_tree, tmp_path):
    tree = nifti_tree()
    r = discover(tree.root)[1]
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 16), np.int16), np.eye(4)), r.files["t1ce"])
    with pytest.raises(DataError, match=r"BraTS20_Training_002_t1ce.nii is all zeros while the "
                                        "subject's other modalities are not: a failed export"):
        load_subject(r)
    blank = synth_subjects(1, 0)
    blank[0].image[1] = 0  # t1 never exported
    h5 = h5_tree(subjects=blank, channel_order=("t1", "t1ce", "t2", "flair"), parent=tmp_path / "b")
    rec = discover(h5.root, channel_order=("t1", "t1ce", "t2", "flair"))[0]
    with pytest.raises(DataError, match=r"volume_1_slice_\*.h5 channel 0 \(t1\) is all zeros"):
        load_subject(rec)


def test_h5_volume_mapping_that_merges_two_volumes(h5_tree, tmp_path):
    tree = h5_tree(n_hgg=2, n_lgg=1)
    mapping = tmp_path / "volumes.csv"
    mapping.write_text("volume,subject_id\n1,BraTS20_Training_001\n2,BraTS20_Training_001\n"
                       "3,BraTS20_Training_003\n")
    with pytest.raises(DataError, match=r"volumes.csv sends several H5 volumes to one subject "
                                        r"\(e.g. volumes \[1, 2\] -> BraTS20_Training_001"):
        discover(tree.root, volume_map=mapping)
    with pytest.raises(DataError, match="volume_map setting sends several H5 volumes"):
        discover(tree.root, volume_map={1: "A", 2: "B", 3: "A"})
    mapping.write_text("volume,subject_id\n1,A\n2,B\n3,C\n1,D\n")
    with pytest.raises(DataError, match=r"volumes.csv lists volume 1 with different subjects "
                                        r"\['A', 'D'\]"):
        discover(tree.root, volume_map=mapping)


def test_name_mapping_in_another_encoding(nifti_tree, caplog):
    tree = nifti_tree()
    csv = tree.root / "name_mapping.csv"
    text = csv.read_text()
    csv.write_bytes(text.encode("utf-8-sig"))  # Excel's "CSV UTF-8"
    assert len(discover(tree.root)) == 3
    csv.write_bytes(text.encode("utf-16"))  # Notepad's "Unicode", with a byte-order mark
    with caplog.at_level(logging.WARNING, logger="kdlib.data.checks"):
        assert [r.grade for r in discover(tree.root)] == ["HGG", "HGG", "LGG"]
    assert any("name_mapping.csv is UTF-16 text" in m for m in caplog.messages)
    csv.write_bytes(text.replace("NA,NA,NA,NA,BraTS20_Training_002",
                                 "NA,NA,Señora,NA,BraTS20_Training_002").encode("cp1252"))
    with pytest.raises(DataError, match=r"name_mapping.csv is not UTF-8 text \(byte 0xf1 at "
                                        r"offset \d+\); save it as UTF-8"):
        discover(tree.root)


def test_segmentation_in_another_orientation(nifti_tree, caplog):
    tree = nifti_tree()
    r = discover(tree.root)[0]
    seg = tree.subjects[0].seg
    flipped = np.diag([-1.0, 1, 1, 1])
    flipped[0, 3] = 31  # the same shape and extent, first axis reversed
    nib.save(nib.Nifti1Image(seg[::-1], flipped), r.files["seg"])
    with pytest.raises(DataError, match=r"_seg.nii: its voxel axes point LAS while "
                                        r"BraTS20_Training_001_flair.nii points RAS"):
        load_subject(r)
    shifted = np.eye(4)
    shifted[:3, 3] = [-120, -120, 0]  # same axes, another origin: may be a valid export
    nib.save(nib.Nifti1Image(seg, shifted), r.files["seg"])
    with caplog.at_level(logging.WARNING, logger="kdlib.data.checks"):
        np.testing.assert_array_equal(load_subject(r)[1], seg)
    assert any("_seg.nii: affine differs" in m for m in caplog.messages)


def test_h5_volumes_of_different_length_without_meta_data(h5_tree):
    tree = h5_tree(n_hgg=2, n_lgg=1, meta=False)
    assert len(discover(tree.root)) == 3
    (tree.root / "volume_2_slice_15.h5").unlink()  # the last slice of volume 2 never arrived
    with pytest.raises(DataError, match=r"volume_2 has 15 slices while most volumes have 16 "
                                        r"\(1 volume\(s\) differ\).*add meta_data.csv"):
        discover(tree.root)
    rows = [(f"/content/data/volume_{v}_slice_{z}.h5", 0, v, z) for v in (1, 2, 3)
            for z in range(15 if v == 2 else 16)]
    pd.DataFrame(rows, columns=["slice_path", "target", "volume", "slice"]).to_csv(
        tree.root / "meta_data.csv", index=False)  # meta_data.csv says volume 2 has 15
    assert [len(r.files) for r in discover(tree.root)] == [16, 15, 16]


APPLE_DOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(4066)


def test_macos_metadata_files_are_skipped_with_a_note(nifti_tree, h5_tree, tmp_path):
    tree = nifti_tree()
    for s in tree.subjects[:2]:
        for name in (f"{s.subject_id}_t1.nii", f"{s.subject_id}_seg.nii"):
            (tree.root / s.subject_id / f"._{name}").write_bytes(APPLE_DOUBLE)
    (tree.root / "._name_mapping.csv").write_bytes(APPLE_DOUBLE)
    records = discover(tree.root)
    assert [MAC_NOTE in r.notes for r in records] == [True, True, False]
    assert records[0].files["t1"].name == "BraTS20_Training_001_t1.nii"
    np.testing.assert_array_equal(load_subject(records[0])[1], tree.subjects[0].seg)
    h5 = h5_tree(n_hgg=1, n_lgg=0, parent=tmp_path / "h5mac")
    (h5.root / "._volume_1_slice_0.h5").write_bytes(APPLE_DOUBLE)
    (h5.root / "._meta_data.csv").write_bytes(APPLE_DOUBLE)
    rec = discover(h5.root)[0]
    assert MAC_NOTE in rec.notes and len(rec.files) == 16
    load_subject(rec)


def test_reader_notes_are_grouped_for_printing(nifti_tree, h5_tree, tmp_path):
    tree = nifti_tree(subjects=synth_subjects(2, 1, first=354))
    lines = reader_notes(discover(tree.root))
    assert lines == [("BraTS20_Training_355: segmentation read from non-standard file name "
                      "W39_1998.09.19_Segm.nii")]
    h5 = h5_tree(n_hgg=3, n_lgg=2, parent=tmp_path / "h5")
    lines = reader_notes(discover(h5.root))
    assert len(lines) == 1 and lines[0].startswith(
        "5 subjects (BraTS20_Training_001 ... BraTS20_Training_005): grade assumes H5 volume_N")
