"""Training data: Fashion-MNIST (IDX files) or a folder of images, and a resumable batch iterator."""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import math
import os
import struct
import tempfile
import warnings
import zlib
from http.client import HTTPException
from pathlib import Path
from typing import BinaryIO, Literal, NamedTuple
from urllib.request import urlopen

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import DdpmError

log = logging.getLogger(__name__)

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
MIRROR = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
DOWNLOAD_TIMEOUT_S = 30
FILES = {  # (split, kind) -> file name without ".gz"
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
MD5 = {  # of the official .gz files
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error,
                  Image.DecompressionBombError)


# ---------------------------------------------------------------- IDX files

def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzipped or raw) into a native-endian array; any defect is a DdpmError."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        # Sniff the gzip magic rather than trusting the suffix: files get renamed and unpacked.
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DdpmError(f"cannot read IDX file {path}: {e}") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in IDX_DTYPES:
        raise DdpmError(f"{path} is not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    dtype, ndim = np.dtype(IDX_DTYPES[raw[2]]), raw[3]
    start = 4 + 4 * ndim
    if len(raw) < start:
        raise DdpmError(f"IDX file {path} is truncated inside its header")
    dims = struct.unpack(f">{ndim}I", raw[4:start])
    # Python ints: a forged header cannot overflow or make us allocate before the length check.
    expected = dtype.itemsize * math.prod(dims)
    if len(raw) - start != expected:
        raise DdpmError(f"IDX file {path} holds {len(raw) - start} data bytes, "
                        f"its header {dims} promises {expected} (truncated or corrupt)")
    try:
        return np.frombuffer(raw, dtype, offset=start).reshape(dims).astype(dtype.newbyteorder("="))
    except ValueError as e:  # e.g. a zero dimension beside absurd ones
        raise DdpmError(f"IDX file {path} has an impossible shape {dims} ({e})") from None


def cache_dir() -> Path:
    """Where downloads go: $XDG_CACHE_HOME/ddpm/fashion-mnist (default ~/.cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ddpm" / "fashion-mnist"


def _idx_file(root: Path, name: str) -> Path | None:
    return next((p for p in (root / name, root / f"{name}.gz") if p.is_file()), None)


def _has_all(root: Path) -> bool:
    return all(_idx_file(root, name) for name in FILES.values())


def _options() -> str:
    return (f"pass --data DIR, set $DDPM_DATA, run `apt-get install dataset-fashion-mnist`, "
            f"or put the 4 files ({', '.join(MD5)}) in {cache_dir()}")


def _download(dest: Path) -> None:
    for name, md5 in MD5.items():
        if (dest / name).is_file():
            continue
        log.info("downloading %s%s", MIRROR, name)
        tmp = None
        try:
            dest.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=dest)
            digest = hashlib.md5()
            with os.fdopen(fd, "wb") as out, urlopen(MIRROR + name, timeout=DOWNLOAD_TIMEOUT_S) as r:
                while chunk := r.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
            if digest.hexdigest() != md5:
                raise DdpmError(f"downloaded {name} has MD5 {digest.hexdigest()}, expected {md5}; "
                                + _options())
            os.replace(tmp, dest / name)  # atomic: a reader never sees half a file
        except (OSError, HTTPException, ValueError) as e:
            raise DdpmError(f"could not download Fashion-MNIST ({e}); " + _options()) from None
        finally:
            if tmp:
                Path(tmp).unlink(missing_ok=True)


def find_fashion_mnist(data_dir: str | Path | None = None, *, download: bool = True) -> Path:
    """The folder holding the 4 Fashion-MNIST files, downloading them to cache_dir() if allowed."""
    if data_dir is not None:
        # An explicit choice must not silently fall back to some other copy.
        if not _has_all(Path(data_dir)):
            raise DdpmError(f"{data_dir} lacks the Fashion-MNIST files ({', '.join(FILES.values())}"
                            f", raw or .gz)")
        return Path(data_dir)
    env = os.environ.get("DDPM_DATA")
    candidates = ([Path(env)] if env else []) + [DEBIAN_DIR, cache_dir()]
    for root in candidates:
        if _has_all(root):
            return root
    if not download:
        raise DdpmError("Fashion-MNIST not found and downloading is off; " + _options())
    _download(cache_dir())
    return cache_dir()


def _split_file(split: str, kind: str, data_dir, download: bool) -> Path:
    if split not in ("train", "test"):
        raise DdpmError(f"unknown split {split!r}: use 'train' or 'test'")
    root = find_fashion_mnist(data_dir, download=download)
    return _idx_file(root, FILES[split, kind])


def load_fashion_mnist(split: Literal["train", "test"] = "train", data_dir: str | Path | None = None,
                       *, download: bool = True) -> torch.Tensor:
    """Fashion-MNIST images as uint8 (N, 1, 28, 28)."""
    path = _split_file(split, "images", data_dir, download)
    x = read_idx(path)
    if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != (28, 28):
        raise DdpmError(f"{path} holds {x.dtype} {x.shape}, not uint8 28x28 images")
    return torch.from_numpy(x).unsqueeze(1)


def load_fashion_mnist_labels(split: Literal["train", "test"] = "train",
                              data_dir: str | Path | None = None, *, download: bool = True
                              ) -> torch.Tensor:
    """Fashion-MNIST class labels as int64 (N,)."""
    path = _split_file(split, "labels", data_dir, download)
    y = read_idx(path)
    if y.dtype != np.uint8 or y.ndim != 1:
        raise DdpmError(f"{path} holds {y.dtype} {y.shape}, not a uint8 label vector")
    return torch.from_numpy(y).long()


# ---------------------------------------------------------------- image folders

def _check_shape_args(size: int, channels: int) -> None:
    if size < 1:
        raise DdpmError(f"image size must be at least 1, got {size}")
    if channels not in (1, 3):
        raise DdpmError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")


def _to_8bit(img: Image.Image) -> Image.Image:
    """Bring any Pillow mode to 8-bit L or RGB; transparency is composited on white."""
    if img.mode.startswith("I"):
        # Pillow clips 16-bit samples to 255 when converting; scale the 0..65535 range instead.
        a = np.asarray(img).astype(np.float64).clip(0, 65535) / 257
        return Image.fromarray(np.rint(a).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        # Transparent pixels often hold black garbage; white is what a viewer shows.
        img = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", img.size, "white"), img).convert("RGB")
    return img if img.mode in ("L", "RGB") else img.convert("RGB")


MAX_ASPECT = 64  # a thinner image has no square worth cropping (and its resize can ask for gigabytes)
MAX_RESIZED_PIXELS = 1 << 26  # the resized image before the crop: 64 M pixels
MAX_SOURCE_PIXELS = 1 << 27  # an image file's own pixels, read from its header before decoding: 128 M


def _check_dimensions(what: str, w: int, h: int, size: int, max_pixels: int = MAX_SOURCE_PIXELS) -> None:
    """Refuse a decompression bomb from the header: by pixel count (a small 1-bit PNG can hold
    over a hundred million pixels, all decoded before any resize) and by aspect ratio (a
    1 x 10,000,000 PNG would be resized to 28 x 280,000,000 before its crop)."""
    if w * h > max_pixels:
        raise DdpmError(f"cannot read {what}: it is {w:,} x {h:,} pixels, more than the "
                        f"{max_pixels:,} read here")
    if min(w, h) < 1 or max(w, h) > MAX_ASPECT * min(w, h):
        raise DdpmError(f"cannot read {what}: it is {w:,} x {h:,} pixels, too thin to crop a square from "
                        f"(aspect ratio above {MAX_ASPECT}:1)")
    scale = size / min(w, h)
    if max(size, round(w * scale)) * max(size, round(h * scale)) > MAX_RESIZED_PIXELS:
        raise DdpmError(f"cannot read {what}: resizing its {w:,} x {h:,} pixels to size {size} needs more "
                        f"than {MAX_RESIZED_PIXELS:,} pixels")


class ImageHeader(NamedTuple):
    width: int
    height: int
    mode: str  # Pillow's: L, RGB, 1, I;16, ...


def read_image_header(path: str | Path, what: str = "image") -> ImageHeader:
    """An image file's size and mode from its header, no pixel decoded; a file that is not an
    image, or a decompression bomb by Pillow's pixel count, is one line naming it as ``what``."""
    try:
        with Image.open(path) as img:
            return ImageHeader(*img.size, img.mode)
    except (*_DECODE_ERRORS, MemoryError) as e:
        raise DdpmError(f"cannot read {what} {path}: {e}") from None


GREY_MODES = frozenset({"L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "1"})  # Pillow's one-channel modes


def check_image_channels(header: ImageHeader, channels: int, what: str) -> None:
    """A grey image given where colour is drawn is refused: its colours cannot be made up. A
    colour image for a grey model is read as grey, as a data folder's files are."""
    if channels == 3 and header.mode in GREY_MODES:
        raise DdpmError(f"{what} is grey (one channel, mode {header.mode}); the model draws colour (3 channels): "
                        f"give an RGB image")


def _decode(source: Path | BinaryIO, size: int, channels: int, *, name: str | None = None,
            max_pixels: int = MAX_SOURCE_PIXELS) -> np.ndarray:
    """One image (a file, or bytes in a stream) -> uint8 (C, size, size): shorter side resized to
    `size`, centre-cropped. ``name`` is what messages call it (default: "image PATH")."""
    what = name or f"image {source}"
    try:
        with Image.open(source) as img:
            _check_dimensions(what, *img.size, size, max_pixels)  # from the header, before any pixel is decoded
            img = ImageOps.exif_transpose(img)  # phones store rotation in EXIF, not pixels
            img = _to_8bit(img).convert("L" if channels == 1 else "RGB")
    except (*_DECODE_ERRORS, MemoryError) as e:
        raise DdpmError(f"cannot read {what}: {e}") from None
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.LANCZOS)
    left, top = (nw - size) // 2, (nh - size) // 2
    a = np.array(img.crop((left, top, left + size, top + size)))  # a writable copy for torch
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def load_image(path: str | Path, size: int, channels: int) -> torch.Tensor:
    """One image as uint8 (C, size, size)."""
    _check_shape_args(size, channels)
    return torch.from_numpy(np.ascontiguousarray(_decode(Path(path), size, channels)))


def decode_image(data: bytes, size: int, channels: int, *, name: str = "the image",
                 max_pixels: int = MAX_SOURCE_PIXELS) -> torch.Tensor:
    """Image bytes (PNG, JPEG, ...) as uint8 (C, size, size), read as a data folder's files are;
    at most ``max_pixels`` in the file, checked from its header before anything is decoded."""
    _check_shape_args(size, channels)
    return torch.from_numpy(np.ascontiguousarray(_decode(io.BytesIO(data), size, channels, name=name,
                                                         max_pixels=max_pixels)))


def _image_files(root: Path, skip: str | None = None) -> list[Path]:
    """Every PNG/JPEG under ``root``, sorted; none under ``root/skip`` (a folder's test split)."""
    if not root.is_dir():
        raise DdpmError(f"image folder {root} {'is not a folder' if root.exists() else 'does not exist'}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                   and (skip is None or p.relative_to(root).parts[0] != skip))
    if not files:
        raise DdpmError(f"no PNG/JPEG images found under {root}")
    return files


def _decode_files(files: list[Path], root: Path, size: int, channels: int) -> tuple[torch.Tensor, list[int]]:
    """Decode every file; unreadable ones become warnings. Returns the images and the kept indices."""
    arrays, kept, bad = [], [], []
    for i, f in enumerate(files):
        try:
            arrays.append(_decode(f, size, channels))
            kept.append(i)
        except DdpmError as e:
            bad.append(f)
            warnings.warn(f"skipping {e}", stacklevel=3)
    if not arrays:
        raise DdpmError(f"none of the {len(files)} images under {root} could be read (first: {bad[0]})")
    return torch.from_numpy(np.stack(arrays)), kept


def load_image_folder(path: str | Path, size: int, channels: int, *, skip: str | None = None) -> torch.Tensor:
    """Every PNG/JPEG under `path` (recursive, sorted; none under `path/skip`) as uint8
    (N, C, size, size); bad files are skipped."""
    _check_shape_args(size, channels)
    root = Path(path)
    return _decode_files(_image_files(root, skip), root, size, channels)[0]


def folder_class_names(path: str | Path, skip: str | None = None) -> tuple[str, ...]:
    """The classes of an image folder: its first-level subfolders holding images (but ``skip``), sorted."""
    root = Path(path)
    return tuple(sorted({f.relative_to(root).parts[0] for f in _image_files(root, skip)
                         if len(f.relative_to(root).parts) > 1}))


def folder_classes(path: str | Path, skip: str | None = None) -> tuple[str, ...]:
    """An image folder's class names (:func:`folder_class_names`); an error when it has none."""
    names = folder_class_names(path, skip)
    if not names:
        raise DdpmError(f"{path} has no class subfolders: a conditional run needs {path}/<class>/<image>")
    return names


class Labeled(NamedTuple):
    """Images with their class labels."""

    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,), indices into class_names
    class_names: tuple[str, ...]


def load_image_folder_labeled(path: str | Path, size: int, channels: int, *, skip: str | None = None,
                              names: tuple[str, ...] | None = None) -> Labeled:
    """An image folder whose first-level subfolders are the classes (root/<class>/...), none
    under ``root/skip``; ``names``: the classes to index by (a test split's are its training set's)."""
    _check_shape_args(size, channels)
    root = Path(path)
    files = _image_files(root, skip)
    names = folder_classes(root, skip) if names is None else names
    stray = next((f for f in files if len(f.relative_to(root).parts) == 1), None)
    if stray is not None:
        raise DdpmError(f"{stray} is not inside a class subfolder: a conditional run needs {root}/<class>/<image>")
    unknown = next((f for f in files if f.relative_to(root).parts[0] not in names), None)
    if unknown is not None:
        raise DdpmError(f"{unknown}: its class {unknown.relative_to(root).parts[0]!r} is not one of the "
                        f"training classes ({', '.join(names)})")
    labels = torch.tensor([names.index(f.relative_to(root).parts[0]) for f in files], dtype=torch.long)
    images, kept = _decode_files(files, root, size, channels)
    return Labeled(images, labels[kept], names)


# ---------------------------------------------------------------- tensors and batches

def to_model_range(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return x.to(torch.float32) / 127.5 - 1.0


def from_model_range(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255], clamped and rounded (NaN becomes mid-grey)."""
    return ((torch.nan_to_num(x).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def random_hflip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each image of a batch left-right where torch.rand(len(x), generator) < 0.5."""
    mask = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device)
    return torch.where(mask.view(-1, *[1] * (x.ndim - 1)), x.flip(-1), x)


def _generator(*key: object) -> torch.Generator:
    # A stable hash (unlike hash()) so every process derives the same stream from the same key.
    seed = int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little") >> 1
    return torch.Generator().manual_seed(seed)


class Batches:
    """Infinite, reproducible and resumable batches of a uint8 (N, C, H, W) tensor, as float [-1, 1]."""

    def __init__(self, data: torch.Tensor, batch_size: int, *, seed: int, flip: bool = True,
                 drop_last: bool = True, labels: torch.Tensor | None = None):
        if data.dtype != torch.uint8 or data.ndim != 4 or len(data) == 0:
            raise DdpmError(f"Batches needs a non-empty uint8 (N, C, H, W) tensor, got "
                            f"{data.dtype} {tuple(data.shape)}")
        if labels is not None and tuple(labels.shape) != (len(data),):
            raise DdpmError(f"labels must be one per image, (N,) = ({len(data)},), got {tuple(labels.shape)}")
        self.labels = labels
        if batch_size < 1 or (drop_last and batch_size > len(data)):
            raise DdpmError(f"batch size {batch_size} must be between 1 and the {len(data)} images")
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.flip, self.drop_last = flip, drop_last
        n, b = len(data), batch_size
        self.steps_per_epoch = n // b if drop_last else -(-n // b)
        self._epoch, self._index, self._perm = 0, 0, None

    @property
    def epoch(self) -> int:
        return self._epoch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "index": self._index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, index = state.get("epoch"), state.get("index")
        if not (isinstance(epoch, int) and isinstance(index, int)
                and epoch >= 0 and 0 <= index <= self.steps_per_epoch):
            raise DdpmError(f"bad batch iterator state {state!r}")
        self._epoch, self._index, self._perm = epoch, index, None

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> torch.Tensor:
        return self.next_labeled()[0]

    def next_labeled(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The next batch in [-1, 1] and its labels (None without labels)."""
        if self._index >= self.steps_per_epoch:
            self._epoch, self._index, self._perm = self._epoch + 1, 0, None
        if self._perm is None:
            # Everything random is a function of (seed, epoch, index), so resuming needs only those.
            self._perm = torch.randperm(len(self.data), generator=_generator("perm", self.seed, self._epoch))
        b = self.batch_size
        idx = self._perm[self._index * b:(self._index + 1) * b]
        x = self.data[idx.to(self.data.device)]
        y = None if self.labels is None else self.labels[idx.to(self.labels.device)]
        if self.flip:
            x = random_hflip(x, _generator("flip", self.seed, self._epoch, self._index))
        self._index += 1
        return to_model_range(x), y
