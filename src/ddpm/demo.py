"""``ddpm demo``: train the fast preset for a few minutes, then a sample grid and a GIF."""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from .config import override, preset
from .sampling.generate import SampleConfig, generate, load_model
from .training.train import train
from .pictures.viz import save_gif, save_grid

DEMO_SAMPLER = SampleConfig(sampler="dpm++2m", steps=20, n=64)


def run_demo(*, minutes: float = 5.0, out: str | None = None, device: str = "auto",
             data_dir: str | None = None) -> Path:
    """The whole job on the embedded default; returns the run folder."""
    cfg = preset("fast")
    cfg = replace(cfg, train=override(cfg.train, minutes=minutes),
                  data=override(cfg.data, data_dir=data_dir))
    run_dir = Path(out) if out else Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    t0 = time.monotonic()
    res = train(cfg, run_dir, device=device)
    model = load_model(run_dir, device=device)
    s = generate(model, DEMO_SAMPLER, frames="x_t")
    grid = save_grid(s.images, run_dir / "samples" / "grid.png", scale=3)
    gif = save_gif(s.frames, run_dir / "samples" / "denoising.gif", scale=3, duration_ms=120)
    print(f"demo done in {(time.monotonic() - t0) / 60:.1f} min ({res.step} training steps)")
    print(f"  sample grid:    {grid}")
    print(f"  denoising GIF:  {gif}")
    print(f"  more samples:   ddpm sample {run_dir} --sampler dpm++2m --steps 20 --gif")
    return run_dir
