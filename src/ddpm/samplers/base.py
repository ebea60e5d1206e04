"""What every sampler shares: options, the step callback, and small helpers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch

from ..config import Variance
from ..core.diffusion import Denoiser

StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]  # (i, x_t, x0_pred)


@dataclass(frozen=True)
class SamplerOptions:
    """Per-sampler knobs; None: not given (the sampler's own default). A sampler refuses a
    knob it does not read (``SamplerSpec.options``), rather than silently ignoring it."""

    eta: float | None = None  # ddim: 0 (the default) deterministic, 1 the DDPM posterior variance
    variance: Variance | None = None  # ddpm: sigma_t^2 of the reverse step (default beta_tilde)


class SamplerFn(Protocol):
    def __call__(self, denoiser: Denoiser, x_T: torch.Tensor, timesteps: list[int], *,
                 options: SamplerOptions, generator: Generator | None = None,
                 on_step: StepCallback | None = None) -> torch.Tensor: ...


def level(levels, i: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, sigma) of level i of a levels table, float64 scalars; None: the clean image (1, 0)."""
    if i is None:
        one = levels.alpha.new_tensor(1.0)
        return one, one * 0
    return levels.alpha[i], levels.sigma[i]


def t_batch(t: int, x: torch.Tensor) -> torch.Tensor:
    """The scalar timestep t as a (B,) long tensor on x's device."""
    return torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """Steele et al.'s SplitMix64 step: a bijection of 64-bit words that scatters nearby inputs."""
    z = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def image_seed(seed: int, i: int, stream: int = 0) -> int:
    """The generator seed of image i of a request seeded ``seed``: a hash of the pair (a
    non-negative int64). Not ``seed + i``, under which seed 1 would be seed 0's images shifted
    by one; hashed, nearby seeds and indices give unrelated noise. ``stream`` > 0 names another
    independent stream of the same image (its drawn class label: 1), leaving stream 0 (x_T and
    the sampler's noise) as it is."""
    h = _splitmix64((_splitmix64(seed) + i) & _MASK64)
    return (_splitmix64(h ^ stream) if stream else h) >> 1


class ImageGenerators:
    """One ``torch.Generator`` per image (EDM's ``StackedRandomGenerator``): image i of a request
    draws x_T and all its sampler noise from :func:`image_seed` (seed, i) alone, so no picture
    depends on the batch size, on how many images were asked for, or on its neighbours, and two
    seeds share no image."""

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]

    @classmethod
    def for_images(cls, seed: int, start: int, count: int, device: torch.device | str = "cpu") -> ImageGenerators:
        """Generators of images start .. start + count - 1 of a request seeded with ``seed``."""
        return cls([image_seed(seed, i) for i in range(start, start + count)], device)

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: Sequence[int], *, device: torch.device | str | None = None,
              dtype: torch.dtype | None = None) -> torch.Tensor:
        """(B, ...) standard normal, row i from generator i."""
        if shape[0] != len(self.generators):
            raise ValueError(f"{len(self.generators)} generators for a batch of {shape[0]}")
        return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=device, dtype=dtype)
                            for g in self.generators])


Generator = torch.Generator | ImageGenerators


def randn_like(x: torch.Tensor, generator: Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like x, drawn from ``generator`` (per image when it is an
    :class:`ImageGenerators`; reproducible either way)."""
    if isinstance(generator, ImageGenerators):
        return generator.randn(x.shape, device=x.device, dtype=x.dtype)
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
