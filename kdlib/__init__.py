"""kdlib: helpers for the knowledge-distillation thesis workbook (BraTS2020 slice classification)."""

CLASSES: tuple[str, ...] = ("healthy", "HGG", "LGG")
"""Slice classes in label-index order; `LGG` is the minority class."""

MODALITIES: tuple[str, ...] = ("flair", "t1", "t1ce", "t2")
"""BraTS modalities in the canonical channel order used everywhere in kdlib."""

GRADES: tuple[str, ...] = ("HGG", "LGG")
MINORITY: str = "LGG"

__version__ = "0.1.0"
