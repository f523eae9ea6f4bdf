"""One phantom subject at the real BraTS2020 shape, in both layouts, read back by kdlib.data.brats."""

from __future__ import annotations

import numpy as np

from kdlib.data.brats import discover, load_subject
from kdlib.data.phantom import REAL_SHAPE, PhantomConfig, phantom_subject
from kdlib.data.phantom_files import make_phantom


def test_real_shape_subject_in_both_layouts(tmp_path):
    cfg = PhantomConfig(n_hgg=1, n_lgg=0, write_h5=True)
    assert cfg.shape == REAL_SHAPE == (240, 240, 155)
    make_phantom(tmp_path, cfg, progress=False)
    truth_image, truth_seg = phantom_subject(1, "HGG", cfg)
    (nifti,), (h5,) = discover(tmp_path, fmt="nifti"), discover(tmp_path, fmt="h5")
    assert nifti.subject_id == h5.subject_id == "BraTS20_Training_001"
    assert nifti.grade == h5.grade == "HGG"
    image, seg = load_subject(nifti)
    assert image.shape == (4, 240, 240, 155) and image.dtype == np.float32
    np.testing.assert_array_equal(image, truth_image)
    np.testing.assert_array_equal(seg, truth_seg)
    h5_image, h5_seg = load_subject(h5)
    assert h5_image.shape == (4, 240, 240, 155)
    np.testing.assert_array_equal(h5_seg, truth_seg)
    assert np.array_equal(h5_image > 0, truth_image > 0)
    # real-like size: tumour over ~40-100 of 155 slices, 40-350 cm3, edema the largest part
    tumour_slices = int((seg > 0).any(axis=(0, 1)).sum())
    volumes = {lab: int((seg == lab).sum()) / 1000 for lab in (1, 2, 4)}
    assert 40 <= tumour_slices <= 100, tumour_slices
    assert 40 <= sum(volumes.values()) <= 350, volumes
    assert volumes[2] == max(volumes.values())
    assert 120 <= int((image[0] > 0).any(axis=(0, 1)).sum()) <= 155  # brain fills most slices
