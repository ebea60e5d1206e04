"""A run's training images: loaded from its source, checked against its config, placed on its device."""
from __future__ import annotations

import dataclasses
import sys
import warnings

import torch

from ..checkpoint import Checkpoint
from ..config import RunConfig
from ..data.sources import class_names, load_dataset, load_labeled_dataset
from ..errors import DdpmError


def with_class_names(cfg: RunConfig) -> RunConfig:
    """A conditional config with its data's class names filled in (stored with the run, so that
    sampling can take a name); an unconditional one unchanged."""
    if cfg.model.num_classes == 0 or cfg.data.class_names:
        return cfg
    names = class_names(cfg.data.source, cfg.data.data_dir)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, class_names=names))


def with_class_counts(cfg: RunConfig, labels: torch.Tensor | None, ck: Checkpoint | None = None) -> RunConfig:
    """A conditional config with its training images per class (the proportions sampling's
    default draw of labels follows); a resumed run keeps what its checkpoint recorded, so that
    an older run without them resumes as it was."""
    if labels is None or cfg.model.num_classes == 0:
        return cfg
    if ck is not None:
        counts = ck.config.data.class_counts
    else:
        counts = tuple(int(c) for c in torch.bincount(labels, minlength=cfg.model.num_classes))
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, class_counts=counts))


def place_data(data: torch.Tensor, device: torch.device) -> torch.Tensor:
    """On CUDA a data set that fits easily (Fashion-MNIST is 47 MB) lives on the GPU as uint8, so
    a batch is one indexing kernel with no host copy; a larger one stays on the host."""
    if device.type != "cuda":
        return data
    free, _ = torch.cuda.mem_get_info(device)
    return data.to(device) if data.nbytes < free // 4 else data


def load_data(cfg: RunConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The training images (and labels for a conditional run); each skipped unreadable file
    becomes one ``warning:`` line on stderr."""
    d = cfg.data
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cfg.model.num_classes:
            lab = load_labeled_dataset(d.source, size=d.image_size, channels=d.channels, data_dir=d.data_dir)
            if lab.class_names != d.class_names:
                raise DdpmError(f"the run's classes {list(d.class_names)} are not the data's {list(lab.class_names)}")
            data, labels = lab.images, lab.labels
        else:
            data = load_dataset(d.source, size=d.image_size, channels=d.channels, data_dir=d.data_dir)
            labels = None
        if d.test_source:  # read only by evaluations, minutes later: a wrong path is said now
            from ..data.sources import describe as describe_source

            describe_source(d.test_source, d.data_dir)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    return data, labels


def check_labels(cfg: RunConfig, data: torch.Tensor, labels: torch.Tensor | None) -> None:
    """A conditional run's labels: int64, one per image, each one of the model's classes."""
    k = cfg.model.num_classes
    if not k:
        return
    if labels is None or labels.shape != (len(data),) or labels.dtype != torch.long:
        raise DdpmError(f"a conditional run needs int64 labels, one per image ({len(data)},)")
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < k:
        raise DdpmError(f"labels must lie in [0, {k - 1}], got {int(labels.min())}..{int(labels.max())}")


def check_data(cfg: RunConfig, data: torch.Tensor) -> None:
    """The images are uint8 (N, C, H, W) at the config's channels and size."""
    want = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    if data.dtype != torch.uint8 or data.ndim != 4 or tuple(data.shape[1:]) != want:
        raise DdpmError(f"data must be uint8 (N, {', '.join(map(str, want))}), got {data.dtype} {tuple(data.shape)}")
