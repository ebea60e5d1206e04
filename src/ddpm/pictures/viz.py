"""Pictures: sample grids, the denoising GIF, and the forward-noising figure (Pillow only)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..files import atomic_write_bytes


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """uint8 (N, C, H, W) -> one uint8 (H', W', C) array of tiles, ``nrow`` per row."""
    imgs = images.detach().cpu()
    n, c, h, w = imgs.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = np.full((padding + rows * (h + padding), padding + nrow * (w + padding), c), pad_value, np.uint8)
    arr = imgs.permute(0, 2, 3, 1).numpy()
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y:y + h, x:x + w] = arr[i]
    return grid


def to_pil(grid: np.ndarray, scale: int = 1) -> Image.Image:
    """(H, W, C) uint8 -> a PIL image, enlarged ``scale`` times with nearest neighbours."""
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return img


def _encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def save_png(img: Image.Image, path: str | Path) -> Path:
    """Write a PNG atomically (no reader sees half a file)."""
    path = Path(path)
    atomic_write_bytes(path, _encode(img, "PNG"))
    return path


def save_grid(images: torch.Tensor, path: str | Path, *, nrow: int | None = None, scale: int = 2) -> Path:
    """A uint8 batch as one PNG grid."""
    return save_png(to_pil(make_grid(images, nrow), scale), path)


def save_gif(frames: Sequence[np.ndarray], path: str | Path, *, scale: int = 2, duration_ms: int = 60,
             hold_last_ms: int = 1500) -> Path:
    """Grids (H, W, C) uint8 -> an animated GIF that loops, holding the last frame."""
    path = Path(path)
    atomic_write_bytes(path, _encode_gif(frames, scale, duration_ms, hold_last_ms))
    return path


def _encode_gif(frames: Sequence[np.ndarray], scale: int, duration_ms: int, hold_last_ms: int) -> bytes:
    pil = [to_pil(f, scale) for f in frames]
    durations = [duration_ms] * (len(pil) - 1) + [hold_last_ms]
    return _encode(pil[0], "GIF", save_all=True, append_images=pil[1:], duration=durations, loop=0)


SAMPLE_SET = ("grid.png", "samples.npz", "denoising.gif")  # one command's outputs, all new or all old


def encode_npz(**arrays: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def save_sample_set(folder: str | Path, images: torch.Tensor, *, labels: torch.Tensor | None = None,
                    grid: torch.Tensor | None = None, nrow: int | None = None,
                    frames: Sequence[np.ndarray] | None = None, grid_scale: int = 2, gif_scale: int = 2,
                    gif_ms: int = 60, npz: Path | None = None) -> list[Path]:
    """samples.npz, grid.png (of ``grid``, default the first 64 images) and, given ``frames``,
    denoising.gif, written as one result set: the folder holds all new files or all old ones
    (an earlier GIF is removed with the set it belonged to). If they cannot be written, the
    samples are kept in a fallback file the one-line error names. ``npz``: samples.npz already
    streamed to disk (:func:`sample_stream`); ``images`` then need only hold the grid's."""
    from ..files import ResultSet

    rs = ResultSet(folder, SAMPLE_SET, keep="samples.npz")
    extra = {} if labels is None else {"labels": labels.numpy()}
    rs.add("samples.npz", npz if npz is not None else encode_npz(images=images.numpy(), **extra))
    rs.add("grid.png", _encode(to_pil(make_grid(images[:64] if grid is None else grid, nrow), grid_scale), "PNG"))
    if frames is not None:
        rs.add("denoising.gif", _encode_gif(frames, gif_scale, gif_ms, 1500))
    return rs.commit()


def sample_stream(folder: str | Path, shape: tuple[int, ...]):
    """An uncompressed samples.npz of ``shape`` uint8 images, written batch by batch to a
    temporary beside its place (``.write(batch)``, ``.add("labels", ...)``, ``.close()``), for
    :func:`save_sample_set`'s ``npz``; ``.discard()`` removes it on failure."""
    from ..files import NpyStream, ResultSet

    return NpyStream(ResultSet(folder, SAMPLE_SET).temporary("samples.npz"), "images", shape, np.uint8)


def noise_strip(noised: torch.Tensor, labels: Sequence[int], *, scale: int = 4) -> Image.Image:
    """The seed's forward-process figure: one image at several t, side by side, t under each."""
    from PIL import ImageDraw

    strip = to_pil(make_grid(noised, nrow=len(noised), padding=2), scale)
    canvas = Image.new(strip.mode, (strip.width, strip.height + 14), 255 if strip.mode == "L" else (255, 255, 255))
    canvas.paste(strip, (0, 0))
    draw = ImageDraw.Draw(canvas)
    tile = strip.width / len(labels)
    for i, t in enumerate(labels):
        draw.text((i * tile + tile / 2 - 12, strip.height), f"t={t}", fill=0)
    return canvas
