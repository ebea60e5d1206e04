"""The data sources, one table shared by training and evaluation.

A run's ``data.source`` (and ``ddpm eval --reference``) is one string, kept in the run's config
as the run named it: a source of :data:`SOURCES` (``fashion-mnist``; ``fashion-mnist-test``
names its test split), or a path read by one of :data:`KINDS`: a folder of PNG/JPEG images, an
``.npz`` of arrays, or a Hugging Face dataset on disk (``hf:PATH`` for an image folder read by
``datasets``). Each source says what it is (:func:`describe`): its images' shape and channels,
its classes, its test split (or none) and the evaluation that fits it. Adding a named source is
one entry in :data:`SOURCES`; adding a kind of file, one entry in :data:`KINDS`.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Callable, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DdpmError
from .readers import (FASHION_MNIST_CLASSES, GREY_MODES, Labeled, _check_shape_args, _decode, _image_files, folder_class_names,
                      folder_classes, load_fashion_mnist, load_fashion_mnist_labels, load_image_folder,
                      load_image_folder_labeled, read_image_header)

Split = Literal["train", "test"]
SPLITS: tuple[Split, ...] = ("train", "test")
Reader = Callable[[Split, "str | Path | None", bool], torch.Tensor]  # (split, data_dir, download) -> tensor

EVALUATIONS: dict[str, str] = {  # what `ddpm eval` can measure a run's samples by
    "fd-fmnist": "FD-FMNIST, KID, precision/recall on the shipped Fashion-MNIST features (1x28x28 grey)",
    "none": "no shipped features: FD-FMNIST fits only Fashion-MNIST's 1x28x28 grey clothes",
}


class DataSource(NamedTuple):
    """A named data set: its readers, its classes, and what it is."""

    images: Reader  # uint8 (N, C, H, W) at the source's own size
    labels: Reader  # int64 (N,), indices into classes
    classes: tuple[str, ...]
    summary: str
    shape: tuple[int, int, int] | None = None  # (C, H, W) of its images; None: read the first
    evaluation: str = "none"  # a key of EVALUATIONS
    has_test: bool = True


class SourceInfo(NamedTuple):
    """What a data source is (:func:`describe`)."""

    source: str  # as the run names it
    kind: str  # "named" or a key of KINDS
    shape: tuple[int, int, int]  # (C, H, W) of its (first) image as stored; training resizes and crops
    classes: tuple[str, ...]  # by label index; () without labels
    test: str | None  # where its test split comes from; None: it has none
    evaluation: str  # a key of EVALUATIONS


def _fmnist_images(split: Split, data_dir: str | Path | None, download: bool) -> torch.Tensor:
    return load_fashion_mnist(split, data_dir, download=download)


def _fmnist_labels(split: Split, data_dir: str | Path | None, download: bool) -> torch.Tensor:
    return load_fashion_mnist_labels(split, data_dir, download=download)


SOURCES: dict[str, DataSource] = {
    "fashion-mnist": DataSource(_fmnist_images, _fmnist_labels, FASHION_MNIST_CLASSES,
                                "Zalando's 70,000 28x28 grey clothes, 10 classes (IDX files, --data)",
                                shape=(1, 28, 28), evaluation="fd-fmnist"),
}
FOLDER = "a folder of PNG/JPEG images (root/<class>/... for classes, root/test/ a test split)"
DEFAULT_REFERENCE = "fashion-mnist-test"  # what evaluations of --samples / --real compare against, unless told
DEFAULT_FLOOR = "fashion-mnist-train"  # ... and the real images of their floor
TEST_FOLDER = "test"  # an image folder's test split: root/test/ (its own root/test/<class>/...)
NPZ_KEYS = ("images", "labels", "class_names", "test_images", "test_labels")


def named_source(source: str) -> DataSource | None:
    """The table's entry for ``source``, or None for a path."""
    return SOURCES.get(source.lower())


def split_names() -> dict[str, tuple[str, Split]]:
    """``"fashion-mnist-test"`` -> ("fashion-mnist", "test"), for every source and split."""
    return {f"{name}-{split}": (name, split) for name in SOURCES for split in SPLITS}


# ---------------------------------------------------------------- fitting arrays to a run's shape

def _fit(x: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """uint8 images centre-cropped square, resized (antialiased when shrinking) and brought to
    ``channels`` (grey repeated; colour to grey by ITU-R 601 luma, as Pillow's "L")."""
    h, w = x.shape[-2:]
    if h != w:
        s = min(h, w)
        x = x[..., (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    if x.shape[-1] != size:
        # Chunks keep the float copy small; antialias matters when shrinking.
        x = torch.cat([F.interpolate(c.float(), size=(size, size), mode="bilinear",
                                     antialias=True, align_corners=False).round().clamp(0, 255)
                       .to(torch.uint8) for c in x.split(4096)])
    if channels == 3 and x.shape[1] == 1:
        return x.repeat(1, 3, 1, 1)
    if channels == 1 and x.shape[1] == 3:
        luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return torch.cat([(c.float() * luma).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
                          for c in x.split(4096)])
    return x


class Read(NamedTuple):
    """One split of a source at the run's size and channels."""

    images: torch.Tensor  # uint8 (N, C, size, size)
    labels: torch.Tensor | None  # int64 (N,); None without labels
    classes: tuple[str, ...]


class SourceKind(NamedTuple):
    """A kind of path a source can be: how it is recognised, read and described."""

    summary: str
    claims: Callable[[str], bool]  # is this spec mine?
    read: Callable[[str, Split, int, int, bool], Read | None]  # (spec, split, size, channels, labeled); None: no such split
    describe: Callable[[str], SourceInfo]


def _no_split(spec: str, split: Split) -> DdpmError:
    return DdpmError(f"the data source {spec} has no {split} split ({FOLDER}; an .npz's test_images; a Hugging "
                     f"Face dataset's test split; or set --test-source)")


# ---------------------------------------------------------------- image folders

def _folder_skip(root: Path) -> str | None:
    return TEST_FOLDER if (root / TEST_FOLDER).is_dir() else None


def _read_folder(spec: str, split: Split, size: int, channels: int, labeled: bool) -> Read | None:
    root = Path(spec)
    skip = _folder_skip(root)
    if split == "test":
        if skip is None:
            return None
        root, skip = root / TEST_FOLDER, None
    if not labeled:  # images anywhere below, in class subfolders or not
        return Read(load_image_folder(root, size, channels, skip=skip), None, ())
    lab = load_image_folder_labeled(root, size, channels, skip=skip, names=folder_classes(spec, _folder_skip(Path(spec))))
    return Read(lab.images, lab.labels, lab.class_names)


def _header_shape(path: Path) -> tuple[int, int, int]:
    w, h, mode = read_image_header(path)
    return (1 if mode in GREY_MODES else 3, h, w)


def _describe_folder(spec: str) -> SourceInfo:
    root = Path(spec)
    skip = _folder_skip(root)
    files = _image_files(root, skip)
    return SourceInfo(spec, "folder", _header_shape(files[0]), folder_class_names(root, skip),
                      str(root / TEST_FOLDER) if skip else None, "none")


# ---------------------------------------------------------------- .npz arrays

def _npz(spec: str) -> dict[str, np.ndarray]:
    import zipfile

    from ..files import shorten

    try:
        with np.load(spec, allow_pickle=False) as z:  # never unpickles
            arrays = {k: z[k] for k in z.files if k in NPZ_KEYS}
            keys = list(z.files)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DdpmError(f"cannot read {spec}: not an .npz of arrays ({shorten(str(e))})") from None
    if "images" not in arrays:
        raise DdpmError(f"{spec} has no 'images' array (it holds {', '.join(keys) or 'nothing'}): an .npz data "
                        f"source has images, and optionally {', '.join(NPZ_KEYS[1:])}")
    return arrays


def _npz_images(spec: str, a: np.ndarray, key: str) -> torch.Tensor:
    """uint8 (N, H, W), (N, H, W, C) or (N, C, H, W) with C 1 or 3 -> uint8 (N, C, H, W)."""
    if a.dtype != np.uint8 or a.ndim not in (3, 4) or len(a) == 0 or (
            a.ndim == 4 and a.shape[1] not in (1, 3) and a.shape[3] not in (1, 3)):
        raise DdpmError(f"{spec}: {key} must be uint8 (N, H, W), (N, H, W, C) or (N, C, H, W) with N >= 1 and "
                        f"C 1 or 3, got {a.dtype} {a.shape}")
    if a.ndim == 3:
        a = a[:, None]
    elif a.shape[1] not in (1, 3):  # channels last, as numpy and PIL keep them
        a = a.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(a))


def _npz_labels(spec: str, arrays: dict[str, np.ndarray], key: str, n: int) -> tuple[torch.Tensor | None, tuple[str, ...]]:
    names = tuple(str(c) for c in arrays["class_names"]) if "class_names" in arrays else ()
    if key not in arrays:
        return None, names
    y = arrays[key]
    if y.ndim != 1 or len(y) != n or not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
        raise DdpmError(f"{spec}: {key} must be {n} non-negative integers (one per image), got {y.dtype} {y.shape}")
    k = int(y.max()) + 1 if len(y) else 0
    if names and k > len(names):
        raise DdpmError(f"{spec}: {key} reaches class {k - 1} but class_names lists {len(names)}")
    return torch.from_numpy(y.astype(np.int64)), names or tuple(str(i) for i in range(k))


def _read_npz(spec: str, split: Split, size: int, channels: int, labeled: bool) -> Read | None:
    arrays = _npz(spec)
    key = "images" if split == "train" else "test_images"
    if key not in arrays:
        return None
    x = _npz_images(spec, arrays[key], key)
    labels, names = _npz_labels(spec, arrays, "labels" if split == "train" else "test_labels", len(x))
    if split == "test" and "class_names" not in arrays and "labels" in arrays:
        names = _npz_labels(spec, arrays, "labels", len(arrays["images"]))[1]  # the training set's classes
    return Read(_fit(x, size, channels), labels, names if labels is not None else ())


def _describe_npz(spec: str) -> SourceInfo:
    arrays = _npz(spec)
    x = _npz_images(spec, arrays["images"], "images")
    _, names = _npz_labels(spec, arrays, "labels", len(x))
    return SourceInfo(spec, "npz", tuple(x.shape[1:]), names if "labels" in arrays else (),
                      f"{spec} (test_images)" if "test_images" in arrays else None, "none")


# ---------------------------------------------------------------- Hugging Face datasets on disk

HF_PREFIX = "hf:"
HF_DISK_MARKERS = ("dataset_dict.json", "state.json")  # what Dataset(Dict).save_to_disk writes


def _hf_path(spec: str) -> Path:
    return Path(spec[len(HF_PREFIX):] if spec.startswith(HF_PREFIX) else spec)


def _claims_hf(spec: str) -> bool:
    p = _hf_path(spec)
    return spec.startswith(HF_PREFIX) or p.suffix == ".parquet" or (
        p.is_dir() and (any((p / m).is_file() for m in HF_DISK_MARKERS) or any(p.glob("*.parquet"))))


def _datasets():
    """The ``datasets`` package, offline: a local dataset must never reach the network."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import datasets
    except ImportError:
        raise DdpmError("reading a Hugging Face dataset needs the datasets package: pip install ddpm[hf]") from None
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):  # read at import: set here too if imported before
        if hasattr(datasets.config, name):
            setattr(datasets.config, name, True)
    # Its progress bars and notes would break the command's one-line messages; the reading is quick.
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def _hf_splits(spec: str) -> dict:
    """split name -> datasets.Dataset, from a save_to_disk folder, parquet files or (hf:) an image folder."""
    from ..files import shorten

    p = _hf_path(spec)
    if not p.exists():
        raise DdpmError(f"the Hugging Face dataset {p} does not exist")
    ds = _datasets()
    try:
        if p.is_dir() and any((p / m).is_file() for m in HF_DISK_MARKERS):
            d = ds.load_from_disk(str(p))
        elif p.is_file():
            d = ds.load_dataset("parquet", data_files={"train": str(p)})
        elif any(p.glob("*.parquet")):
            d = ds.load_dataset("parquet", data_dir=str(p))
        else:
            d = ds.load_dataset("imagefolder", data_dir=str(p))
    except DdpmError:
        raise
    except Exception as e:  # datasets raises many kinds (FileNotFoundError, DatasetGenerationError, ArrowInvalid...)
        raise DdpmError(f"cannot read the Hugging Face dataset {p}: {shorten(str(e))}") from None
    return dict(d) if isinstance(d, ds.DatasetDict) else {"train": d}


def _hf_split(splits: dict, split: Split):
    if split in splits:
        return splits[split]
    # One unnamed split is the training data; a test split must be called "test".
    return next(iter(splits.values())) if split == "train" and splits else None


def _hf_columns(spec: str, d) -> tuple[str, str | None]:
    ds = _datasets()
    feats = d.features
    image = next((k for k, f in feats.items() if isinstance(f, ds.Image)), None)
    if image is None:
        raise DdpmError(f"the Hugging Face dataset {_hf_path(spec)} has no image column (its columns: "
                        f"{', '.join(f'{k} ({type(f).__name__})' for k, f in feats.items()) or 'none'}): "
                        f"ddpm reads a column of type datasets.Image")
    label = next((k for k, f in feats.items() if isinstance(f, ds.ClassLabel)), None)
    return image, label


def _read_hf(spec: str, split: Split, size: int, channels: int, labeled: bool) -> Read | None:
    ds = _datasets()
    d = _hf_split(_hf_splits(spec), split)
    if d is None:
        return None
    image, label = _hf_columns(spec, d)
    if len(d) == 0:
        raise DdpmError(f"the {split} split of the Hugging Face dataset {_hf_path(spec)} is empty")
    # Undecoded bytes, read by the image folders' decoder: the same sizes, crops and bomb checks.
    raw = d.cast_column(image, ds.Image(decode=False))[image]
    arrays = [_decode(io.BytesIO(r["bytes"]) if r.get("bytes") else Path(r["path"]), size, channels,
                      name=f"image {i} of {_hf_path(spec)}") for i, r in enumerate(raw)]
    x = torch.from_numpy(np.stack(arrays))
    if label is None or not labeled:
        return Read(x, None, ())
    return Read(x, torch.tensor(d[label], dtype=torch.long), tuple(d.features[label].names))


def _describe_hf(spec: str) -> SourceInfo:
    ds = _datasets()
    splits = _hf_splits(spec)
    d = _hf_split(splits, "train")
    if d is None or len(d) == 0:
        raise DdpmError(f"the Hugging Face dataset {_hf_path(spec)} has no images")
    image, label = _hf_columns(spec, d)
    first = d.cast_column(image, ds.Image(decode=False))[0][image]
    shape = _header_shape(io.BytesIO(first["bytes"]) if first.get("bytes") else Path(first["path"]))
    return SourceInfo(spec, "hf", shape, tuple(d.features[label].names) if label else (),
                      f"{_hf_path(spec)} (test split)" if "test" in splits else None, "none")


KINDS: dict[str, SourceKind] = {  # tried in order: the first that claims a path reads it
    "npz": SourceKind("an .npz of uint8 arrays: images (N,H,W[,C] or N,C,H,W), labels, class_names, "
                      "test_images, test_labels", lambda s: s.lower().endswith(".npz"), _read_npz, _describe_npz),
    "hf": SourceKind("a Hugging Face dataset on disk (save_to_disk folder, parquet files; hf:FOLDER for an image "
                     "folder read by datasets), pip install ddpm[hf]", _claims_hf, _read_hf, _describe_hf),
    "folder": SourceKind(FOLDER, lambda s: Path(s).is_dir(), _read_folder, _describe_folder),
}


def source_kind(source: str) -> tuple[str, SourceKind]:
    """The kind of path ``source`` is, or one line saying what a source can be."""
    from ..files import shorten

    for name, kind in KINDS.items():
        if kind.claims(source):
            return name, kind
    what = "does not exist" if not Path(source).exists() else "is not a folder, an .npz or a Hugging Face dataset"
    raise DdpmError(f"unknown data source {shorten(source)}: it {what}; use {', '.join(SOURCES)}, "
                    f"{FOLDER}, an .npz file or a Hugging Face dataset on disk")


# ---------------------------------------------------------------- the API

def describe(source: str, data_dir: str | Path | None = None) -> SourceInfo:
    """What ``source`` is: its shape, channels, classes, test split and the evaluation that fits it."""
    src = named_source(source)
    if src is not None:
        shape = src.shape or tuple(src.images("train", data_dir, False).shape[1:])
        return SourceInfo(source, "named", shape, src.classes, f"{source.lower()}-test" if src.has_test else None,
                          src.evaluation)
    return source_kind(source)[1].describe(source)


def _read(source: str, split: Split, size: int, channels: int, data_dir: str | Path | None, download: bool,
          test_source: str | None, labeled: bool) -> Read:
    _check_shape_args(size, channels)
    if split not in SPLITS:
        raise DdpmError(f"unknown split {split!r}: use 'train' or 'test'")
    if split == "test" and test_source:
        # A separate test source is read whole, as its training split, indexed by this source's classes.
        r = _read(test_source, "train", size, channels, data_dir, download, None, labeled)
        if labeled and r.labels is not None:
            names = class_names(source, data_dir)
            if r.classes != names:
                raise DdpmError(f"the test source {test_source} has classes {', '.join(r.classes)}; the data "
                                f"{source} has {', '.join(names)}")
        return r
    src = named_source(source)
    if src is not None:
        x = _fit(src.images(split, data_dir, download), size, channels)
        return Read(x, src.labels(split, data_dir, download) if labeled else None, src.classes)
    r = source_kind(source)[1].read(source, split, size, channels, labeled)
    if r is None:
        raise _no_split(source, split)
    return r


def load_dataset(source: str, *, size: int, channels: int, data_dir: str | Path | None = None,
                 split: Split = "train", download: bool = True, test_source: str | None = None) -> torch.Tensor:
    """A source's split as uint8 (N, C, size, size): resized, cropped and brought to ``channels``.
    ``test_source`` replaces the source's own test split."""
    return _read(source, split, size, channels, data_dir, download, test_source, False).images


def load_labeled_dataset(source: str, *, size: int, channels: int, data_dir: str | Path | None = None,
                         split: Split = "train", download: bool = True, test_source: str | None = None) -> Labeled:
    """:func:`load_dataset` with the labels: a named source's label files, a folder's subfolders,
    an .npz's labels, a Hugging Face dataset's ClassLabel column."""
    r = _read(source, split, size, channels, data_dir, download, test_source, True)
    if r.labels is None:
        raise DdpmError(f"the data source {test_source if split == 'test' and test_source else source} has no "
                        f"labels: a conditional run needs classes ({FOLDER}; an .npz's labels; a ClassLabel column)")
    if len(r.labels) != len(r.images):
        raise DdpmError(f"{source} {split}: {len(r.images)} images but {len(r.labels)} labels")
    return Labeled(r.images, r.labels, r.classes)


def first_image(source: str, *, size: int, data_dir: str | Path | None = None, download: bool = True) -> torch.Tensor:
    """A source's first training image as uint8 (C, size, size), in its own channels; a folder's
    first file is decoded alone, not the whole folder."""
    channels = describe(source, data_dir).shape[0]
    if named_source(source) is None and source_kind(source)[0] == "folder":
        root = Path(source)
        return torch.from_numpy(_decode(_image_files(root, _folder_skip(root))[0], size, channels))
    return load_dataset(source, size=size, channels=channels, data_dir=data_dir, download=download)[0]


def has_test_split(source: str, test_source: str | None = None, data_dir: str | Path | None = None) -> bool:
    """Whether :func:`load_dataset` can read ``split="test"`` of this source."""
    return bool(test_source) or describe(source, data_dir).test is not None


def class_names(source: str, data_dir: str | Path | None = None) -> tuple[str, ...]:
    """The class names of a data source, by label index: a named source's, a folder's first-level
    subfolders (root/<class>/..., but root/test), an .npz's or a Hugging Face dataset's."""
    src = named_source(source)
    if src is not None:
        return src.classes
    kind, _ = source_kind(source)
    if kind == "folder":
        return folder_classes(source, _folder_skip(Path(source)))
    names = describe(source, data_dir).classes
    if not names:
        raise DdpmError(f"the data source {source} has no labels: a conditional run needs classes")
    return names


def class_counts(source: str, data_dir: str | Path | None = None) -> tuple[int, ...]:
    """Training images per class of a data source, by label index: a named source's label file or
    the files in each of a folder's class subfolders (read without decoding an image); an .npz's
    or a Hugging Face dataset's label column."""
    src = named_source(source)
    if src is not None:
        labels = src.labels("train", data_dir, False)
        return tuple(int(c) for c in torch.bincount(labels, minlength=len(src.classes)))
    kind, _ = source_kind(source)
    names = class_names(source, data_dir)
    if kind == "folder":
        root = Path(source)
        found = [f.relative_to(root).parts[0] for f in _image_files(root, _folder_skip(root))
                 if len(f.relative_to(root).parts) > 1]
        return tuple(found.count(n) for n in names)
    if kind == "npz":
        arrays = _npz(source)
        y = _npz_labels(source, arrays, "labels", len(arrays["images"]))[0]
    else:
        d = _hf_split(_hf_splits(source), "train")
        y = torch.tensor(d[_hf_columns(source, d)[1]], dtype=torch.long)
    return tuple(int(c) for c in torch.bincount(y, minlength=len(names)))


def load_images_file(path: str | Path) -> torch.Tensor:
    """uint8 (N, C, H, W) images from an .npz (key ``images``, as ``ddpm sample`` writes) or an
    .npy array; never unpickles."""
    import zipfile

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
    """A named split (``fashion-mnist-test``), an image folder (all its images) or another source
    (its training split), as uint8 at ``size``, for evaluation."""
    named = split_names()
    if spec in named:
        name, split = named[spec]
        return load_dataset(name, size=size, channels=channels, data_dir=data_dir, split=split)
    if Path(spec).is_dir() and source_kind(spec)[0] == "folder":
        return load_image_folder(spec, size, channels)
    if named_source(spec) is None and Path(_hf_path(spec)).exists():
        return load_dataset(spec, size=size, channels=channels, data_dir=data_dir)
    raise DdpmError(f"unknown reference {spec!r}: use {', '.join(named)}, an image folder, an .npz or a "
                    f"Hugging Face dataset")
