"""A small Fashion-MNIST classifier whose penultimate layer is the embedding for FD/KID/PR.

Inception-v3 features (FID, Heusel et al. 2017) are meaningless for 28x28 greyscale clothes
and need weights from the internet; a domain classifier trained here is the usual offline
substitute ("FID with a dataset-specific classifier", e.g. the MNIST/Fashion-MNIST scores of
the GAN-evaluation literature). Its weights ship in ``ddpm/assets``.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from ..files import atomic_write_bytes, atomic_write_text
from ..data.readers import FASHION_MNIST_CLASSES, random_hflip, to_model_range
from ..errors import DdpmError

ASSET_NAME = "fmnist_features"
FORMAT_VERSION = 1
INFER_BATCH = 1000


@dataclass(frozen=True)
class FeatureNetConfig:
    """The architecture: stages of `convs_per_stage` 3x3 convs of `widths` channels, max-pooled after the first."""

    channels: int = 1
    size: int = 28
    widths: tuple[int, ...] = (32, 64, 128)
    convs_per_stage: tuple[int, ...] = (1, 2, 1)
    pooled: int = 3  # spatial side after the adaptive pool, so any image size works
    feature_dim: int = 128
    num_classes: int = 10


@dataclass(frozen=True)
class TrainRecipe:
    """How the shipped weights were made, recorded next to them."""

    epochs: int
    batch_size: int
    lr: float
    seed: int
    weight_decay: float
    label_smoothing: float
    augment: str
    train_images: int
    seconds: float  # wall clock
    cpu_seconds: float  # process CPU time, less sensitive to other load on the machine
    threads: int
    torch_version: str = torch.__version__


@dataclass(frozen=True)
class FeatureNetMeta:
    """The JSON sidecar of a feature net: what it is, what it was trained on, how well it does."""

    dataset: str = "fashion-mnist"
    class_names: tuple[str, ...] = FASHION_MNIST_CLASSES
    test_accuracy: float | None = None
    recipe: TrainRecipe | None = None
    notes: str = ""
    weights_sha256: str = field(default="", compare=False)  # filled in on save/load


class FitResult(NamedTuple):
    net: FeatureNet
    test_accuracy: float | None


class FeatureNet(nn.Module):
    """Conv-BN-ReLU stages, a `feature_dim` embedding (BN, pre-ReLU), and a linear class head."""

    def __init__(self, config: FeatureNetConfig = FeatureNetConfig()):
        super().__init__()
        self.config = config
        self.meta: FeatureNetMeta | None = None
        layers: list[nn.Module] = []
        c_in = config.channels
        for width, n_convs in zip(config.widths, config.convs_per_stage, strict=True):
            # Pool straight after the stage's first conv: BN and ReLU then run on a quarter of
            # the pixels, which is most of the training time on a CPU.
            layers += [nn.Conv2d(c_in, width, 3, padding=1, bias=False), nn.MaxPool2d(2),
                       nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            for _ in range(n_convs - 1):
                layers += [nn.Conv2d(width, width, 3, padding=1, bias=False),
                           nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            c_in = width
        layers.append(nn.AdaptiveAvgPool2d(config.pooled))
        self.trunk = nn.Sequential(*layers)
        # Pre-activation, batch-normalised features: roughly Gaussian with comparable scales
        # per dimension, which suits the Gaussian fit of FD better than sparse post-ReLU ones.
        self.embed = nn.Sequential(nn.Flatten(),
                                   nn.Linear(c_in * config.pooled ** 2, config.feature_dim, bias=False),
                                   nn.BatchNorm1d(config.feature_dim))
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(0.2), nn.Linear(config.feature_dim, config.num_classes))
        self.to(memory_format=torch.channels_last)  # faster convolutions on CPU

    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        # uint8 images are scaled here so callers never guess the range; floats are taken as [-1, 1].
        x = to_model_range(x) if x.dtype == torch.uint8 else x.to(torch.float32)
        return x.contiguous(memory_format=torch.channels_last)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) uint8 images -> (B, feature_dim) embedding."""
        return self.embed(self.trunk(self._scale(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) uint8 images -> (B, num_classes) logits."""
        return self.head(self.features(x))

    def check_images(self, images: torch.Tensor) -> None:
        """Raise a DdpmError unless `images` is uint8 (N, channels, size, size) for this net."""
        c, s = self.config.channels, self.config.size
        if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != (c, s, s):
            raise DdpmError(f"the feature net expects uint8 images of shape (N, {c}, {s}, {s}), got "
                            f"{images.dtype} {tuple(images.shape)}"
                            + ("; other datasets need Inception FID" if images.ndim == 4 else ""))

    @torch.inference_mode()
    def embed_and_classify(self, images: torch.Tensor, batch_size: int = INFER_BATCH) -> Embedded:
        """Features and logits of many uint8 images, in batches, in eval mode, on the net's device."""
        self.check_images(images)
        was_training, device = self.training, next(self.parameters()).device
        self.eval()
        feats, logits = [], []
        for chunk in images.split(batch_size):
            f = self.features(chunk.to(device))
            feats.append(f.float().cpu())
            logits.append(self.head(f).float().cpu())
        self.train(was_training)
        empty = torch.empty(0, self.config.feature_dim), torch.empty(0, self.config.num_classes)
        return Embedded(torch.cat(feats) if feats else empty[0], torch.cat(logits) if logits else empty[1])


class Embedded(NamedTuple):
    features: torch.Tensor  # (N, feature_dim) float32
    logits: torch.Tensor  # (N, num_classes) float32


# ---------------------------------------------------------------- training

def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by a random integer offset in [-max_shift, max_shift]^2, zero-filled."""
    if max_shift == 0:
        return x
    b, _, h, w = x.shape
    p = max_shift
    padded = F.pad(x, (p, p, p, p))
    oy, ox = torch.randint(0, 2 * p + 1, (2, b), generator=generator).to(x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (B, H, 1)
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (B, 1, W)
    idx = torch.arange(b, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[idx, rows, cols].permute(0, 3, 1, 2).contiguous()


def _check_training_data(images: torch.Tensor, labels: torch.Tensor, config: FeatureNetConfig) -> None:
    c, s = config.channels, config.size
    if images.dtype != torch.uint8 or tuple(images.shape[1:]) != (c, s, s):
        raise DdpmError(f"fit_classifier needs uint8 (N, {c}, {s}, {s}) images, got "
                        f"{images.dtype} {tuple(images.shape)}")
    if labels.shape != (len(images),):
        raise DdpmError(f"got {len(images)} images but labels of shape {tuple(labels.shape)}")
    if len(labels) and (labels.min() < 0 or labels.max() >= config.num_classes):
        raise DdpmError(f"labels must lie in [0, {config.num_classes}), got {labels.min()}..{labels.max()}")


def accuracy(net: FeatureNet, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of `net` on uint8 images."""
    logits = net.embed_and_classify(images).logits
    return (logits.argmax(1) == labels.cpu()).float().mean().item()


def _train_epoch(net, opt, sched, images, labels, batch_size, gen, label_smoothing, max_shift) -> float:
    perm = torch.randperm(len(images), generator=gen)
    total = 0.0
    for start in range(0, len(images) - batch_size + 1, batch_size):
        idx = perm[start:start + batch_size]
        x = random_shift(random_hflip(images[idx], gen), max_shift, gen)
        loss = F.cross_entropy(net(x), labels[idx], label_smoothing=label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total += loss.item()
    return total / max(1, len(images) // batch_size)


def _train(config: FeatureNetConfig, images, labels, *, epochs, batch_size, lr, weight_decay,
           label_smoothing, max_shift, gen, log) -> FeatureNet:
    net = FeatureNet(config)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * (len(images) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, steps))
    t0 = time.perf_counter()
    for epoch in range(epochs):
        net.train()
        loss = _train_epoch(net, opt, sched, images, labels, batch_size, gen, label_smoothing, max_shift)
        if log:
            log(f"epoch {epoch + 1}/{epochs}: loss {loss:.4f} ({time.perf_counter() - t0:.0f} s)")
    return net.eval()


def fit_classifier(images: torch.Tensor, labels: torch.Tensor, *, epochs: int = 8, batch_size: int = 128,
                   lr: float = 3e-3, seed: int = 0, test_images: torch.Tensor | None = None,
                   test_labels: torch.Tensor | None = None, channels: int = 1, size: int = 28,
                   weight_decay: float = 5e-4, label_smoothing: float = 0.1, max_shift: int = 2,
                   config: FeatureNetConfig | None = None, log: Callable[[str], None] | None = None
                   ) -> FitResult:
    """Train a FeatureNet with AdamW and a one-cycle LR (Smith & Topin 2017); flips + shifts."""
    config = config or FeatureNetConfig(channels=channels, size=size)
    _check_training_data(images, labels, config)
    if batch_size < 1 or batch_size > len(images):
        raise DdpmError(f"batch size {batch_size} must be between 1 and the {len(images)} images")
    if (test_images is None) != (test_labels is None):
        raise DdpmError("pass test_images and test_labels together")
    with torch.random.fork_rng(devices=[]):  # init and dropout draw from the global stream
        torch.manual_seed(seed)
        t0, c0 = time.perf_counter(), time.process_time()
        net = _train(config, images, labels.long(), epochs=epochs, batch_size=batch_size, lr=lr,
                     weight_decay=weight_decay, label_smoothing=label_smoothing, max_shift=max_shift,
                     gen=torch.Generator().manual_seed(seed), log=log)
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    acc = None if test_images is None else accuracy(net, test_images, test_labels)
    net.meta = FeatureNetMeta(test_accuracy=acc, recipe=TrainRecipe(
        epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, weight_decay=weight_decay,
        label_smoothing=label_smoothing, augment=f"hflip p=0.5, shift <= {max_shift} px",
        train_images=len(images), seconds=round(seconds, 1), cpu_seconds=round(cpu_seconds, 1),
        threads=torch.get_num_threads()))
    return FitResult(net, acc)


# ---------------------------------------------------------------- files

def weights_digest(net: FeatureNet) -> str:
    """SHA-256 of the weights (names, shapes and bytes), the identity used for cache keys."""
    h = hashlib.sha256()
    for name, t in sorted(net.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def save_feature_net(net: FeatureNet, path: str | Path, meta: FeatureNetMeta | None = None) -> Path:
    """Write `path` (.safetensors weights) and its .json sidecar (config + meta), each atomically."""
    path = Path(path)
    meta = meta or net.meta or FeatureNetMeta()
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, save_safetensors_bytes(state))
    doc = {"format_version": FORMAT_VERSION, "config": asdict(net.config),
           "meta": {**asdict(meta), "weights_sha256": weights_digest(net)}}
    atomic_write_text(_sidecar(path), json.dumps(doc, indent=2) + "\n")
    return path


def _meta_from_dict(d: dict) -> FeatureNetMeta:
    recipe = d.get("recipe")
    return FeatureNetMeta(dataset=d.get("dataset", ""), class_names=tuple(d.get("class_names", ())),
                          test_accuracy=d.get("test_accuracy"),
                          recipe=TrainRecipe(**recipe) if recipe else None,
                          notes=d.get("notes", ""), weights_sha256=d.get("weights_sha256", ""))


def _read_sidecar(path: Path) -> tuple[FeatureNetConfig, FeatureNetMeta]:
    side = _sidecar(path)
    try:
        doc = json.loads(side.read_text())
        cfg = doc["config"]
        config = FeatureNetConfig(**{**cfg, "widths": tuple(cfg["widths"]),
                                     "convs_per_stage": tuple(cfg["convs_per_stage"])})
        return config, _meta_from_dict(doc.get("meta", {}))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DdpmError(f"cannot read feature-net description {side}: {e}") from None


def load_feature_net(path: str | Path) -> FeatureNet:
    """A FeatureNet (eval mode, CPU) from `path` (.safetensors) and its .json sidecar."""
    path = Path(path)
    config, meta = _read_sidecar(path)
    try:
        state = load_safetensors_bytes(path.read_bytes())
    except (OSError, SafetensorError) as e:
        raise DdpmError(f"cannot read feature-net weights {path}: {e}") from None
    net = FeatureNet(config)
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise DdpmError(f"feature-net weights {path} do not match its config: "
                        f"{str(e).splitlines()[0]}") from None
    digest = weights_digest(net)
    if meta.weights_sha256 and meta.weights_sha256 != digest:
        raise DdpmError(f"feature-net weights {path} do not match the digest in {_sidecar(path)}")
    net.meta = FeatureNetMeta(**{**meta.__dict__, "weights_sha256": digest})
    return net.eval()


def default_feature_net() -> FeatureNet:
    """The shipped Fashion-MNIST feature net (ddpm/assets/fmnist_features.*)."""
    ref = resources.files("ddpm") / "assets" / f"{ASSET_NAME}.safetensors"
    with resources.as_file(ref) as path:
        if not path.is_file():
            raise DdpmError(f"the shipped feature net is missing ({path}); "
                            f"run tools/fit_features.py to recreate it")
        return load_feature_net(path)


def num_parameters(net: nn.Module) -> int:
    return sum(math.prod(p.shape) for p in net.parameters())
