"""Training objectives, one table, one small file each: what the network is trained to output,
and how that output becomes (x0, eps). Adding one is a file with an :class:`Objective`
subclass and its line in :data:`OBJECTIVES`."""
from __future__ import annotations

from ...errors import DdpmError
from .base import Objective, coef, eps_from_x0
from .edm import EDMPrecond
from .eps import Eps
from .v import V
from .velocity import Velocity
from .x0 import X0

OBJECTIVES: dict[str, type[Objective]] = {c.name: c for c in (Eps, X0, V, Velocity, EDMPrecond)}


def get_objective(name: str, sigma_data: float = 0.5, process: str | None = None) -> Objective:
    """The named objective; one line if unknown or unfit for ``process``."""
    if name not in OBJECTIVES:
        raise DdpmError(f"unknown objective {name!r}; choose one of: {', '.join(OBJECTIVES)}")
    cls = OBJECTIVES[name]
    if process is not None and process in cls.unfit:
        fits = ", ".join(n for n, c in OBJECTIVES.items() if process not in c.unfit)
        raise DdpmError(f"objective {name} does not fit the {process} process; choose one of: {fits}")
    return cls(sigma_data)


__all__ = ["OBJECTIVES", "Objective", "coef", "eps_from_x0", "get_objective"]
