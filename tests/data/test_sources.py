"""The data sources: each says its shape, channels, classes, test split and the evaluation that
fits it, and reads its splits at a run's size and channels (image folders, .npz arrays, Hugging
Face datasets on disk that the tests write themselves)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.data import sources
from ddpm.data.sources import (class_counts, class_names, describe, first_image, has_test_split, load_dataset,
                               load_labeled_dataset)
from ddpm.errors import DdpmError
from helpers import fake_fashion


def rgb_folder(root: Path, classes=("cat", "dog"), n: int = 3, size: int = 16, test: int = 0) -> Path:
    """``root/<class>/i.png`` colour squares (red for the first class, blue for the second), and
    ``root/test/<class>/...`` when ``test``."""
    for part, count in (("", n), ("test", test)):
        for k, c in enumerate(classes):
            d = root / part / c
            if count:
                d.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                a = np.zeros((size, size + 4, 3), np.uint8)  # not square: read as the folders crop
                a[..., 0 if k == 0 else 2] = 200 + i
                Image.fromarray(a).save(d / f"{i}.png")
    return root


def test_fashion_mnist_describes_itself(tmp_path: Path) -> None:
    info = describe("fashion-mnist")
    assert info.shape == (1, 28, 28) and len(info.classes) == 10 and info.test == "fashion-mnist-test"
    assert info.evaluation == "fd-fmnist" and info.kind == "named"
    fake_fashion(tmp_path / "fm", n_train=5, n_test=3)
    assert load_dataset("fashion-mnist", size=28, channels=1, data_dir=tmp_path / "fm", split="test").shape == (3, 1, 28, 28)
    assert load_dataset("fashion-mnist", size=32, channels=3, data_dir=tmp_path / "fm").shape == (5, 3, 32, 32)


def test_an_rgb_folder_with_classes_and_a_test_split(tmp_path: Path) -> None:
    root = rgb_folder(tmp_path / "pets", n=3, test=2)
    info = describe(str(root))
    assert info.kind == "folder" and info.shape == (3, 16, 20) and info.classes == ("cat", "dog")
    assert info.test == str(root / "test") and info.evaluation == "none"
    lab = load_labeled_dataset(str(root), size=8, channels=3)
    assert lab.images.shape == (6, 3, 8, 8) and lab.labels.tolist() == [0, 0, 0, 1, 1, 1]  # test/ is not trained on
    assert (lab.images[:3, 0] > 150).all() and (lab.images[3:, 2] > 150).all()  # red cats, blue dogs
    test = load_labeled_dataset(str(root), size=8, channels=3, split="test")
    assert test.images.shape == (4, 3, 8, 8) and test.labels.tolist() == [0, 0, 1, 1]
    assert class_names(str(root)) == ("cat", "dog") and class_counts(str(root)) == (3, 3)
    assert load_dataset(str(root), size=8, channels=1).shape == (6, 1, 8, 8)  # colour read as grey
    assert first_image(str(root), size=8).shape == (3, 8, 8)


def test_a_folder_without_a_test_split_says_so_and_a_test_source_stands_in(tmp_path: Path) -> None:
    root = rgb_folder(tmp_path / "pets", n=2)
    assert describe(str(root)).test is None and not has_test_split(str(root))
    with pytest.raises(DdpmError, match="has no test split"):
        load_dataset(str(root), size=8, channels=3, split="test")
    other = rgb_folder(tmp_path / "held-out", n=1)
    assert has_test_split(str(root), str(other))
    test = load_labeled_dataset(str(root), size=8, channels=3, split="test", test_source=str(other))
    assert test.images.shape == (2, 3, 8, 8) and test.class_names == ("cat", "dog")
    wrong = rgb_folder(tmp_path / "wrong", classes=("cow",), n=1)
    with pytest.raises(DdpmError, match="has classes cow"):
        load_labeled_dataset(str(root), size=8, channels=3, split="test", test_source=str(wrong))


@pytest.mark.parametrize("layout", ["NHW", "NHWC", "NCHW", "NHWC1"])
def test_npz_layouts(tmp_path: Path, layout: str) -> None:
    rng = np.random.default_rng(0)
    grey = layout in ("NHW", "NHWC1")
    x = rng.integers(0, 256, (6, 10, 10) if grey else (6, 10, 10, 3), dtype=np.uint8)  # (N, H, W[, C])
    stored = {"NHW": x, "NHWC1": x[..., None], "NHWC": x, "NCHW": x.transpose(0, 3, 1, 2) if not grey else x}[layout]
    path = tmp_path / "data.npz"
    np.savez(path, images=stored, labels=np.arange(6) % 3, class_names=np.array(["a", "b", "c"]),
             test_images=stored[:2], test_labels=np.array([2, 0]))
    info = describe(str(path))
    c = 1 if grey else 3
    assert info.kind == "npz" and info.shape == (c, 10, 10) and info.classes == ("a", "b", "c")
    assert info.test is not None and info.evaluation == "none"
    lab = load_labeled_dataset(str(path), size=10, channels=c)
    want = x[:, None] if grey else x.transpose(0, 3, 1, 2)
    assert np.array_equal(lab.images.numpy(), want) and lab.labels.tolist() == [0, 1, 2, 0, 1, 2]
    test = load_labeled_dataset(str(path), size=5, channels=3, split="test")
    assert test.images.shape == (2, 3, 5, 5) and test.labels.tolist() == [2, 0] and test.class_names == ("a", "b", "c")
    assert class_counts(str(path)) == (2, 2, 2)


def test_npz_without_labels_or_test_split(tmp_path: Path) -> None:
    path = tmp_path / "plain.npz"
    np.savez(path, images=np.zeros((4, 8, 8), np.uint8))
    info = describe(str(path))
    assert info.classes == () and info.test is None
    assert load_dataset(str(path), size=8, channels=1).shape == (4, 1, 8, 8)
    with pytest.raises(DdpmError, match="has no labels"):
        load_labeled_dataset(str(path), size=8, channels=1)
    with pytest.raises(DdpmError, match="has no test split"):
        load_dataset(str(path), size=8, channels=1, split="test")
    np.savez(tmp_path / "numbered.npz", images=np.zeros((3, 8, 8), np.uint8), labels=np.array([0, 1, 1]))
    assert class_names(str(tmp_path / "numbered.npz")) == ("0", "1")  # no class_names: the label numbers


@pytest.mark.parametrize("arrays, message", [
    ({"pictures": np.zeros((2, 8, 8), np.uint8)}, "has no 'images' array (it holds pictures)"),
    ({"images": np.zeros((2, 8, 8), np.float32)}, "images must be uint8"),
    ({"images": np.zeros((2, 8, 8, 5), np.uint8)}, "C 1 or 3"),
    ({"images": np.zeros((2, 8, 8), np.uint8), "labels": np.array([0, 1, 2])}, "labels must be 2"),
    ({"images": np.zeros((2, 8, 8), np.uint8), "labels": np.array([0, 4]), "class_names": np.array(["a"])},
     "reaches class 4"),
])
def test_bad_npz_is_one_line(tmp_path: Path, arrays: dict, message: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DdpmError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_labeled_dataset(str(path), size=8, channels=1)
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(DdpmError, match="not an .npz"):
        describe(str(tmp_path / "junk.npz"))


def test_unknown_source_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(DdpmError, match="unknown data source .*missing': it does not exist; use fashion-mnist"):
        load_dataset(str(tmp_path / "missing"), size=8, channels=1)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DdpmError, match="is not a folder, an .npz or a Hugging Face dataset"):
        describe(str(tmp_path / "file.txt"))


def test_hf_without_datasets_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(DdpmError, match=r"needs the datasets package: pip install ddpm\[hf\]"):
        describe(str(tmp_path / "d.parquet"))


# ---------------------------------------------------------------- Hugging Face datasets (needs `datasets`)

def _hf_dataset(n: int, colour: bool):
    datasets = pytest.importorskip("datasets", reason="the Hugging Face tests need the datasets package (ddpm[hf])")
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (12, 12, 3) if colour else (12, 12), dtype=np.uint8))
              for _ in range(n)]
    # The layout of load_dataset("fashion_mnist"): an Image column and a ClassLabel column.
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["shoe", "bag"])})
    return datasets, datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in range(n)]},
                                                features=features)


def test_hf_save_to_disk_folder(tmp_path: Path) -> None:
    datasets, train = _hf_dataset(6, colour=True)
    _, test = _hf_dataset(2, colour=True)
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "hf"))
    info = describe(str(tmp_path / "hf"))
    assert info.kind == "hf" and info.shape == (3, 12, 12) and info.classes == ("shoe", "bag")
    assert info.test is not None and info.evaluation == "none"
    lab = load_labeled_dataset(str(tmp_path / "hf"), size=8, channels=3)
    assert lab.images.shape == (6, 3, 8, 8) and lab.labels.tolist() == [0, 1, 0, 1, 0, 1]
    assert load_dataset(str(tmp_path / "hf"), size=8, channels=3, split="test").shape == (2, 3, 8, 8)
    assert class_counts(str(tmp_path / "hf")) == (3, 3)
    train.save_to_disk(str(tmp_path / "one"))  # a single Dataset: training only
    assert describe(str(tmp_path / "one")).test is None


def test_hf_parquet_file_and_folder(tmp_path: Path) -> None:
    _, train = _hf_dataset(5, colour=False)
    train.to_parquet(str(tmp_path / "train.parquet"))
    info = describe(str(tmp_path / "train.parquet"))
    assert info.shape == (1, 12, 12) and info.classes == ("shoe", "bag") and info.test is None
    assert load_dataset(str(tmp_path / "train.parquet"), size=12, channels=1).shape == (5, 1, 12, 12)
    folder = tmp_path / "pq"
    folder.mkdir()
    train.to_parquet(str(folder / "train-00000.parquet"))
    _hf_dataset(3, colour=False)[1].to_parquet(str(folder / "test-00000.parquet"))
    assert describe(str(folder)).test is not None
    assert load_dataset(str(folder), size=12, channels=1, split="test").shape == (3, 1, 12, 12)


def test_hf_imagefolder_and_offline(tmp_path: Path) -> None:
    import os

    pytest.importorskip("datasets", reason="the Hugging Face tests need the datasets package (ddpm[hf])")
    root = rgb_folder(tmp_path / "pets", n=2)
    info = describe(f"hf:{root}")
    assert info.kind == "hf" and info.shape[0] == 3 and info.classes == ("cat", "dog")
    assert load_labeled_dataset(f"hf:{root}", size=8, channels=3).labels.tolist() == [0, 0, 1, 1]
    assert os.environ["HF_DATASETS_OFFLINE"] == "1" and os.environ["HF_HUB_OFFLINE"] == "1"


def test_hf_without_an_image_column_is_one_line(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets", reason="the Hugging Face tests need the datasets package (ddpm[hf])")
    datasets.Dataset.from_dict({"text": ["a", "b"], "score": [1, 2]}).save_to_disk(str(tmp_path / "text"))
    with pytest.raises(DdpmError, match=r"has no image column \(its columns: text \(Value\), score \(Value\)\)"):
        load_dataset(str(tmp_path / "text"), size=8, channels=1)
    with pytest.raises(DdpmError, match="does not exist"):
        describe(f"hf:{tmp_path / 'nothing'}")


def test_the_kinds_table_is_where_a_path_is_recognised() -> None:
    assert list(sources.KINDS) == ["npz", "hf", "folder"]
    assert all(k.summary for k in sources.KINDS.values())
