"""The page's ceilings: bytes read per request, images per request, and the work one request may ask.

The work of a request is images x network evaluations per image (the sampler's evaluations on
its grid, twice with guidance, again with autoguidance, times RePaint's resampling): however a
request spells it (a long ``classes`` list, a huge ``resample``), it is estimated before any
thread starts and refused above MAX_WORK with the estimate and the limit.
"""
from __future__ import annotations

import json
import math
from typing import Any

from starlette.requests import Request

from ..config import SampleConfig
from ..errors import DdpmError
from ..samplers import get_sampler
from ..sampling.generate import LoadedModel

MAX_IMAGES = 64  # per request: the page shows one grid
MAX_WORK = 1_000_000  # images x network evaluations each, per request
MAX_UPLOAD = 8 * 1024 * 1024  # bytes of an uploaded image
MAX_UPLOAD_PIXELS = 40_000_000  # of an uploaded image, read from its header before decoding
MAX_JSON = 4 * 1024 * 1024  # bytes of a JSON body (an inpainting mask of 256 x 256 flags is well inside)


class TooLarge(ValueError):
    """A request body past its limit (answered with a 413 and its message)."""


async def read_body(request: Request, limit: int, what: str) -> bytes:
    """The body, read in chunks and abandoned as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"{what} is {int(declared):,} bytes; the most is {limit:,}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"{what} is more than {limit:,} bytes; the most is {limit:,}")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(data: bytes) -> Any:
    """JSON, or a DdpmError (not JSON, or nested deeper than Python's recursion limit)."""
    try:
        return json.loads(data)
    except RecursionError:
        raise DdpmError("the request body is nested too deeply") from None
    except ValueError:
        raise DdpmError("the request body is not JSON") from None


def check_images(n: int, classes: tuple[int, ...] | None) -> int:
    """The images a request draws: exactly ``n`` (jobs.class_layout spreads them over the classes);
    a class list longer than the page's limit is refused, however it is spelled."""
    if classes is not None and len(classes) > MAX_IMAGES:
        raise DdpmError(f"this request names {len(classes):,} classes; the page draws at most {MAX_IMAGES} images")
    if n > MAX_IMAGES:
        raise DdpmError(f"this request draws {n:,} images; the page draws at most {MAX_IMAGES}")
    return n


def repaint_descents(levels: int, jump_length: int, resample: int) -> int:
    """Sampler steps of RePaint's jump schedule over ``levels`` grid levels (editing.jump_schedule),
    counted without building it: every level once, plus r - 1 jumps of j at each jump point."""
    jump_points = len(range(0, levels - jump_length, jump_length))
    return levels + (resample - 1) * jump_length * jump_points


def check_work(model: LoadedModel, cfg: SampleConfig, steps: int, images: int, descents: int | None = None) -> int:
    """images x network evaluations each; a DdpmError saying the estimate and MAX_WORK above it.
    ``descents``: the sampler steps actually run (RePaint's resampling), if not the grid's."""
    plan = model.plan(cfg.sampler, steps, cfg.spacing)
    timesteps = plan.timesteps
    per_step = get_sampler(cfg.sampler).nfe(plan.levels, timesteps) / len(timesteps)
    passes = 1 + (cfg.guidance > 0) + (cfg.autoguidance > 0)  # guided steps add a pass each
    evaluations = math.ceil(per_step * (descents or len(timesteps)) * passes)
    work = images * evaluations
    if work > MAX_WORK:
        raise DdpmError(f"this request needs about {work:,} network evaluations ({images} images x "
                        f"{evaluations:,} each); the page's limit is {MAX_WORK:,} per request")
    return work
