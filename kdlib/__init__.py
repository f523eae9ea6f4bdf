"""kdlib: helpers for the knowledge-distillation thesis workbook (BraTS2020 slice classification)."""

import os

from kdlib.quiet import LOG_ENV, in_worker

CLASSES: tuple[str, ...] = ("healthy", "HGG", "LGG")
"""Slice classes in label-index order; `LGG` is the minority class."""

MODALITIES: tuple[str, ...] = ("flair", "t1", "t1ce", "t2")
"""BraTS modalities in the canonical channel order used everywhere in kdlib."""

GRADES: tuple[str, ...] = ("HGG", "LGG")
MINORITY: str = "LGG"

__version__ = "0.1.0"

if os.environ.get(LOG_ENV):  # a worker process of a notebook that called quiet.per_notebook()
    in_worker()
