"""Models that ship inside the package: a short name -> a run folder among the package's files.

``ddpm sample fashion-mnist`` (and ``load_model("fashion-mnist")``, ``ddpm ui``, ``ddpm eval``)
works the moment the package is installed. A path that exists always wins over a name, so a run
folder of your own called ``fashion-mnist`` is still yours. What a command writes for a shipped
model goes to ``runs/NAME/`` under the current folder, never into the installed package.
"""
from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "models"
# name -> folder under ddpm/assets/models (made by tools/ship_model.py from a `ddpm train` run)
PRETRAINED: dict[str, str] = {"fashion-mnist": "fashion-mnist"}


def pretrained_path(name: str) -> Path | None:
    """The shipped run folder of ``name``, or None when no such model ships (or it is not installed)."""
    folder = PRETRAINED.get(name)
    p = ASSETS / folder if folder is not None else None
    return p if p is not None and (p / "latest").is_file() else None


def resolve_run(path: str | Path) -> Path:
    """``path`` itself when it exists (or names no shipped model); else the shipped model's folder."""
    p = Path(path)
    if p.exists():
        return p
    shipped = pretrained_path(str(path))
    return shipped if shipped is not None else p


def output_root(source: Path) -> Path:
    """Where a command writes beside a checkpoint ``source``: its run folder when it really is
    one of a run's (``RUN/checkpoints/step-N``, ``RUN/guide``), else the checkpoint folder itself
    (one copied elsewhere: never the folders above it); a shipped model's outputs go to
    ``runs/NAME`` under the current folder."""
    from ..files import run_of

    run = run_of(source)
    if run is None:
        return source
    try:
        rel = run.resolve().relative_to(ASSETS)
    except ValueError:
        return run
    return Path("runs") / rel.parts[0]


def shipped_runs() -> list[Path]:
    """Every shipped run folder that is installed."""
    return [p for p in (pretrained_path(n) for n in PRETRAINED) if p is not None]
