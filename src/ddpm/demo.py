"""``ddpm demo``: train the conditional fast preset for a few minutes, then a sample grid with
one row per class (classifier-free guidance) and a GIF; ``cond=False``: the unconditional fast
preset and a plain grid."""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from .config import override, preset
from .sampling.generate import SampleConfig, generate, load_model
from .training.train import train
from .pictures.viz import save_sample_set

# autoguidance by the run's own guide (the fast presets keep one at 20% of the budget): the best
# FD-FMNIST of w = 0, 1, 1.5, 2 on a 5-minute demo run (bench/demo_autoguidance.py)
DEMO_AUTOGUIDANCE = 1.5
DEMO_SAMPLER = SampleConfig(sampler="dpm++2m", steps=20, n=64, autoguidance=DEMO_AUTOGUIDANCE)
# every class, 8 of each (one grid row per class), at the guidance with the best FD-FMNIST after 5
# and after 20 minutes of w = 0, 1, 2 (bench/control.py, bench/demo_autoguidance.py)
DEMO_GUIDANCE = 2.0
# a little autoguidance on top of classifier-free guidance at w = 2 scored the better FD on a
# 5-minute demo run; at w = 1 or 1.5 the two guidances together over-guide
# (bench/demo_autoguidance.py)
DEMO_COND_AUTOGUIDANCE = 0.5
DEMO_COND_SAMPLER = SampleConfig(sampler="dpm++2m", steps=20, n=80, classes="all", guidance=DEMO_GUIDANCE,
                                 autoguidance=DEMO_COND_AUTOGUIDANCE)


def demo_sampler(model, cond: bool) -> SampleConfig:
    """The demo's request for its run: without autoguidance when training ended before it kept
    its guide (a budget of seconds ends before the step count it needs is estimated)."""
    scfg = DEMO_COND_SAMPLER if cond else DEMO_SAMPLER
    if scfg.autoguidance and not model.has_guide():
        return replace(scfg, autoguidance=0.0)
    return scfg


def run_demo(*, minutes: float = 5.0, out: str | None = None, device: str = "auto",
             data_dir: str | None = None, cond: bool = True) -> Path:
    """The whole job on the embedded default (``cond``: fast-cond, one grid row per class; else
    fast); returns the run folder."""
    cfg = preset("fast-cond" if cond else "fast")
    cfg = replace(cfg, train=override(cfg.train, minutes=minutes),
                  data=override(cfg.data, data_dir=data_dir))
    run_dir = Path(out) if out else Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    t0 = time.monotonic()
    res = train(cfg, run_dir, device=device)
    model = load_model(run_dir, device=device)
    scfg = demo_sampler(model, cond)
    s = generate(model, scfg, frames="x_t")
    rows, nrow = s.class_rows()
    grid, _, gif = save_sample_set(run_dir / "samples", s.images, labels=s.labels, grid=rows, nrow=nrow,
                                   frames=s.frames, grid_scale=3, gif_scale=3, gif_ms=120)
    print(f"demo done in {(time.monotonic() - t0) / 60:.1f} min ({res.step} training steps)")
    print(f"  sample grid:    {grid}")
    print(f"  denoising GIF:  {gif}")
    more = f" --class all --guidance {DEMO_GUIDANCE:g}" if cond else ""
    more += f" --autoguidance {scfg.autoguidance:g}" if scfg.autoguidance else ""
    print(f"  more samples:   ddpm sample {run_dir} --sampler dpm++2m --steps 20 --gif{more}")
    return run_dir
