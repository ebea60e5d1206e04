"""Tests for ddpm.data: IDX parsing, dataset discovery/download, image folders, batches."""

from __future__ import annotations

import gzip
import hashlib
import io
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import ddpm.data.readers as data
import ddpm.data.sources as sources
from ddpm.errors import DdpmError
from helpers import fake_fashion, idx_bytes, write_idx

@pytest.fixture
def nowhere(tmp_path, monkeypatch):
    """No dataset anywhere: empty Debian dir, cache and $DDPM_DATA."""
    for sub in ("debian", "cache", "env"):
        (tmp_path / sub).mkdir()
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "debian")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("DDPM_DATA", str(tmp_path / "env"))
    return tmp_path


# ---------------------------------------------------------------- IDX

@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_round_trip(tmp_path, suffix, dtype):
    a = (np.arange(2 * 3 * 4) - 7).astype(dtype).reshape(2, 3, 4)
    b = data.read_idx(write_idx(tmp_path / f"x.idx{suffix}", a))
    assert b.dtype == np.dtype(dtype) and b.dtype.isnative and b.flags.writeable
    np.testing.assert_array_equal(a, b)


def test_idx_labels_round_trip(tmp_path):
    y = np.array([3, 1, 4, 1, 5], np.uint8)
    np.testing.assert_array_equal(data.read_idx(write_idx(tmp_path / "y", y)), y)


@pytest.mark.parametrize("name, content", [
    ("magic.idx", b"\x01\x02\x08\x01\x00\x00\x00\x02ab"),
    ("dtype.idx", b"\x00\x00\x07\x01\x00\x00\x00\x02ab"),
    ("truncated.idx", idx_bytes(np.zeros((4, 5), np.uint8))[:-3]),
    ("toolong.idx", idx_bytes(np.zeros((4, 5), np.uint8)) + b"x"),
    ("header.idx", b"\x00\x00\x08\x03\x00\x00"),
    ("garbage.idx", b"this is not an idx file at all"),
    ("empty.idx", b""),
    ("badgzip.idx.gz", gzip.compress(idx_bytes(np.zeros(9, np.uint8)))[:-6]),
    ("gzipgarbage.gz", b"\x1f\x8b" + b"\xff" * 30),
])
def test_idx_defects_name_the_file(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DdpmError, match=name.replace(".", r"\.")) as e:
        data.read_idx(tmp_path / name)
    assert "\n" not in str(e.value)


def test_idx_missing_file(tmp_path):
    with pytest.raises(DdpmError, match="nope"):
        data.read_idx(tmp_path / "nope")


@st.composite
def idx_like(draw):
    dims = draw(st.lists(st.integers(0, 4) | st.integers(0, 2**32 - 1), max_size=4))
    ndim = draw(st.just(len(dims)) | st.integers(0, 255))
    code = draw(st.sampled_from([0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0x00, 0xFF]))
    raw = bytes([0, 0, code, ndim]) + b"".join(d.to_bytes(4, "big") for d in dims)
    raw += draw(st.binary(max_size=64))
    if draw(st.booleans()):
        raw = gzip.compress(raw)
    cut = draw(st.none() | st.integers(0, len(raw)))
    return raw if cut is None else raw[:cut]


@pytest.fixture(scope="module")
def fuzz_file(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "fuzz.idx"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.binary(max_size=80) | idx_like())
def test_read_idx_fuzz(fuzz_file, raw):
    fuzz_file.write_bytes(raw)
    try:
        assert isinstance(data.read_idx(fuzz_file), np.ndarray)
    except DdpmError as e:
        assert "\n" not in str(e)


# ---------------------------------------------------------------- finding and loading Fashion-MNIST

@pytest.mark.parametrize("gz", [True, False])
def test_find_and_load_explicit_dir(tmp_path, nowhere, gz):
    arrays = fake_fashion(tmp_path / "fm", gz=gz)
    assert data.find_fashion_mnist(tmp_path / "fm", download=False) == tmp_path / "fm"
    x = data.load_fashion_mnist("train", tmp_path / "fm", download=False)
    assert x.dtype == torch.uint8 and x.shape == (5, 1, 28, 28)
    np.testing.assert_array_equal(x[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    y = data.load_fashion_mnist_labels("test", str(tmp_path / "fm"), download=False)
    assert y.dtype == torch.int64 and y.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert data.load_fashion_mnist("test", tmp_path / "fm").shape == (3, 1, 28, 28)


def test_search_order_env_then_debian_then_cache(tmp_path, nowhere, monkeypatch):
    fake_fashion(data.cache_dir())
    assert data.find_fashion_mnist(download=False) == data.cache_dir()
    fake_fashion(nowhere / "debian")
    assert data.find_fashion_mnist(download=False) == nowhere / "debian"
    fake_fashion(nowhere / "env")
    assert data.find_fashion_mnist(download=False) == nowhere / "env"


def test_explicit_dir_without_files_does_not_fall_back(tmp_path, nowhere):
    fake_fashion(nowhere / "debian")
    with pytest.raises(DdpmError, match="lacks"):
        data.find_fashion_mnist(tmp_path / "env")


def test_bad_split(tmp_path, nowhere):
    fake_fashion(tmp_path / "fm")
    with pytest.raises(DdpmError, match="split"):
        data.load_fashion_mnist("valid", tmp_path / "fm")


def test_not_found_without_download(nowhere):
    with pytest.raises(DdpmError) as e:
        data.find_fashion_mnist(download=False)
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "--data" in msg
    assert "$DDPM_DATA" in msg and str(data.cache_dir()) in msg and "\n" not in msg


def serve(monkeypatch, tmp_path, corrupt: str | None = None, fail: bool = False):
    """Replace urlopen with an in-memory server of tiny gz files and matching MD5s."""
    arrays = fake_fashion(tmp_path / "served")
    files = {p.name: p.read_bytes() for p in (tmp_path / "served").iterdir()}
    monkeypatch.setattr(data, "MD5", {n: hashlib.md5(b).hexdigest() for n, b in files.items()})
    if corrupt:
        files[corrupt] = files[corrupt][:-1] + b"!"
    urls = []

    def fake_urlopen(url, timeout):
        assert timeout <= 60
        urls.append(url)
        if fail:
            raise URLError("no network")
        return io.BytesIO(files[url.removeprefix(data.MIRROR)])

    monkeypatch.setattr(data, "urlopen", fake_urlopen)
    return arrays, urls


def test_download_into_cache(tmp_path, nowhere, monkeypatch):
    arrays, urls = serve(monkeypatch, tmp_path)
    assert data.find_fashion_mnist() == data.cache_dir()
    assert sorted(p.name for p in data.cache_dir().iterdir()) == sorted(data.MD5)
    assert len(urls) == 4 and all(u.startswith(data.MIRROR) for u in urls)
    y = data.load_fashion_mnist_labels("train")
    assert y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert len(urls) == 4  # found in the cache now: no second download


def test_download_checksum_mismatch_leaves_nothing(tmp_path, nowhere, monkeypatch):
    bad = "t10k-images-idx3-ubyte.gz"
    serve(monkeypatch, tmp_path, corrupt=bad)
    with pytest.raises(DdpmError, match="MD5") as e:
        data.find_fashion_mnist()
    assert bad in str(e.value) and "--data" in str(e.value)
    left = [p.name for p in data.cache_dir().iterdir()]
    assert bad not in left and not any(n.endswith(".part") for n in left)


def test_download_offline(tmp_path, nowhere, monkeypatch):
    serve(monkeypatch, tmp_path, fail=True)
    with pytest.raises(DdpmError, match="no network") as e:
        data.find_fashion_mnist()
    assert "apt-get install dataset-fashion-mnist" in str(e.value) and "--data" in str(e.value)
    assert not any(data.cache_dir().iterdir())


@pytest.mark.skipif(not data.DEBIAN_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    x = data.load_fashion_mnist("train", data.DEBIAN_DIR, download=False)
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.uint8
    y = data.load_fashion_mnist_labels("test", data.DEBIAN_DIR, download=False)
    assert y.shape == (10000,) and y.dtype == torch.int64 and int(y.max()) == 9
    assert len(data.FASHION_MNIST_CLASSES) == 10


# ---------------------------------------------------------------- image folders

def png_16bit(path: Path, value: int, shape=(30, 30)) -> None:
    Image.fromarray(np.full(shape, value, np.uint16)).save(path)


@pytest.fixture
def image_dir(tmp_path):
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (30, 40), dtype=np.uint8), "L").save(root / "grey.png")
    Image.fromarray(rng.integers(0, 256, (50, 28, 3), dtype=np.uint8), "RGB").save(root / "rgb.png")
    Image.fromarray(rng.integers(0, 256, (32, 32, 4), dtype=np.uint8), "RGBA").save(root / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (20, 21, 3), dtype=np.uint8)).convert("P").save(root / "pal.png")
    png_16bit(root / "deep.png", 40000, (17, 33))
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(root / "sub" / "photo.JPG")
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.mark.parametrize("channels", [1, 3])
def test_image_folder_shapes(image_dir, channels):
    x = data.load_image_folder(image_dir, 16, channels)
    assert x.dtype == torch.uint8 and x.shape == (6, channels, 16, 16)
    assert torch.equal(x, data.load_image_folder(str(image_dir), 16, channels))  # deterministic
    assert torch.equal(x[0], data.load_image(image_dir / "deep.png", 16, channels))  # sorted order


def test_16bit_scaled_not_clipped(tmp_path):
    png_16bit(tmp_path / "white.png", 65535)
    png_16bit(tmp_path / "mid.png", 30000)
    assert data.load_image(tmp_path / "white.png", 8, 1).unique().tolist() == [255]
    assert data.load_image(tmp_path / "mid.png", 8, 3).unique().tolist() == [round(30000 / 257)]


def test_transparent_becomes_white(tmp_path):
    Image.new("RGBA", (10, 10), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert data.load_image(tmp_path / "clear.png", 4, 3).unique().tolist() == [255]


def test_resize_and_centre_crop(tmp_path):
    a = np.zeros((10, 30), np.uint8)
    a[:, 10:20] = 255  # only the middle third is white
    Image.fromarray(a, "L").save(tmp_path / "wide.png")
    x = data.load_image(tmp_path / "wide.png", 10, 1)
    assert x.shape == (1, 10, 10) and x[:, :, 2:8].min() == 255


def test_bad_images_skipped_with_warning(image_dir):
    (image_dir / "zero.png").write_bytes(b"")
    (image_dir / "text.png").write_text("hello, I am text")
    good = (image_dir / "rgb.png").read_bytes()
    (image_dir / "trunc.png").write_bytes(good[: len(good) // 2])
    with pytest.warns(UserWarning) as record:
        x = data.load_image_folder(image_dir, 8, 3)
    assert x.shape == (6, 3, 8, 8)
    messages = " ".join(str(w.message) for w in record)
    for name in ("zero.png", "text.png", "trunc.png"):
        assert name in messages


def test_all_bad_images(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.jpeg").write_text("text")
    with pytest.warns(UserWarning), pytest.raises(DdpmError, match="a.png"):
        data.load_image_folder(tmp_path, 8, 1)
    with pytest.raises(DdpmError, match="b.jpeg"):
        data.load_image(tmp_path / "b.jpeg", 8, 1)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DdpmError, match="no PNG/JPEG images found"):
        data.load_image_folder(tmp_path, 8, 1)
    with pytest.raises(DdpmError, match="does not exist"):
        data.load_image_folder(tmp_path / "missing", 8, 1)
    with pytest.raises(DdpmError, match="channels"):
        data.load_image_folder(tmp_path, 8, 2)


def test_load_dataset(tmp_path, image_dir, nowhere):
    fake_fashion(tmp_path / "fm")
    x = sources.load_dataset("fashion-mnist", size=32, channels=3, data_dir=tmp_path / "fm")
    assert x.shape == (5, 3, 32, 32) and x.dtype == torch.uint8
    assert torch.equal(x[:, 0], x[:, 2])
    same = sources.load_dataset("fashion-mnist", size=28, channels=1, data_dir=tmp_path / "fm", split="test")
    assert same.shape == (3, 1, 28, 28)
    assert sources.load_dataset(str(image_dir), size=8, channels=1).shape == (6, 1, 8, 8)


# ---------------------------------------------------------------- tensors and batches

def test_model_range_round_trip():
    u = torch.arange(256, dtype=torch.uint8)
    f = data.to_model_range(u)
    assert f.dtype == torch.float32 and f.min() == -1 and f.max() == 1
    assert torch.equal(data.from_model_range(f), u)
    assert data.from_model_range(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]


def test_random_hflip_matches_mask():
    x = torch.randint(0, 256, (16, 3, 4, 5), dtype=torch.uint8)
    mask = torch.rand(16, generator=torch.Generator().manual_seed(7)) < 0.5
    assert mask.any() and not mask.all()
    expected = torch.stack([img.flip(-1) if m else img for img, m in zip(x, mask)])
    out = data.random_hflip(x, torch.Generator().manual_seed(7))
    assert torch.equal(out, expected)
    assert torch.equal(out, data.random_hflip(x, torch.Generator().manual_seed(7)))


def indexed_images(n=10) -> torch.Tensor:
    """Image i is constant 10*i except a marker pixel, so flips and identity are both visible."""
    x = (torch.arange(n, dtype=torch.uint8) * 10).view(n, 1, 1, 1).repeat(1, 1, 3, 3)
    x[:, :, 0, 0] = 255
    return x


def ids(batch: torch.Tensor) -> list[int]:
    return (data.from_model_range(batch)[:, 0, 1, 1] // 10).tolist()


def test_batches_reproducible_and_float():
    a, b = (data.Batches(indexed_images(), 4, seed=3) for _ in range(2))
    first = next(a)
    assert first.dtype == torch.float32 and first.shape == (4, 1, 3, 3)
    assert first.min() >= -1 and first.max() <= 1
    assert torch.equal(first, next(b))
    for _ in range(6):
        assert torch.equal(next(a), next(b))
    c = data.Batches(indexed_images(), 4, seed=4)
    assert any(not torch.equal(next(a), next(c)) for _ in range(5))


@pytest.mark.parametrize("drop_last, steps, per_epoch", [(False, 4, 10), (True, 3, 9)])
def test_batches_cover_each_image_once_per_epoch(drop_last, steps, per_epoch):
    it = data.Batches(indexed_images(), 3, seed=0, flip=False, drop_last=drop_last)
    assert it.steps_per_epoch == steps
    for epoch in range(3):
        seen = sum((ids(next(it)) for _ in range(steps)), [])
        assert it.epoch == epoch and len(seen) == len(set(seen)) == per_epoch
    next(it)
    assert it.epoch == 3


def test_batches_flip_only_mirrors():
    x = indexed_images()
    it = data.Batches(x, 5, seed=0, flip=True)
    corners = [data.from_model_range(next(it))[:, 0, 0] for _ in range(8)]
    flipped = torch.cat(corners)
    assert (flipped[:, 0] == 255).any() and (flipped[:, 2] == 255).any()  # both orientations occur


def test_batches_resume_across_epochs():
    full = data.Batches(indexed_images(), 4, seed=11)  # 2 steps per epoch
    for _ in range(3):
        next(full)
    state = full.state_dict()
    assert state == {"epoch": 1, "index": 1}
    resumed = data.Batches(indexed_images(), 4, seed=11)
    resumed.load_state_dict(dict(state))
    for _ in range(7):
        assert torch.equal(next(full), next(resumed))
    assert full.state_dict() == resumed.state_dict()


def test_batches_errors():
    with pytest.raises(DdpmError):
        data.Batches(indexed_images(), 0, seed=0)
    with pytest.raises(DdpmError):
        data.Batches(indexed_images(), 11, seed=0)
    assert data.Batches(indexed_images(), 11, seed=0, drop_last=False).steps_per_epoch == 1
    with pytest.raises(DdpmError):
        data.Batches(indexed_images(), 2, seed=0).load_state_dict({"epoch": 0, "index": 99})
