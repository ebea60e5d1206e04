"""Shared test helpers: tiny made-up data, a tiny run config, the Gaussian oracle denoiser."""
from __future__ import annotations

import gzip
import os
import struct
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.config import DataConfig, DiffusionConfig, ModelConfig, RunConfig, TrainConfig
from ddpm.core.schedules import NoiseSchedule


def make_images(d: Path, n: int = 24, size: int = 12) -> Path:
    """n grey PNGs of a bright rectangle at a few positions."""
    rng = np.random.default_rng(0)
    for i in range(n):
        a = np.zeros((size, size), np.uint8)
        a[2 + i % 4: 8 + i % 4, 3:9] = 200 + rng.integers(0, 55)
        Image.fromarray(a).save(d / f"img{i:02d}.png")
    return d


def tiny_config(image_dir: Path, **train_opts: Any) -> RunConfig:
    """A 65k-parameter U-Net on 8x8 images: a step takes milliseconds."""
    return RunConfig(
        model=ModelConfig(dim=8, dim_mults=(1, 2), attn_heads=1, attn_dim_head=8, channels=1),
        diffusion=DiffusionConfig(timesteps=20),
        data=DataConfig(source=str(image_dir), image_size=8, channels=1),
        train=TrainConfig(**{"batch_size": 8, "epochs": None, "max_steps": 4, "checkpoint_every": 2,
                             "sample_every": 0, "sample_n": 4, "log_every": 1, **train_opts}),
        preset="tiny",
    )


def tiny_run(tmp: Path, image_dir: Path, num_classes: int = 0, **train_opts: Any) -> Path:
    """A tiny run trained a few steps in ``tmp/run``; a conditional one on a folder of one
    subfolder per class (``tmp/classes/c0`` ...)."""
    from dataclasses import replace

    from ddpm.training.train import train

    cfg = tiny_config(image_dir, **train_opts)
    if num_classes:
        for k in range(num_classes):
            make_images((tmp / "classes" / f"c{k}").mkdir(parents=True) or tmp / "classes" / f"c{k}", n=8)
        cfg = tiny_config(tmp / "classes", **train_opts)
        cfg = replace(cfg, model=replace(cfg.model, num_classes=num_classes))
    train(cfg, tmp / "run", device="cpu", progress=False, tensorboard=False, log=lambda s: None)
    return tmp / "run"


def write_config(path: Path, cfg: RunConfig) -> Path:
    path.write_text(cfg.to_json())
    return path


def oracle_eps_net(s: NoiseSchedule, mu: float, sd: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """E[eps | x_t] for data N(mu, sd^2) per dimension: sqrt(1 - a)(x - sqrt(a) mu) / (a sd^2 + 1 - a)."""
    ab = s.alpha_bar.double()

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = ab[t].reshape(-1, 1, 1, 1)
        return ((1 - a).sqrt() * (x.double() - a.sqrt() * mu) / (a * sd**2 + 1 - a)).float()

    return net


@contextmanager
def small_disk(folder: Path, size: str = "2m", read_only: bool = False) -> Iterator[Path]:
    """A real small file system (tmpfs) mounted at ``folder``, optionally read-only; the test is
    skipped, with the reason, where mounting is refused (not root, or a locked-down container)."""
    folder.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.strip() or r.returncode}")
    try:
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill_disk(folder: Path, leave: int = 0) -> Path:
    """Fill the file system of ``folder`` until only ``leave`` bytes (whole pages) are free."""
    filler = folder / "filler"
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize - leave
    with open(filler, "wb") as f:
        try:
            f.write(b"\0" * max(free, 0))
        except OSError:  # ENOSPC: full, as asked
            pass
    return filler


SEED_REFERENCE_DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "bench" / "seed_reference.py"
SEED_REFERENCE_REQUIRED = "DDPM_REQUIRE_SEED_REFERENCE"  # set by .ci/run, where the file must be


def seed_reference_path() -> Path:
    """Where the seed's script is: $SEED_REFERENCE, else the developers' ../shared/bench/."""
    return Path(os.environ.get("SEED_REFERENCE") or SEED_REFERENCE_DEFAULT)


def load_seed_reference() -> Any:
    """The seed's own code, imported by path. Missing: a loud failure where $DDPM_REQUIRE_SEED_REFERENCE
    is 1 (CI, which provides it), a skip with the reason everywhere else (a user's fresh clone has
    no ../shared). einops missing is always a failure: the test extras install it."""
    import importlib.util
    import sys

    path = seed_reference_path()
    if not path.is_file():
        why = (f"the seed reference is missing: expected {path} (the developers' "
               "../shared/bench/seed_reference.py; set SEED_REFERENCE to point elsewhere)")
        if os.environ.get(SEED_REFERENCE_REQUIRED) == "1":
            pytest.fail(why + f"; ${SEED_REFERENCE_REQUIRED}=1 says it must be here")
        pytest.skip(why)
    try:
        import einops  # noqa: F401
    except ImportError:
        pytest.fail("seed_reference.py needs einops: pip install -e '.[test]'")
    name = "seed_reference"
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path):
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------- made-up data files

CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(np.int16): 0x0B,
         np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D, np.dtype(np.float64): 0x0E}


def idx_bytes(a: np.ndarray) -> bytes:
    header = bytes([0, 0, CODES[a.dtype], a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape)
    return header + a.astype(a.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, a: np.ndarray) -> Path:
    raw = idx_bytes(a)
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


def fake_fashion(root: Path, n_train=5, n_test=3, gz=True) -> dict[str, np.ndarray]:
    """Tiny stand-ins for the 4 Fashion-MNIST files; returns the arrays by file name."""
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, a in arrays.items():
        write_idx(root / (name + ".gz" if gz else name), a)
    return arrays


def labelled_folder(root: Path, names=("Sneaker", "Bag"), n: int = 6, size: int = 28) -> Path:
    """root/<class>/*.png: class i is grey level 40 + 170 i, so an image shows its label."""
    for i, name in enumerate(sorted(names)):  # label order: sorted folder names
        (root / name).mkdir(parents=True)
        for j in range(n):
            a = np.full((size, size), 40 + 170 * i, np.uint8)
            a[j % 5: j % 5 + 4, 2:6] = 128
            Image.fromarray(a).save(root / name / f"{j}.png")
    return root
