"""Line charts drawn with Pillow alone: a run's loss curves and the noise schedules compared.

Drawn at twice the size and scaled down, which gives smooth lines without an anti-aliasing
renderer; no matplotlib (it would be a heavy dependency for two pictures).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..errors import DdpmError
from ..files import check_writable_file
from .viz import save_png

SS = 2  # supersampling factor
COLOURS = ("#3b6fb6", "#e07b39", "#3a9e5c", "#c8423e", "#8064a2", "#2b2b2b")
INK, MUTED, GRID, FAINT_GRID, FRAME = "#222222", "#6b6b6b", "#e3e3e3", "#f3f3f3", "#9a9a9a"
FONT_FILES = ("DejaVuSans.ttf", "Arial.ttf", "Helvetica.ttc", "LiberationSans-Regular.ttf")


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    for name in FONT_FILES:
        try:
            return ImageFont.truetype(name, size * SS)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size * SS)  # Pillow >= 10.1 with FreeType
    except TypeError:
        return ImageFont.load_default()


class Series(NamedTuple):
    """One line: x and y values, its legend label, colour and width; ``faint`` draws it pale."""

    x: np.ndarray
    y: np.ndarray
    label: str | None
    colour: str
    width: float = 2.0
    faint: bool = False


@dataclass
class Panel:
    """One chart: title, axis labels, its lines, and whether y is on a log scale."""

    title: str
    xlabel: str
    ylabel: str
    series: list[Series]
    log_y: bool = False
    hline: float | None = None  # a dashed reference line, e.g. SNR = 1
    note: str | None = None  # a line of small text under the title

    def limits(self) -> tuple[float, float, float, float]:
        xs = np.concatenate([s.x for s in self.series])
        ys = np.concatenate([s.y for s in self.series])
        ys = ys[np.isfinite(ys) & (ys > 0)] if self.log_y else ys[np.isfinite(ys)]
        if len(ys) == 0:
            ys = np.array([1.0])
        x0, x1, y0, y1 = float(xs.min()), float(xs.max()), float(ys.min()), float(ys.max())
        if self.log_y:
            l0, l1 = math.log10(y0), math.log10(y1)
            if l1 - l0 < 1.5:  # under two decades: a tight, padded range reads better than whole decades
                pad = max((l1 - l0) * 0.06, 0.02)
                return x0, max(x1, x0 + 1), 10 ** (l0 - pad), 10 ** (l1 + pad)
            return x0, max(x1, x0 + 1), 10 ** math.floor(l0), 10 ** math.ceil(l1 - 1e-9)
        pad = (y1 - y0) * 0.05 or abs(y1) * 0.1 or 1.0
        return x0, max(x1, x0 + 1), y0 - pad, y1 + pad


# ------------------------------------------------------------------ ticks


def nice_ticks(lo: float, hi: float, target: int = 6, integer: bool = False) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    span = hi - lo
    if not span > 0:
        return [lo]
    raw = max(span / target, 1.0) if integer else span / target
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def log_ticks(lo: float, hi: float, target: int = 7) -> list[float]:
    """Ticks for a log axis: round linear values within one decade or so, 1-2-5 over a few
    decades, else powers of ten (every k-th, always including 1) thinned to about ``target``."""
    decades = math.log10(hi / lo)
    if decades < 0.7:
        ticks = [t for t in nice_ticks(lo, hi, 5) if t > 0]
        return ticks if len(ticks) >= 3 else [t for t in nice_ticks(lo, hi, 10) if t > 0]
    if decades <= 3:
        a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        return [10.0 ** e * m for e in range(a, b + 1) for m in (1, 2, 5) if lo <= 10.0 ** e * m <= hi * (1 + 1e-9)]
    a, b = math.ceil(math.log10(lo) - 1e-9), math.floor(math.log10(hi) + 1e-9)
    every = max(1, math.ceil((b - a + 1) / target))
    return [10.0 ** e for e in range(a, b + 1) if e % every == 0]


def fmt_log(v: float) -> str:
    """Log-axis labels: plain near 1, powers of ten far from it (1e-6, 1e3)."""
    if 0.01 <= abs(v) <= 100:
        return fmt(v)
    m, e = f"{v:.0e}".split("e")
    return f"{m}e{int(e)}"


def fmt(v: float) -> str:
    """A short tick label: 0.001 -> 1e-3, 2000 -> 2k, 0.25 -> 0.25."""
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e5 or a < 1e-4:
        m, e = f"{v:.0e}".split("e")
        return f"{m}e{int(e)}"
    if a >= 1000:
        return f"{v / 1000:g}k"
    return f"{v:.4g}"


# ------------------------------------------------------------------ drawing


class Box(NamedTuple):
    left: float
    top: float
    right: float
    bottom: float


def _draw_panel(img: Image.Image, panel: Panel, box: Box) -> None:
    """Title, grid, ticks, lines and legend of one panel inside ``box`` (supersampled pixels)."""
    draw = ImageDraw.Draw(img)
    title_f, label_f, tick_f = _font(17), _font(13), _font(12)
    draw.text((box.left, box.top), panel.title, font=title_f, fill=INK)
    top = box.top + 30 * SS
    if panel.note:
        draw.text((box.left, top - 4 * SS), panel.note, font=tick_f, fill=MUTED)
        top += 16 * SS
    plot = Box(box.left + 62 * SS, top + 6 * SS, box.right - 8 * SS, box.bottom - 44 * SS)
    x0, x1, y0, y1 = panel.limits()
    fy = (lambda v: math.log10(v)) if panel.log_y else (lambda v: v)
    ly0, ly1 = fy(y0), fy(y1)

    def px(x: float) -> float:
        return plot.left + (x - x0) / (x1 - x0) * (plot.right - plot.left)

    def py(y: float) -> float:
        return plot.bottom - (fy(y) - ly0) / (ly1 - ly0) * (plot.bottom - plot.top)

    xt = nice_ticks(x0, x1, integer=True)  # steps and timesteps are whole numbers
    yt = log_ticks(y0, y1) if panel.log_y else nice_ticks(y0, y1)
    for x in xt:
        draw.line([(px(x), plot.top), (px(x), plot.bottom)], fill=GRID, width=SS)
        _centred(draw, fmt(x), px(x), plot.bottom + 6 * SS, tick_f, MUTED)
    if panel.log_y and math.log10(y1 / y0) >= 3:  # faint decades between the labelled ones
        for e in range(math.ceil(math.log10(y0)), math.floor(math.log10(y1)) + 1):
            draw.line([(plot.left, py(10.0 ** e)), (plot.right, py(10.0 ** e))], fill=FAINT_GRID, width=SS)
    label = fmt_log if panel.log_y else fmt
    for y in yt:
        draw.line([(plot.left, py(y)), (plot.right, py(y))], fill=GRID, width=SS)
        w = draw.textlength(label(y), font=tick_f)
        draw.text((plot.left - 8 * SS - w, py(y) - 8 * SS), label(y), font=tick_f, fill=MUTED)
    if panel.hline is not None and y0 < panel.hline < y1:
        _dashed(draw, plot.left, plot.right, py(panel.hline))
    draw.rectangle([plot.left, plot.top, plot.right, plot.bottom], outline=FRAME, width=SS)
    drawn: list[tuple[float, float]] = []
    for s in sorted(panel.series, key=lambda s: not s.faint):  # pale lines underneath
        drawn += _line(draw, s, px, py, plot, panel.log_y)
    _centred(draw, panel.xlabel, (plot.left + plot.right) / 2, plot.bottom + 24 * SS, label_f, INK)
    _vertical_label(img, panel.ylabel, box.left, (plot.top + plot.bottom) / 2, label_f)
    _legend(draw, [s for s in panel.series if s.label], plot, drawn)


def _line(draw: ImageDraw.ImageDraw, s: Series, px, py, plot: Box, log_y: bool) -> list[tuple[float, float]]:
    """Draw one series, joining across missing values (a quarter of t absent from a batch)."""
    ok = np.isfinite(s.y) & ((s.y > 0) if log_y else True)
    colour = _pale(s.colour) if s.faint else s.colour
    pts = [(px(float(x)), min(max(py(float(y)), plot.top), plot.bottom)) for x, y in zip(s.x[ok], s.y[ok])]
    _polyline(draw, pts, colour, s.width)
    if len(pts) < 2:
        return pts
    a = np.array(pts)  # points along each segment too, so the legend avoids sparse lines as well
    f = np.linspace(0, 1, 8, endpoint=False)[None, :, None]
    return [tuple(p) for p in (a[:-1, None] + f * (a[1:, None] - a[:-1, None])).reshape(-1, 2)] + pts[-1:]


def _polyline(draw: ImageDraw.ImageDraw, pts: list[tuple[float, float]], colour: str, width: float) -> None:
    if len(pts) == 1:
        r = width * SS
        draw.ellipse([pts[0][0] - r, pts[0][1] - r, pts[0][0] + r, pts[0][1] + r], fill=colour)
    elif pts:
        draw.line(pts, fill=colour, width=max(1, round(width * SS)), joint="curve")


def _pale(colour: str, keep: float = 0.3) -> str:
    r, g, b = (int(colour[i:i + 2], 16) for i in (1, 3, 5))
    return "#" + "".join(f"{round(255 - (255 - c) * keep):02x}" for c in (r, g, b))


def _dashed(draw: ImageDraw.ImageDraw, x0: float, x1: float, y: float) -> None:
    x = x0
    while x < x1:
        draw.line([(x, y), (min(x + 8 * SS, x1), y)], fill=FRAME, width=SS)
        x += 14 * SS


def _centred(draw: ImageDraw.ImageDraw, text: str, x: float, y: float, font, fill: str) -> None:
    draw.text((x - draw.textlength(text, font=font) / 2, y), text, font=font, fill=fill)


def _vertical_label(img: Image.Image, text: str, x: float, y: float, font) -> None:
    l, t, r, b = ImageDraw.Draw(img).textbbox((0, 0), text, font=font)
    tile = Image.new("RGBA", (int(r - l) + 4, int(b - t) + 8), (255, 255, 255, 0))
    ImageDraw.Draw(tile).text((2 - l, 4 - t), text, font=font, fill=INK)
    tile = tile.rotate(90, expand=True)
    img.paste(tile, (int(x), int(y - tile.height / 2)), tile)


def _legend(draw: ImageDraw.ImageDraw, series: Sequence[Series], plot: Box,
            drawn: Sequence[tuple[float, float]]) -> None:
    """The legend in whichever corner hides the fewest drawn points."""
    if not series:
        return
    f = _font(12)
    row = 19 * SS
    w = max(draw.textlength(s.label, font=f) for s in series) + 44 * SS
    h = row * len(series) + 10 * SS
    m = 10 * SS
    corners = [(plot.right - w - m, plot.top + m), (plot.left + m, plot.top + m),
               (plot.right - w - m, plot.bottom - h - m), (plot.left + m, plot.bottom - h - m)]
    pts = np.array(drawn, float).reshape(-1, 2)

    def hidden(c: tuple[float, float]) -> int:
        inside = (pts[:, 0] >= c[0] - m) & (pts[:, 0] <= c[0] + w + m) & (pts[:, 1] >= c[1] - m) & (pts[:, 1] <= c[1] + h + m)
        return int(inside.sum())

    x0, y0 = min(corners, key=hidden)  # ties keep the first: top right
    draw.rounded_rectangle([x0, y0, x0 + w, y0 + h], radius=6 * SS, fill="#ffffff", outline=GRID, width=SS)
    for i, s in enumerate(series):
        y = y0 + 5 * SS + i * row + row / 2
        colour = _pale(s.colour) if s.faint else s.colour
        draw.line([(x0 + 10 * SS, y), (x0 + 30 * SS, y)], fill=colour, width=round(3 * SS))
        draw.text((x0 + 36 * SS, y - 8 * SS), s.label, font=f, fill=INK)


def render(panels: Sequence[Panel], *, columns: int, size: tuple[int, int], title: str | None = None,
           row_heights: Sequence[float] | None = None) -> Image.Image:
    """Panels on a grid, ``columns`` wide, as one RGB image of ``size`` pixels."""
    W, H = size[0] * SS, size[1] * SS
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    top = 16 * SS
    if title:
        draw.text((24 * SS, top), title, font=_font(20), fill=INK)
        top += 42 * SS
    rows = math.ceil(len(panels) / columns)
    heights = list(row_heights or [1.0] * rows)
    unit = (H - top - 10 * SS) / sum(heights)
    cell_w = (W - 24 * SS) / columns
    y = top
    for r in range(rows):
        for c in range(columns):
            i = r * columns + c
            if i < len(panels):
                box = Box(24 * SS + c * cell_w, y, 24 * SS + (c + 1) * cell_w - 24 * SS, y + heights[r] * unit)
                _draw_panel(img, panels[i], box)
        y += heights[r] * unit + 6 * SS
    return img.resize(size, Image.Resampling.LANCZOS)


# ------------------------------------------------------------------ the two figures


def smooth(y: np.ndarray, span: float) -> np.ndarray:
    """Mean of a forward and a backward bias-corrected exponential moving average: TensorBoard's
    smoothing without its lag behind a falling curve. Missing values stay missing."""
    y = np.asarray(y, float)
    return (_ema(y, span) + _ema(y[::-1], span)[::-1]) / 2


def _ema(y: np.ndarray, span: float) -> np.ndarray:
    a = 1 - 1 / max(span, 1.0)
    out, acc, weight = np.full(len(y), np.nan), 0.0, 0.0
    for i, v in enumerate(y):
        if np.isfinite(v):
            acc, weight = a * acc + (1 - a) * v, a * weight + (1 - a)
            out[i] = acc / weight
    return out


def _column(records: list[dict], key: str) -> np.ndarray:
    return np.array([r[key] if isinstance(r.get(key), (int, float)) else np.nan for r in records], float)


def loss_figure(records: list[dict], timesteps: int, title: str) -> Image.Image:
    """Loss (raw and smoothed), loss per quarter of t, learning rate and gradient norm against step."""
    steps = [r for r in records if "event" not in r and isinstance(r.get("loss"), (int, float))]
    if not steps:
        raise DdpmError("the log has no loss records yet")
    x = _column(steps, "step")
    span = max(1.0, len(steps) / 25)  # about 25 independent points across the run
    loss, gnorm = _column(steps, "loss"), _column(steps, "grad_norm")
    skipped = sum(r.get("event") == "skipped" for r in records)
    note = f"last {smooth(loss, span)[-1]:.4g}"
    if skipped:
        note += f", {skipped} non-finite step{'s' * (skipped > 1)} skipped"
    panels = [
        Panel("Training loss", "step", "loss", [Series(x, loss, "logged", COLOURS[0], 1.2, faint=True),
                                                   Series(x, smooth(loss, span), "smoothed", COLOURS[0], 2.5)],
              log_y=True, note=note),
        Panel("Loss by timestep range", "step", "loss", _quarter_series(steps, x, span, timesteps), log_y=True,
              note=f"t = 0 is almost clean, t = {timesteps - 1} almost pure noise"),
        Panel("Learning rate", "step", "lr", [Series(x, _column(steps, "lr"), None, COLOURS[4], 2.5)]),
        Panel("Gradient norm (before clipping)", "step", "norm",
              [Series(x, gnorm, None, COLOURS[2], 1.2, faint=True),
               Series(x, smooth(gnorm, span), None, COLOURS[2], 2.5)], log_y=True),
    ]
    speed = steps[-1].get("img_per_s")
    head = f"{title}: step {int(x[-1]):,}" + (f", {speed:,.0f} images/s" if isinstance(speed, (int, float)) else "")
    return render(panels, columns=2, size=(1400, 900), title=head, row_heights=(1.6, 1.0))


def _quarter_series(steps: list[dict], x: np.ndarray, span: float, T: int) -> list[Series]:
    out = []
    for q in range(4):
        y = _column(steps, f"loss_q{q}")
        lo, hi = q * T // 4, (q + 1) * T // 4 - 1 if q < 3 else T - 1
        out.append(Series(x, smooth(y, span), f"t {lo}-{hi}", COLOURS[q], 2.5))
    return out


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """RUN/log.jsonl -> RUN/loss.png (or ``out``)."""
    from ..config import RunConfig
    from ..training.runlog import LOG_NAME, read_log

    run = Path(run_dir)
    log = run / LOG_NAME
    if not log.is_file():
        raise DdpmError(f"{run} has no {LOG_NAME} (expected a run folder from `ddpm train`)")
    dest = check_writable_file(Path(out) if out else run / "loss.png", "plot")  # before the drawing
    cfg = run / "config.json"
    T = RunConfig.load(cfg).diffusion.timesteps if cfg.is_file() else 1000
    try:
        img = loss_figure(read_log(log), T, f"{run.resolve().name}")
    except DdpmError as e:
        raise DdpmError(f"{log}: {e}") from None
    return save_png(img, dest)


def schedule_panels(timesteps: int = 1000) -> list[Panel]:
    """alpha_bar and SNR = alpha_bar / (1 - alpha_bar) of every schedule in the table against t
    (Improved DDPM Fig. 5)."""
    from ..core.schedules import SCHEDULES, make_betas

    t = np.arange(timesteps, dtype=float)
    ab, snr = [], []
    for i, name in enumerate(SCHEDULES):
        a = np.cumprod(1 - make_betas(name, timesteps).numpy())  # float64: SNR reaches 1e-9
        s = a / (1 - a)
        noise_frac = float((s < 1e-2).mean())
        colour = COLOURS[i % len(COLOURS)]
        ab.append(Series(t, a, f"{name}", colour, 2.5))
        snr.append(Series(t, s, f"{name}: {noise_frac:.0%} of steps at SNR < 0.01", colour, 2.5))
    return [
        Panel("How much signal is left", "t", "alpha_bar(t)", ab,
              note="x_t = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps"),
        Panel("Signal-to-noise ratio", "t", "alpha_bar / (1 - alpha_bar)", snr, log_y=True, hline=1.0,
              note="steps spent near pure noise teach the network little (Improved DDPM, Sec. 3.2)"),
    ]


def schedule_figure(timesteps: int = 1000) -> Image.Image:
    """The schedules compared: :func:`schedule_panels` side by side."""
    return render(schedule_panels(timesteps), columns=2, size=(1400, 620),
                  title=f"Noise schedules, T = {timesteps}: cosine keeps signal longer and lowers SNR evenly")


def plot_schedules(out: str | Path = "schedules.png", timesteps: int = 1000) -> Path:
    """Every schedule of ``core.schedules.SCHEDULES`` compared, as a PNG."""
    if not 2 <= timesteps <= 100_000:
        raise DdpmError(f"--timesteps must be between 2 and 100000, got {timesteps}")
    check_writable_file(out, "figure")  # before the drawing
    return save_png(schedule_figure(timesteps), out)
