"""The web page's server: a small Starlette app over the library (load_model, generate, the schedules).

Every answer to a bad request is a 4xx with ``{"error": "one line"}`` that the page shows;
an unexpected failure is a 500 with a one-line message, never a traceback.
"""
from __future__ import annotations

import asyncio
import dataclasses
import typing
import uuid
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..checkpoint import has_guide
from ..config import SampleConfig, check_seed, override
from ..errors import DdpmError
from ..samplers import SAMPLERS
from ..sampling.generate import check_sample_config
from ..sampling.guidance import resolve_classes
from . import edits, panels
from .guard import Access, Guard, access_for
from .jobs import Job, JobStore, class_layout, gif_bytes, grid_png, npz_bytes, png_bytes, sampling
from .limits import MAX_IMAGES, MAX_JSON, MAX_UPLOAD, TooLarge, check_images, check_work, parse_json, read_body
from .messages import page_message
from .runs import ModelCache, NotFound, Run, RunIndex, latest_checkpoint, run_config, training_now

STATIC = Path(__file__).parent / "static"
# SampleConfig fields the page may set (the rest are the server's: batch size = n, EMA weights)
# (and no guiding_model path: a page guides only with the run's own RUN/guide, never a path it names)
PAGE_FIELDS = tuple(f.name for f in dataclasses.fields(SampleConfig)
                    if f.name not in ("batch_size", "use_ema", "guiding_model"))


class BadRequest(ValueError):
    """A request the page should not have sent (answered with a 400 and its message)."""


def _choices(name: str) -> list[str]:
    """The values of a SampleConfig field's Literal (inside an Optional, if it is one)."""
    def values(hint: Any) -> list[str]:
        if typing.get_origin(hint) is typing.Literal:
            return list(typing.get_args(hint))
        return [v for h in typing.get_args(hint) for v in values(h)]
    return values(typing.get_type_hints(SampleConfig)[name])


async def meta(request: Request) -> JSONResponse:
    """What the page's forms offer, read from the library's tables (one source per name)."""
    return JSONResponse({
        "samplers": [{"name": k, "default_steps": s.default_steps, "summary": s.summary} for k, s in SAMPLERS.items()],
        "spacings": _choices("spacing"), "precisions": _choices("precision"), "clips": _choices("clip"),
        "schedules": list(panels.SCHEDULE_NAMES), "fields": list(PAGE_FIELDS), "max_images": MAX_IMAGES,
        "edit": edits.editing_available(),
    })


def _run_summary(run: Run) -> dict[str, Any]:
    cfg = run_config(run)
    ck = latest_checkpoint(run)
    info: dict[str, Any] = {"name": run.name, "checkpoint": ck.name if ck else None, "config": cfg is not None,
                            "training": training_now(run, cfg)}
    if cfg is not None:
        info |= {"T": cfg.diffusion.timesteps, "schedule": cfg.diffusion.schedule, "preset": cfg.preset,
                 "process": cfg.diffusion.process,
                 "image_size": cfg.data.image_size, "channels": cfg.data.channels,
                 "objective": cfg.diffusion.objective, "learn_sigma": cfg.model.learn_sigma,
                 "num_classes": getattr(cfg.model, "num_classes", 0),
                 "class_names": list(getattr(cfg.data, "class_names", ()))}
    info["guide"] = has_guide(run.path)  # autoguidance's guiding model, kept by training
    student = _student(run)
    if student is not None:  # the page picks the student's own sampler, steps and grid
        info["student"] = student
    return info


def _student(run: Run) -> dict[str, Any] | None:
    """A distilled run's method and how it samples (None for any other run)."""
    from ..training.distill import student_in, student_sampling
    try:
        d = student_in(run.path)
    except DdpmError:  # an unreadable distill.json: listed as a plain run
        return None
    return None if d is None else {"method": d.method, **student_sampling(d)}


async def list_runs(request: Request) -> JSONResponse:
    index: RunIndex = request.app.state.index
    runs = await run_in_threadpool(lambda: [_run_summary(r) for r in index.runs()])
    return JSONResponse({"runs": runs})


def _sample_request(body: Any) -> tuple[str, SampleConfig, bool]:
    """The page's JSON -> (run name, SampleConfig, stream frames?); one-line errors."""
    if not isinstance(body, dict) or not isinstance(body.get("run"), str):
        raise BadRequest("expected a JSON object with a run name")
    unknown = sorted(set(body) - set(PAGE_FIELDS) - {"run", "stream"})
    if unknown:
        raise BadRequest(f"unknown parameter {unknown[0]!r}; known: {', '.join(PAGE_FIELDS)}")
    given = {k: body[k] for k in PAGE_FIELDS if k in body}
    n = given.get("n", 16)
    if not isinstance(n, int) or not 1 <= n <= MAX_IMAGES:
        raise BadRequest(f"number of images must be between 1 and {MAX_IMAGES}, got {n!r}")
    steps = given.get("steps")
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        raise BadRequest(f"steps must be a whole number of at least 1, got {steps!r}")
    # one batch: the page streams the first batch, and per-image seeds make the size irrelevant to the pictures
    cfg = override(SampleConfig(), **{**given, "n": n, "batch_size": MAX_IMAGES})
    return body["run"], cfg, bool(body.get("stream", True))


async def start_sample(request: Request) -> JSONResponse:
    """Validate, load the model (cached), start the sampling thread; the page then opens /events."""
    run_name, cfg, stream = _sample_request(await _json(request))
    run = request.app.state.index.get(run_name)
    cache: ModelCache = request.app.state.cache
    model = await run_in_threadpool(cache.get, run, cfg.use_ema)
    steps = check_sample_config(model, cfg)
    classes = resolve_classes(cfg.classes, model.config)
    check_work(model, cfg, steps, check_images(cfg.n, classes))
    layout = None if classes is None else class_layout(classes, cfg.n)  # exactly n images, a row per class
    if layout is not None:
        cfg = dataclasses.replace(cfg, classes=layout.classes)
    job = request.app.state.jobs.start(run.name, sampling(model, cfg), stream, rows=layout and layout.rows)
    return JSONResponse({"id": job.id, "steps": steps, "checkpoint": model.source.name}, status_code=201)


async def start_edit(request: Request) -> JSONResponse:
    """Inpaint (RePaint) or edit (SDEdit) an image of the run's data or an uploaded one."""
    body = await _json(request)
    if not isinstance(body, dict):
        raise BadRequest("expected a JSON object")
    req = edits.parse_edit(body)
    run_name, cfg, stream = _sample_request(body)
    run, rcfg = _run_and_config(request, run_name)
    model = await run_in_threadpool(request.app.state.cache.get, run, cfg.use_ema)
    steps = check_sample_config(model, cfg)
    images = check_images(cfg.n, resolve_classes(cfg.classes, model.config))
    check_work(model, cfg, steps, images, edits.descents(req, steps))
    image = await run_in_threadpool(_image, request, rcfg, req.source)
    work, shown, final = edits.edit_work(model, cfg, req, image)
    job = request.app.state.jobs.start(run.name, work, stream, shown, final)
    return JSONResponse({"id": job.id, "checkpoint": model.source.name}, status_code=201)


def _image(request: Request, cfg: Any, source: dict[str, Any]) -> Any:
    if "upload" in source:
        return panels.upload_for(request.app.state.uploads.get(source["upload"]), cfg)
    return panels.data_image(cfg, source["index"])


async def source_image(request: Request) -> Response:
    """The image an edit starts from, at the model's size (the page paints its mask over it)."""
    _, cfg = _run_and_config(request)
    upload = request.query_params.get("upload")
    source = {"upload": upload} if upload else {"index": _int_param(request, "index", 0)}
    x = await run_in_threadpool(_image, request, cfg, source)
    return Response(png_bytes(x.permute(1, 2, 0).numpy()), media_type="image/png", headers={"Cache-Control": "no-store"})


def _job(request: Request) -> Job:
    job = request.app.state.jobs.get(request.path_params["job"])
    if job is None:
        keep = request.app.state.jobs.keep
        raise NotFound(f"no such sample: the server keeps the files of the latest {keep} only (or it restarted); "
                       "sample again")
    return job


async def job_events(request: Request) -> StreamingResponse:
    """Server-sent events: every event so far, then the new ones as the thread makes them.
    A page that goes away cancels its job, which frees the thread."""
    job = _job(request)

    async def stream() -> typing.AsyncIterator[str]:
        sent = 0
        try:
            while True:
                new = job.events[sent:]
                for e in new:
                    yield f"data: {e}\n\n"
                sent += len(new)
                if job.finished and sent == len(job.events):
                    return
                await asyncio.sleep(0.01)
        finally:
            if not job.finished:
                job.cancel.set()

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


async def cancel_job(request: Request) -> JSONResponse:
    job = _job(request)
    job.cancel.set()
    return JSONResponse({"id": job.id, "finished": job.finished})


DOWNLOADS = {"grid.png": ("image/png", grid_png), "denoising.gif": ("image/gif", gif_bytes),
             "samples.npz": ("application/octet-stream", npz_bytes)}


async def job_file(request: Request) -> Response:
    job, name = _job(request), request.path_params["file"]
    if name not in DOWNLOADS:
        raise NotFound(f"no download named {name}")
    if job.samples is None or (name == "denoising.gif" and not job.frames):
        raise BadRequest(f"{name} is not available: the sample did not finish" +
                         ("" if job.samples is None else " with streamed frames"))
    media, make = DOWNLOADS[name]
    data = await run_in_threadpool(make, job)
    return Response(data, media_type=media, headers={"Content-Disposition": f'attachment; filename="{name}"'})


def _run_and_config(request: Request, name: str | None = None) -> tuple[Run, Any]:
    run = request.app.state.index.get(name or request.path_params["run"])
    cfg = run_config(run)
    if cfg is None:
        raise NotFound(f"run {run.name} has no readable config.json yet")
    return run, cfg


async def schedules(request: Request) -> JSONResponse:
    _, cfg = _run_and_config(request)
    return JSONResponse(await run_in_threadpool(panels.schedule_curves, cfg))


def _int_param(request: Request, name: str, default: int) -> int:
    v = request.query_params.get(name)
    if v is None:
        return default
    try:
        return int(v)
    except ValueError:
        raise BadRequest(f"{name} must be a whole number, got {v!r}") from None


async def forward(request: Request) -> Response:
    """x0 | x_t | noise as a PNG, for t and an image of the run's data (or an uploaded one)."""
    _, cfg = _run_and_config(request)
    t, seed, index = (_int_param(request, k, d) for k, d in (("t", 0), ("seed", 0), ("index", 0)))
    check_seed(seed, "seed")
    upload = request.query_params.get("upload")
    source = {"upload": upload} if upload is not None else {"index": index}

    def make() -> bytes:
        return png_bytes(panels.forward_grid(cfg, _image(request, cfg, source), t, seed))

    return Response(await run_in_threadpool(make), media_type="image/png", headers={"Cache-Control": "no-store"})


async def upload_image(request: Request) -> JSONResponse:
    """An image for the run ``?run=NAME``, decoded once at its size (the bytes are not kept)."""
    _, cfg = _run_and_config(request, request.query_params.get("run") or "")
    data = await read_body(request, MAX_UPLOAD, "the image")
    if not data:
        raise BadRequest(f"send one image file of at most {MAX_UPLOAD // 2**20} MiB")
    image = await run_in_threadpool(panels.decode_upload, data, cfg)
    uploads: dict[str, panels.Upload] = request.app.state.uploads
    key = uuid.uuid4().hex[:12]
    uploads[key] = image
    while len(uploads) > 8:
        uploads.pop(next(iter(uploads)))
    return JSONResponse({"upload": key}, status_code=201)


async def training_log(request: Request) -> JSONResponse:
    """The log records after step ``after``, and the newest sample grid's step, for polling."""
    run = request.app.state.index.get(request.path_params["run"])
    after = _int_param(request, "after", -1)
    records = await run_in_threadpool(panels.training_records, run, after)
    latest = await run_in_threadpool(panels.latest_sample, run)
    return JSONResponse({"records": records, "sample_step": latest[0] if latest else None})


async def training_sample(request: Request) -> FileResponse:
    run = request.app.state.index.get(request.path_params["run"])
    latest = panels.latest_sample(run)
    if latest is None:
        raise NotFound(f"run {run.name} has written no sample grid yet")
    return FileResponse(latest[1], media_type="image/png", headers={"Cache-Control": "no-store"})


async def page(request: Request) -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})


async def _json(request: Request) -> Any:
    return parse_json(await read_body(request, MAX_JSON, "the request body"))


def _error(status: int):
    async def handler(request: Request, exc: Exception) -> JSONResponse:
        # args[0], not str(exc): str() of a KeyError quotes it; the message keeps its own quotes
        text = exc.args[0] if len(exc.args) == 1 and isinstance(exc.args[0], str) else str(exc)
        runs = [(r.name, r.path) for r in request.app.state.index.runs()]
        return JSONResponse({"error": page_message(text, runs) or type(exc).__name__}, status_code=status)
    return handler


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code)


async def _internal(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)


def create_app(index: RunIndex, cache: ModelCache | None = None, jobs: JobStore | None = None,
               access: Access | None = None) -> Starlette:
    """The ASGI app serving the page and its JSON API over the runs in ``index``, behind the
    guard of ``access`` (default: `ddpm ui`'s own, 127.0.0.1 port 8000)."""
    r = "/api/runs/{run}"
    j = "/api/jobs/{job}"
    routes = [
        Route("/", page), Route("/api/meta", meta), Route("/api/runs", list_runs),
        Route("/api/sample", start_sample, methods=["POST"]), Route(f"{j}/events", job_events),
        Route(f"{j}/cancel", cancel_job, methods=["POST"]), Route(f"{j}/files/{{file}}", job_file),
        Route(f"{r}/schedules", schedules), Route(f"{r}/forward.png", forward),
        Route(f"{r}/log", training_log), Route(f"{r}/sample.png", training_sample),
        Route("/api/upload", upload_image, methods=["POST"]), Route(f"{r}/source.png", source_image),
        Route("/api/edit", start_edit, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    handlers = {BadRequest: _error(400), DdpmError: _error(400), NotFound: _error(404), TooLarge: _error(413),
                HTTPException: _http_error, Exception: _internal}
    guard = Middleware(Guard, access=access or access_for("127.0.0.1", 8000))
    app = Starlette(routes=routes, exception_handlers=handlers, middleware=[guard])  # type: ignore[arg-type]
    app.state.index, app.state.cache = index, cache or ModelCache()
    app.state.jobs, app.state.uploads = jobs or JobStore(), {}
    return app


def serve(runs: list[str], runs_dir: str | None, host: str = "127.0.0.1", port: int = 8000,
          device: str = "cpu", allow_hosts: typing.Sequence[str] = ()) -> None:
    """Serve the page until interrupted (uvicorn); prints the address to open (with the token
    off loopback). ``allow_hosts``: more names it answers to (``*``: any)."""
    import uvicorn

    index = RunIndex(runs, runs_dir)
    _check_port(host, port)
    access = access_for(host, port, allow_hosts)
    app = create_app(index, ModelCache(device=device), access=access)
    names = ", ".join(r.name for r in index.runs()) or "none yet"
    where = "this machine only" if access.token is None else "other machines too, with the token"
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else f"[{host}]" if ":" in host else host
    token = "" if access.token is None else f"?token={access.token}"
    print(f"ddpm ui: http://{shown}:{port}/{token}  (bound to {host}: {where}; "
          f"runs: {names}; Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=1)


def _check_port(host: str, port: int) -> None:
    """A one-line error for a port out of range or taken, before uvicorn logs its own."""
    import socket

    if not 0 < port < 65536:
        raise DdpmError(f"--port must be between 1 and 65535, got {port}")
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise DdpmError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
