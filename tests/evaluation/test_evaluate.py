"""Tests for ddpm.features and ddpm.evaluate: the shipped net, files, caching, the report."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ddpm.evaluation.metrics import frechet_distance, gaussian_stats
from ddpm.errors import DdpmError
from ddpm.evaluation.evaluate import EvalReport, evaluate_images, inception_fid, reference_stats
from ddpm.evaluation.features import (FeatureNet, FeatureNetConfig, FeatureNetMeta, default_feature_net,
                           fit_classifier, load_feature_net, random_shift, save_feature_net)

FMNIST = Path("/usr/share/datasets/fashion-mnist")
TINY = FeatureNetConfig(size=12, widths=(4, 8), convs_per_stage=(1, 1), feature_dim=6, num_classes=3)


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch) -> Path:
    """Keep the statistics cache out of the real home."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "ddpm" / "eval-stats"


def tiny_net(seed: int = 0) -> FeatureNet:
    torch.manual_seed(seed)
    return FeatureNet(TINY).eval()


def blobs(n: int, seed: int, bright: int = 0, size: int = 12) -> torch.Tensor:
    """uint8 (n, 1, size, size) noise images, optionally brightened."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 160, (n, 1, size, size), generator=g) + bright
    return x.clamp(0, 255).to(torch.uint8)


# ---------------------------------------------------------------- feature net

def test_shipped_feature_net_loads():
    net = default_feature_net()
    assert net.meta is not None and net.meta.test_accuracy is not None
    assert net.config.size == 28 and net.config.channels == 1 and net.config.num_classes == 10
    x = torch.zeros(3, 1, 28, 28, dtype=torch.uint8)
    assert net.features(x).shape == (3, net.config.feature_dim) and net(x).shape == (3, 10)


def test_save_load_round_trip(tmp_path):
    net = tiny_net()
    meta = FeatureNetMeta(test_accuracy=0.5, notes="tiny")
    path = save_feature_net(net, tmp_path / "net.safetensors", meta)
    doc = json.loads(path.with_suffix(".json").read_text())
    assert doc["config"]["widths"] == [4, 8] and doc["meta"]["test_accuracy"] == 0.5
    loaded = load_feature_net(path)
    x = blobs(5, 0)
    assert loaded.config == TINY and loaded.meta.notes == "tiny"
    torch.testing.assert_close(loaded.embed_and_classify(x).features, net.embed_and_classify(x).features)


def test_load_rejects_tampered_weights(tmp_path):
    path = save_feature_net(tiny_net(), tmp_path / "net.safetensors")
    save_feature_net(tiny_net(seed=1), tmp_path / "other.safetensors")
    path.write_bytes((tmp_path / "other.safetensors").read_bytes())
    with pytest.raises(DdpmError, match="digest"):
        load_feature_net(path)
    with pytest.raises(DdpmError, match="cannot read"):
        load_feature_net(tmp_path / "missing.safetensors")


def test_fit_classifier_learns_a_trivial_task():
    # Class = image brightness band: a few steps must beat chance clearly.
    x = torch.cat([blobs(32, s, bright=b) for s, b in ((0, 0), (1, 60), (2, 120))])
    y = torch.arange(3).repeat_interleave(32)
    net, acc = fit_classifier(x, y, epochs=3, batch_size=16, lr=1e-2, seed=0, test_images=x,
                              test_labels=y, config=TINY)
    assert acc > 0.6 and net.meta.recipe.epochs == 3
    with pytest.raises(DdpmError, match="labels"):
        fit_classifier(x, y[:-1], epochs=1, batch_size=8, lr=1e-3, seed=0, config=TINY)


def test_random_shift_moves_content_and_keeps_shape():
    x = torch.zeros(64, 1, 8, 8, dtype=torch.uint8)
    x[:, :, 4, 4] = 255
    y = random_shift(x, 2, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and (y == 255).sum(dim=(1, 2, 3)).eq(1).all()
    rows = (y == 255).nonzero()[:, 2]
    assert rows.min() == 2 and rows.max() == 6  # all five offsets occur in 64 draws


# ---------------------------------------------------------------- evaluation

def test_evaluate_images_tiny_synthetic(user_cache):
    net, ref, pool = tiny_net(), blobs(120, 1), blobs(200, 2)
    report = evaluate_images(blobs(40, 3), feature_net=net, reference=ref, floor=pool,
                             kid_subsets=5, seed=0)
    assert isinstance(report, EvalReport) and report.n_samples == 40 and report.n_reference == 120
    assert report.fd >= 0 and report.fd_reference >= 0 and sum(report.class_histogram) == 40
    assert 0 <= report.precision <= 1 and 0 <= report.recall <= 1
    d = replace(report, sampler="ddim", steps=50, nfe=50).to_dict()
    assert d["sampler"] == "ddim" and isinstance(d["class_histogram"], list)
    json.dumps(d)
    assert "FD=" in report.summary()
    assert len(list(user_cache.glob("ref-*.safetensors"))) == 1  # reference features cached
    assert len(list(user_cache.glob("floor-*.txt"))) == 1  # and the real-data floor
    again = evaluate_images(blobs(40, 3), feature_net=net, reference=ref, floor=pool,
                            kid_subsets=5, seed=0)
    assert replace(again, seconds=0) == replace(report, seconds=0)  # cache hit, same numbers


def test_evaluate_separates_near_from_far():
    net, ref = tiny_net(), blobs(150, 1)
    near = evaluate_images(blobs(60, 4), feature_net=net, reference=ref, floor=None, kid_subsets=5)
    far = evaluate_images(blobs(60, 4, bright=95), feature_net=net, reference=ref, floor=None, kid_subsets=5)
    assert near.fd_reference is None
    assert far.fd > 5 * near.fd and far.kid_mean > near.kid_mean


def test_reference_cache_is_keyed_by_weights_and_rebuilt_when_damaged(user_cache):
    ref = blobs(50, 1)
    a = reference_stats(tiny_net(0), ref)
    b = reference_stats(tiny_net(1), ref)
    files = sorted(user_cache.glob("ref-*.safetensors"))
    assert len(files) == 2 and not torch.equal(a.features, b.features)
    files[0].write_bytes(b"garbage")
    for net in (tiny_net(0), tiny_net(1)):
        assert reference_stats(net, ref).features.shape == (50, TINY.feature_dim)
    assert not list(user_cache.glob(".*tmp*"))  # atomic writes leave no temporary files


def test_wrong_images_raise_clear_errors():
    net = tiny_net()
    for bad in (torch.zeros(10, 1, 28, 28, dtype=torch.uint8), torch.zeros(10, 3, 12, 12, dtype=torch.uint8),
                torch.zeros(10, 1, 12, 12)):
        with pytest.raises(DdpmError, match=r"expects uint8 images of shape \(N, 1, 12, 12\)"):
            evaluate_images(bad, feature_net=net, reference=blobs(20, 0), floor=None)
    with pytest.raises(DdpmError, match="more than 3 images"):
        evaluate_images(blobs(3, 0), feature_net=net, reference=blobs(20, 0), floor=None)
    with pytest.raises(DdpmError, match="unknown reference"):
        evaluate_images(blobs(10, 0), feature_net=net, reference="imagenet", floor=None)


def test_inception_fid_explains_what_it_needs(tmp_path):
    x = torch.zeros(4, 1, 28, 28, dtype=torch.uint8)
    with pytest.raises(DdpmError, match="Inception weights on disk: pass --inception-weights PATH"):
        inception_fid(x, x, None)
    with pytest.raises(DdpmError, match="not found"):
        inception_fid(x, x, tmp_path / "nope.pth")


@pytest.fixture(scope="module")
def fmnist_test_embedded():
    """The shipped net's features and logits of the 10,000 Fashion-MNIST test images, and their labels."""
    if not FMNIST.is_dir():
        pytest.skip("Fashion-MNIST not installed")
    from ddpm.data import load_fashion_mnist, load_fashion_mnist_labels
    net = default_feature_net()
    return net, net.embed_and_classify(load_fashion_mnist("test", FMNIST)), load_fashion_mnist_labels("test", FMNIST)


def test_shipped_feature_net_accuracy_measured_on_the_test_set(fmnist_test_embedded):
    """Measured here, not read from the sidecar: the classifier's accuracy on the 10k test split,
    and the sidecar's recorded figure is that measurement (to 5 images in 10,000)."""
    net, embedded, labels = fmnist_test_embedded
    assert len(labels) == 10_000
    accuracy = (embedded.logits.argmax(dim=1) == labels).double().mean().item()
    assert accuracy >= 0.92
    assert accuracy == pytest.approx(net.meta.test_accuracy, abs=5e-4)


def test_real_test_images_are_close_and_noise_is_far(fmnist_test_embedded):
    net, embedded, _ = fmnist_test_embedded
    mu, sigma = gaussian_stats(embedded.features)
    real = frechet_distance(*gaussian_stats(embedded.features[:2000]), mu, sigma)
    noise = torch.randint(0, 256, (2000, 1, 28, 28), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    fake = frechet_distance(*gaussian_stats(net.embed_and_classify(noise).features), mu, sigma)
    assert real < 0.05 * fake
