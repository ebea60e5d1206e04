"""Runs made before the processes table sample the same images: the shipped model and tiny
seeded U-Nets under each objective and schedule, every sampler, against the images the code
drew before (tests/fixtures/old_samples.npz, written by tools/old_samples.py at that commit).
Where the arithmetic was reordered (alpha and sigma in place of alpha_bar), at most one grey
level may differ, on a few pixels."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
OLD = np.load(ROOT / "tests/fixtures/old_samples.npz")


def _maker():
    spec = importlib.util.spec_from_file_location("old_samples", ROOT / "tools/old_samples.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def now(tmp_path_factory) -> dict[str, np.ndarray]:
    out = tmp_path_factory.mktemp("old") / "now.npz"
    _maker().main(str(out))
    return dict(np.load(out))


@pytest.mark.parametrize("key", sorted(OLD.files))
def test_old_runs_sample_the_same_images(now, key):
    old, new = OLD[key].astype(int), now[key].astype(int)
    assert old.shape == new.shape
    diff = np.abs(old - new)
    assert diff.max() <= 1, f"{key}: {int((diff > 1).sum())} pixels differ by more than one grey level"
    assert (diff > 0).mean() <= 0.01, f"{key}: {(diff > 0).mean():.2%} of the pixels differ"
