"""The data sources, one table shared by training and evaluation.

A run's ``data.source`` (and ``ddpm eval --reference``) names a source of :data:`SOURCES`
(``fashion-mnist``; ``fashion-mnist-test`` names its test split) or is a folder of PNG/JPEG
images (``root/<class>/...`` for classes). Adding a source is one entry here: a function for its
images, one for its labels, its class names.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Literal, NamedTuple

import torch
import torch.nn.functional as F

from ..errors import DdpmError
from .readers import (FASHION_MNIST_CLASSES, Labeled, _check_shape_args, _image_files, folder_classes,
                      load_fashion_mnist, load_fashion_mnist_labels, load_image_folder, load_image_folder_labeled)

Split = Literal["train", "test"]
SPLITS: tuple[Split, ...] = ("train", "test")
Reader = Callable[[Split, "str | Path | None", bool], torch.Tensor]  # (split, data_dir, download) -> tensor


class DataSource(NamedTuple):
    images: Reader  # uint8 (N, C, H, W) at the source's own size
    labels: Reader  # int64 (N,), indices into classes
    classes: tuple[str, ...]
    summary: str


def _fmnist_images(split: Split, data_dir: str | Path | None, download: bool) -> torch.Tensor:
    return load_fashion_mnist(split, data_dir, download=download)


def _fmnist_labels(split: Split, data_dir: str | Path | None, download: bool) -> torch.Tensor:
    return load_fashion_mnist_labels(split, data_dir, download=download)


SOURCES: dict[str, DataSource] = {
    "fashion-mnist": DataSource(_fmnist_images, _fmnist_labels, FASHION_MNIST_CLASSES,
                                "Zalando's 70,000 28x28 grey clothes, 10 classes (IDX files, --data)"),
}
FOLDER = "a folder of PNG/JPEG images (root/<class>/... for classes)"
DEFAULT_REFERENCE = "fashion-mnist-test"  # what evaluations compare against, unless told


def named_source(source: str) -> DataSource | None:
    """The table's entry for ``source``, or None for a folder."""
    return SOURCES.get(source.lower())


def split_names() -> dict[str, tuple[str, Split]]:
    """``"fashion-mnist-test"`` -> ("fashion-mnist", "test"), for every source and split."""
    return {f"{name}-{split}": (name, split) for name in SOURCES for split in SPLITS}


def _fit(x: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """uint8 images resized (antialiased when shrinking) and repeated to ``channels``."""
    if x.shape[-1] != size or x.shape[-2] != size:
        # Chunks keep the float copy small; antialias matters when shrinking.
        x = torch.cat([F.interpolate(c.float(), size=(size, size), mode="bilinear",
                                     antialias=True, align_corners=False).round().clamp(0, 255)
                       .to(torch.uint8) for c in x.split(4096)])
    return x.repeat(1, 3, 1, 1) if channels == 3 and x.shape[1] == 1 else x


def load_dataset(source: str, *, size: int, channels: int, data_dir: str | Path | None = None,
                 split: Split = "train", download: bool = True) -> torch.Tensor:
    """A named source (resized/repeated to fit) or an image folder, as uint8 (N, C, size, size)."""
    _check_shape_args(size, channels)
    src = named_source(source)
    if src is None:
        return load_image_folder(source, size, channels)
    return _fit(src.images(split, data_dir, download), size, channels)


def load_labeled_dataset(source: str, *, size: int, channels: int, data_dir: str | Path | None = None,
                         split: Split = "train", download: bool = True) -> Labeled:
    """:func:`load_dataset` with the labels: the source's label files, or a folder's subfolders."""
    src = named_source(source)
    if src is None:
        return load_image_folder_labeled(source, size, channels)
    images = load_dataset(source, size=size, channels=channels, data_dir=data_dir, split=split,
                          download=download)
    labels = src.labels(split, data_dir, download)
    if len(labels) != len(images):
        raise DdpmError(f"{source} {split}: {len(images)} images but {len(labels)} labels")
    return Labeled(images, labels, src.classes)


def class_names(source: str, data_dir: str | Path | None = None) -> tuple[str, ...]:
    """The class names of a data source, by label index: a named source's, or a folder's
    first-level subfolders (root/<class>/...)."""
    src = named_source(source)
    return src.classes if src is not None else folder_classes(source)


def class_counts(source: str, data_dir: str | Path | None = None) -> tuple[int, ...]:
    """Training images per class of a data source, by label index, read without decoding an
    image: a named source's label file, or the files in each of a folder's class subfolders."""
    src = named_source(source)
    if src is not None:
        labels = src.labels("train", data_dir, False)
        return tuple(int(c) for c in torch.bincount(labels, minlength=len(src.classes)))
    names = folder_classes(source)
    root = Path(source)
    found = [f.relative_to(root).parts[0] for f in _image_files(root) if len(f.relative_to(root).parts) > 1]
    return tuple(found.count(n) for n in names)


def load_images_file(path: str | Path) -> torch.Tensor:
    """uint8 (N, C, H, W) images from an .npz (key ``images``, as ``ddpm sample`` writes) or an
    .npy array; never unpickles."""
    import zipfile

    import numpy as np

    from ..files import shorten

    try:
        z = np.load(path)  # an .npz (key 'images') or a plain .npy array; never pickles
        if isinstance(z, np.ndarray):
            arr = z
        else:
            with z:
                arr = z["images"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise DdpmError(f"cannot read samples {path}: expected an .npz with key 'images' or an .npy array "
                        f"({shorten(str(e))})") from None
    if arr.dtype != np.uint8 or arr.ndim != 4 or len(arr) == 0 or arr.shape[1] not in (1, 3):
        raise DdpmError(f"{path}: the images must be uint8 (N, C, H, W) with N >= 1 and C 1 or 3, "
                        f"got {arr.dtype} {arr.shape}")
    return torch.from_numpy(arr)


def reference_images(spec: str, *, size: int, channels: int, data_dir: str | Path | None = None) -> torch.Tensor:
    """A named split (``fashion-mnist-test``) or an image folder, as uint8 at ``size``, for evaluation."""
    named = split_names()
    if spec in named:
        name, split = named[spec]
        return load_dataset(name, size=size, channels=channels, data_dir=data_dir, split=split)
    if Path(spec).is_dir():
        return load_image_folder(spec, size, channels)
    raise DdpmError(f"unknown reference {spec!r}: use {', '.join(named)} or an image folder")
