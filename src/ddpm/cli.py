"""The ``ddpm`` command: parse, build a config, call the library. No logic of its own."""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import DdpmError
from .interrupts import Interrupts

NO_PROGRESS = "no progress bar (it is off anyway when stderr is not a terminal)"
BUDGET = ("epochs", "max_steps", "minutes")  # a budget flag replaces the preset's budget


def _csv_ints(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in s.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    """One flag per config field (ddpm.flags), plus the flags that derive fields."""
    from .flags import add_config_flags

    p.add_argument("--cond", action="store_true",
                   help="class-conditional: one class per Fashion-MNIST label, or per first-level "
                        "subfolder of an image folder (root/<class>/...)")
    add_config_flags(p)


def build_config(args: argparse.Namespace) -> Any:
    """Preset or --config file (or the run's own config on --resume), then the flags on top."""
    from .config import RunConfig, override, preset
    from .flags import config_changes
    from .training.train import resume_config

    own = resume_config(args.run_dir) if args.resume and args.run_dir and args.preset is None else None
    if args.config:
        cfg = RunConfig.load(args.config)
    elif own is not None:
        cfg = own  # the checkpoint's own config, not a hand-edited RUN/config.json
    else:
        cfg = preset(args.preset or "seed")
    sections = config_changes(args)
    if any(k in sections.get("train", {}) for k in BUDGET):
        sections["train"] = {**{k: None for k in BUDGET}, **sections["train"]}
    new = {sec: override(getattr(cfg, sec), **fl) for sec, fl in sections.items()}
    cfg = replace(cfg, **new)
    return _conditional(cfg) if getattr(args, "cond", False) else cfg


def _conditional(cfg: Any) -> Any:
    """--cond: as many classes as the data source has, their names stored with the run."""
    from .data.sources import class_names

    names = class_names(cfg.data.source, cfg.data.data_dir)
    return replace(cfg, model=replace(cfg.model, num_classes=len(names)),
                   data=replace(cfg.data, class_names=names))


def _run_dir(args: argparse.Namespace, default_name: str) -> Path:
    if args.out:
        return Path(args.out)
    return Path("runs") / (args.name or f"{default_name}-{time.strftime('%Y%m%d-%H%M%S')}")


def cmd_train(args: argparse.Namespace) -> int:
    from .training.train import train

    if args.resume and not (args.out or args.name):
        raise DdpmError("--resume needs the run: give --out RUN_DIR or --name NAME")
    args.run_dir = str(_run_dir(args, args.preset or "seed")) if (args.out or args.name) else None
    cfg = build_config(args)
    run_dir = Path(args.run_dir) if args.run_dir else _run_dir(args, cfg.preset)
    res = train(cfg, run_dir, resume=args.resume, device=args.device, progress=not args.no_progress,
                tensorboard=not args.no_tensorboard)
    if not res.main:  # the other processes of a torchrun job: the main one reports
        return 0
    print(f"done: step {res.step}, {res.images_per_sec:.1f} images/s; checkpoint {res.checkpoint}")
    print(f"sample with: ddpm sample {run_dir}")
    return 0


def _sample_config(args: argparse.Namespace, sweep: bool = False) -> Any:
    from .config import override
    from .sampling.generate import SampleConfig

    return override(SampleConfig(), sampler=args.sampler or SampleConfig.sampler, steps=args.steps, spacing=args.spacing, eta=args.eta,
                    variance=args.variance, clip=args.clip, n=args.n, batch_size=args.batch_size,
                    seed=args.seed, use_ema=not args.no_ema, precision=args.precision,
                    **_guidance_fields(args, sweep))


def _load_for_sampling(args: argparse.Namespace, scfg: Any) -> tuple[Any, Any]:
    """The model of ``args.run``, and the sampling config with its process's own sampler where
    --sampler was not given (the ancestral sampler on the discrete chain)."""
    from dataclasses import replace

    from .sampling.generate import load_model

    model = load_model(args.run, device=args.device, use_ema=scfg.use_ema)
    if getattr(args, "sampler", None) is None:
        scfg = replace(scfg, sampler=model.process.default_sampler)
    return model, scfg


def _guidance_fields(args: argparse.Namespace, sweep: bool = False) -> dict[str, Any]:
    """--class, --guidance (one value; eval: the first of its sweep), --guidance-interval LO,HI."""
    from .sampling.guidance import parse_guidances

    ws = parse_guidances(args.guidance) if args.guidance is not None else (0.0,)
    if len(ws) > 1 and not sweep:
        raise DdpmError(f"--guidance takes one value here, got {args.guidance!r} "
                        "(a sweep: ddpm eval RUN --class all --guidance 0,1,2)")
    return {"classes": args.classes, "guidance": ws[0],  # checked in check_guidance
            "guidance_interval": _interval("--guidance-interval", args.guidance_interval),
            "autoguidance": 0.0 if args.autoguidance is None else args.autoguidance,
            "guiding_model": args.guiding_model,
            "autoguidance_interval": _interval("--autoguidance-interval", args.autoguidance_interval)}


def _interval(flag: str, text: str | None) -> tuple[float, ...] | None:
    """'LO,HI' -> (lo, hi); the range itself is checked in check_guidance."""
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise DdpmError(f"{flag} must be LO,HI (noise levels sigma), got {text!r}") from None


def _engine(model: Any, scfg: Any, args: argparse.Namespace) -> Any:
    """The model with its network run by --engine (torch: unchanged); after every input check."""
    from .engines import with_engine

    return with_engine(model, args.engine, scfg)


def _engine_suffix(args: argparse.Namespace) -> str:
    """A report made through another engine is named apart from the eager one's."""
    return "" if args.engine == "torch" else f"-{args.engine}"


def cmd_sample(args: argparse.Namespace) -> int:
    from .files import check_writable_dir
    from .pictures.viz import save_sample_set
    from .sampling.generate import check_sample_config, generate, load_model

    scfg = _sample_config(args)
    model, scfg = _load_for_sampling(args, scfg)
    scfg = _student_sampling(model, scfg, args)
    out = Path(args.out) if args.out else model.run_folder() / "samples"
    if args.index is not None and not 0 <= args.index < min(scfg.n, scfg.batch_size):
        raise DdpmError(f"--index must be between 0 and {min(scfg.n, scfg.batch_size) - 1}, got {args.index}")
    check_sample_config(model, scfg, stream=_streams(model, scfg))  # bad input: one line, before anything is written
    check_writable_dir(out)  # and an output folder that cannot take the result, before minutes of sampling
    made = not out.exists()
    model = _engine(model, scfg, args)
    frames = args.gif_show if args.gif else "none"
    t0 = time.perf_counter()
    stream = _stream_for(model, scfg, out)  # many images without class rows: straight to disk
    try:
        s = generate(model, scfg, frames=frames, frame_index=args.index, progress=not args.no_progress,
                     on_batch=stream and stream.write, keep=STREAM_KEEP if stream else None)
        if stream is not None:
            if s.labels is not None:
                stream.add("labels", s.labels.numpy())
            stream.close()
    except BaseException:
        if stream is not None:
            stream.discard()
            if made and not any(out.iterdir()):
                out.rmdir()
        raise
    dt = time.perf_counter() - t0
    n = stream.written if stream is not None else len(s.images)
    print(f"sampler {scfg.sampler}: {s.steps} steps, {s.nfe} network evaluations per image; "
          f"{n} images in {dt:.1f}s ({n / dt:.1f} images/s)")
    grid, nrow = s.class_rows()  # one row per class, when classes were asked for
    written = save_sample_set(out, s.images, labels=s.labels, grid=grid, nrow=nrow,
                              frames=s.frames if args.gif else None, gif_scale=4 if args.index is not None else 2,
                              npz=stream.path if stream is not None else None)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


STREAM_AT = 1024  # images from which `ddpm sample` streams samples.npz to disk instead of holding them
STREAM_KEEP = 64  # the images it still holds: the grid's


def _streams(model: Any, scfg: Any) -> bool:
    """Whether `ddpm sample` streams this request to disk: many images without class rows
    (whose grid takes images from every part of the request)."""
    from .sampling.guidance import resolve_classes

    return scfg.n >= STREAM_AT and resolve_classes(scfg.classes, model.config) is None


def _stream_for(model: Any, scfg: Any, out: Path) -> Any:
    """samples.npz streamed batch by batch (see :func:`_streams`), else None."""
    from .pictures.viz import sample_stream

    if not _streams(model, scfg):
        return None
    size, c = model.config.data.image_size, model.config.model.channels
    return sample_stream(out, (scfg.n, c, size, size))


def _student_sampling(model: Any, scfg: Any, args: argparse.Namespace) -> Any:
    """A distilled student samples as it was trained, at its own number of steps unless --steps
    says otherwise (ancestral sampling would undo the distillation): a progressive student with
    DDIM, eta 0, on the trailing grid; a consistency student with multistep consistency sampling
    on the trailing grid. Another --sampler than ddpm (the default) or ddim is left as asked."""
    from .training.distill import student_of, student_sampling

    d = student_of(model.source)
    if d is None or args.sampler not in (None, "ddpm", "ddim"):
        return scfg
    how = student_sampling(d)
    what = "multistep consistency sampling" if how["sampler"] == "consistency" else "DDIM (eta 0)"
    print(f"a student of {d.method} distillation: {what} on the trailing grid", file=sys.stderr)
    return replace(scfg, **{**how, "steps": scfg.steps if scfg.steps is not None else d.student_steps})


def cmd_noise(args: argparse.Namespace) -> int:
    from .pictures.forward import noise_figure

    path = noise_figure(args.image, out=args.out, ts=args.t, schedule=args.schedule, timesteps=args.timesteps,
                        size=args.size, data_dir=args.data, seed=args.seed, source=args.source)
    print(f"wrote {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(minutes=args.minutes, out=args.out, device=args.device, data_dir=args.data, cond=args.cond)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .pictures.plots import plot_run

    print(f"wrote {plot_run(args.run, args.out)}")
    return 0


def cmd_schedules(args: argparse.Namespace) -> int:
    from .pictures.plots import plot_schedules

    print(f"wrote {plot_schedules(args.out, args.timesteps)}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_diffusers, export_onnx

    if bool(args.onnx) == bool(args.diffusers):
        raise DdpmError("choose a format: --onnx or --diffusers DIR (one of them)")
    if args.diffusers:
        if args.out:
            raise DdpmError("--out is for --onnx; --diffusers DIR names the folder itself")
        print(export_diffusers(args.run, args.diffusers, use_ema=not args.no_ema).summary())
        return 0
    print(export_onnx(args.run, args.out, use_ema=not args.no_ema, opset=args.opset).summary())
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from .sampling.pretrained import resolve_run
    from .training.distill import DEFAULT_STEPS, DistillConfig, check_resume_flags, distill, load_distill_config

    given = {k: getattr(args, k) for k in ("method", "teacher_steps", "student_steps", "steps_per_round",
                                           "batch_size", "lr", "cond_drop", "target_decay", "dataset")}
    teacher = str(resolve_run(args.teacher))
    if args.resume:  # the run's own settings; a flag that would change one is refused
        d = load_distill_config(Path(args.out))
        check_resume_flags(d, {"teacher": teacher, **given})
    else:
        method = args.method or "consistency"
        if args.target_decay is not None and method != "consistency":
            raise DdpmError(f"--target-decay applies to --method consistency only; {method} would ignore it")
        steps = {"steps_per_round": DEFAULT_STEPS.get(method, DEFAULT_STEPS["consistency"])}
        d = DistillConfig(teacher, **{**steps, **{k: v for k, v in given.items() if v is not None}})
    res = distill(d, args.out, resume=args.resume, device=args.device, progress=not args.no_progress)
    if not res.main:  # the other processes of a torchrun job: the main one reports
        return 0
    print(f"done: step {res.step}; checkpoint {res.checkpoint}")
    print(f"sample with: ddpm sample {args.out} --steps {d.student_steps}")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from .ui import serve

    serve(args.runs_given, args.runs, host=args.host, port=args.port, device=args.device,
          allow_hosts=args.allow_host)
    return 0


INPAINT_HELP = (
    "RePaint (Lugmayr et al. 2022): at each step the kept pixels come from the input noised to that level, the "
    "rest from the model; every j levels it goes back up j levels (fresh forward noise) r - 1 times. Every "
    "sampler works: ddpm (ancestral, as in the paper), ddim (eta 0: deterministic descents, the jumps back "
    "still add noise), dpm++2m (its multistep history restarts after each jump) and heun (ODE steps between "
    "jumps). The kept pixels of the results are exactly the input's.")


def _edit_request(args: argparse.Namespace, folder: str) -> tuple[Any, Any, Any, Path]:
    """What inpaint and edit share, all checked before anything is written: the model, the
    sampling config, the input image and the output folder (default RUN/<folder>)."""
    from .sampling.editing import load_edit_image
    from .sampling.generate import check_sample_config, load_model

    scfg = _sample_config(args)
    model, scfg = _load_for_sampling(args, scfg)
    check_sample_config(model, scfg)
    image = load_edit_image(model, args.image)
    out = Path(args.out) if args.out else model.run_folder() / folder
    return _engine(model, scfg, args), scfg, image, out


def _save_edits(out: Path, s: Any, grid: Any, nrow: int, gif: bool, dt: float, what: str) -> None:
    from .pictures.viz import save_sample_set

    print(f"{what} with {s.steps} steps, {s.nfe} network evaluations per image; "
          f"{len(s.images)} images in {dt:.1f}s")
    written = save_sample_set(out, s.images, grid=grid, nrow=nrow, frames=s.frames if gif else None)
    print("wrote " + ", ".join(str(p) for p in written))


def cmd_inpaint(args: argparse.Namespace) -> int:
    from .files import check_writable_dir
    from .sampling.editing import RePaintConfig, check_repaint, comparison_grid, inpaint, load_mask
    from .sampling.generate import check_sample_config

    model, scfg, image, out = _edit_request(args, "inpaint")
    rp = RePaintConfig(jump_length=args.jump_length, resample=args.resample)
    check_repaint(rp, check_sample_config(model, scfg))  # its work bounded, before the first step
    mask = load_mask(args.mask, model.config.data.image_size)
    check_writable_dir(out)
    t0 = time.perf_counter()
    s = inpaint(model, image, mask, scfg, rp, record=args.gif)
    grid, nrow = comparison_grid(image, s.images, mask)
    _save_edits(out, s, grid, nrow, args.gif, time.perf_counter() - t0,
                f"RePaint (j={rp.jump_length}, r={rp.resample}), sampler {scfg.sampler}")
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    from .files import check_writable_dir
    from .sampling.editing import check_strength, comparison_grid, edit

    check_strength(args.strength)
    model, scfg, image, out = _edit_request(args, "edits")
    check_writable_dir(out)
    t0 = time.perf_counter()
    s = edit(model, image, args.strength, scfg, record=args.gif)
    grid, nrow = comparison_grid(image, s.images)
    _save_edits(out, s, grid, nrow, args.gif, time.perf_counter() - t0,
                f"SDEdit (strength {args.strength}), sampler {scfg.sampler}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .files import check_writable_dir
    from .data.sources import load_images_file
    from .data.sources import DEFAULT_REFERENCE
    from .evaluation.evaluate import (Reference, default_floor, evaluate_images, inception_fid, real_images,
                                      resolve_images)
    from .evaluation.features import default_feature_net, load_feature_net

    from .config import check_seed

    check_seed(args.seed)
    if args.nll:
        return cmd_eval_nll(args)
    if args.inpaint is not None:
        return cmd_eval_inpaint(args)
    from .sampling.guidance import is_null

    if args.run is not None and args.classes is not None and not is_null(args.classes):
        return cmd_eval_control(args)  # named classes: the sweep with class agreement
    if sum(x is not None and x is not False for x in (args.run, args.samples, args.real)) != 1:
        raise DdpmError("give exactly one of: a RUN (to sample from), --samples FILE.npz, or --real")
    if args.out or not args.run:  # the report's folder, checked before the work (a RUN's: once it is found)
        check_writable_dir(args.out or (Path(args.samples).parent if args.samples else Path(".")))
    net = load_feature_net(args.features) if args.features else default_feature_net()
    info: dict[str, Any] = {}
    reference = args.reference or DEFAULT_REFERENCE  # files and real images: Fashion-MNIST's, unless told
    floor = default_floor(reference)
    if args.samples:
        images, out, info["source"] = load_images_file(args.samples), Path(args.samples).parent, args.samples
    elif args.real:
        pool, images = real_images(args.n, net, reference=reference, seed=args.seed, data_dir=args.data)
        out, info["source"] = Path(args.out or "."), f"{pool} (real)"
    else:
        images, out, info, plan = _eval_samples(args, net)
        if isinstance(plan, Reference):
            return _eval_inception_only(args, images, plan, out, info)
        reference, floor = plan
    if args.inception_weights is not None:
        ref = resolve_images(reference, net, args.data)[1]
        info["inception_fid"] = inception_fid(images, ref, args.inception_weights)
    report = evaluate_images(images, feature_net=net, reference=reference, floor=floor,
                             data_dir=args.data, seed=args.seed)
    report = replace(report, **{k: v for k, v in info.items()
                                if k in ("sampler", "steps", "nfe", "source", "arithmetic")})
    d = report.to_dict() | ({"inception_fid": info["inception_fid"]} if "inception_fid" in info else {})
    if info.get("autoguidance"):
        d |= {"autoguidance": info["autoguidance"], "guiding_model": info["guiding_model"],
              "autoguidance_interval": info["autoguidance_interval"]}
    if info.get("labels"):
        d["labels"] = info["labels"]  # a conditional model's default draw, or its null class
    return _print_and_write(args, d, out, info)


def _print_and_write(args: argparse.Namespace, d: dict[str, Any], out: Path, info: dict[str, Any]) -> int:
    """The evaluation's report on stdout and in OUT/eval-....json, named by its settings."""
    from .evaluation.evaluate import report_name

    text = json.dumps(d, indent=2)
    print(text)
    name = report_name(info.get("sampler"), info.get("steps"), info.get("arithmetic", "fp32"),
                       info.get("autoguidance", 0.0), info.get("autoguidance_interval"), info.get("labels"))
    path = Path(args.out) / name if args.out else out / name
    _write_report(path, text + "\n")
    print(f"wrote {path}", file=sys.stderr)
    return 0


def _write_report(path: Path, text: str) -> None:
    """A report printed above is kept there when its file cannot be written: say so."""
    from .files import WriteError, atomic_write_text

    try:
        atomic_write_text(path, text)
    except WriteError as e:
        e.note = "; the report printed above is its only copy"
        raise


def _eval_samples(args: argparse.Namespace, net: Any) -> tuple[Any, Path, dict[str, Any], Any]:
    """A run's samples, what they are compared with (a RunReference; a Reference: its own test
    split at its size, for Inception FID alone where the shipped features do not fit it)."""
    from .evaluation.evaluate import Reference, check_inception_weights, fits_features, run_reference, run_test_images
    from .sampling.generate import generate, load_model

    from .files import check_writable_dir

    scfg = _sample_config(args)
    model, scfg = _load_for_sampling(args, scfg)
    scfg = _student_sampling(model, scfg, args)
    d = model.config.data
    if args.reference is None and args.inception_weights is not None and not fits_features(
            net, d.source, args.data if args.data is not None else d.data_dir):
        check_inception_weights(args.inception_weights)
        plan: Any = Reference(f"{d.test_source or d.source} (test)", run_test_images(model.config, 1 << 62, args.data))
    else:  # refused here, before minutes of sampling, when nothing fits the run's data
        plan = run_reference(model.config, net, args.reference, args.data, what=str(args.run))
    out = check_writable_dir(Path(args.out) if args.out else model.run_folder() / "samples")
    model = _engine(model, scfg, args)
    s = generate(model, scfg, progress=not args.no_progress)
    info = {"sampler": scfg.sampler, "steps": s.steps, "nfe": s.nfe, "source": str(model.source),
            "arithmetic": s.arithmetic if args.engine == "torch" else args.engine, "autoguidance": scfg.autoguidance,
            "guiding_model": str(model.guide_folder(scfg.guiding_model)) if scfg.autoguidance else None,
            "autoguidance_interval": scfg.autoguidance_interval,
            "labels": "null" if s.labels is None and model.config.model.num_classes else
            None if s.labels is None else f"drawn{f'-cfg{scfg.guidance:g}' if scfg.guidance else ''}"}
    return s.images, out, info, plan


def _eval_inception_only(args: argparse.Namespace, images: Any, ref: Any, out: Path, info: dict[str, Any]) -> int:
    """Inception FID of a run whose data the shipped features do not fit, against its test split."""
    from .evaluation.evaluate import inception_fid

    fid = inception_fid(images, ref.images, args.inception_weights)
    d = {"n_samples": len(images), "inception_fid": fid, "reference": ref.name, "n_reference": len(ref.images),
         **{k: info.get(k) for k in ("sampler", "steps", "nfe", "source", "arithmetic")}}
    return _print_and_write(args, d, out, info)


def cmd_eval_control(args: argparse.Namespace) -> int:
    """ddpm eval RUN --class all --guidance 0,1,2,4: a guidance sweep with class agreement."""
    from .evaluation.control import guidance_sweep, plot_sweep
    from .evaluation.evaluate import default_floor
    from .evaluation.features import default_feature_net, load_feature_net
    from .files import check_writable_dir
    from .sampling.generate import load_model
    from .sampling.guidance import parse_guidances

    if args.samples or args.real:
        raise DdpmError("--class evaluates a RUN; drop --samples / --real")
    ws = parse_guidances(args.guidance) if args.guidance is not None else (0.0,)
    scfg = _sample_config(args, sweep=True)
    model, scfg = _load_for_sampling(args, scfg)
    out = check_writable_dir(Path(args.out) if args.out else model.run_folder() / "samples")
    net = load_feature_net(args.features) if args.features else default_feature_net()
    floor = default_floor(args.reference) if args.reference is not None else None  # None: the run's own
    model = _engine(model, scfg, args)
    rep = guidance_sweep(model, scfg, ws, feature_net=net, reference=args.reference, floor=floor,
                         data_dir=args.data, seed=args.seed)
    for r in rep.results:
        agree = "" if r.agreement is None else f" agreement={100 * r.agreement:.1f}%"
        print(f"guidance {r.guidance:g}: {r.report.summary()}{agree} ({r.images_per_sec:.1f} images/s)")
    name = f"eval-control-{scfg.sampler}-{rep.steps}{_engine_suffix(args)}"
    _write_report(out / f"{name}.json", json.dumps(rep.to_dict(), indent=2) + "\n")
    plot_sweep(rep, out / f"{name}.png")
    print(f"wrote {out / (name + '.json')}, {out / (name + '.png')}", file=sys.stderr)
    return 0


def cmd_eval_inpaint(args: argparse.Namespace) -> int:
    """ddpm eval RUN --inpaint right|center --resample R: FD of RePaint's completions of test images."""
    from .evaluation.features import default_feature_net, load_feature_net
    from .evaluation.evaluate import run_reference, run_test_images
    from .evaluation.inpainting import inpainting_report
    from .files import check_writable_dir
    from .sampling.editing import MASK_SHAPES, RePaintConfig, check_repaint
    from .sampling.generate import check_sample_config, load_model

    if args.inpaint not in MASK_SHAPES:
        raise DdpmError(f"unknown --inpaint {args.inpaint!r}; choose one of: {', '.join(MASK_SHAPES)}")
    if args.run is None or args.samples or args.real:
        raise DdpmError("--inpaint evaluates a RUN (the model that fills the holes); drop --samples / --real")
    scfg = _sample_config(args)
    rp = RePaintConfig(jump_length=args.jump_length, resample=args.resample)
    check_repaint(rp)
    model, scfg = _load_for_sampling(args, scfg)
    check_repaint(rp, check_sample_config(model, scfg))
    out = check_writable_dir(Path(args.out) if args.out else model.run_folder() / "samples")
    net = load_feature_net(args.features) if args.features else default_feature_net()
    reference = run_reference(model.config, net, args.reference, args.data, what=str(args.run)).reference
    images = run_test_images(model.config, scfg.n, args.data)
    model = _engine(model, scfg, args)
    rep = inpainting_report(model, scfg, rp, args.inpaint, images=images, feature_net=net,
                            reference=reference, data_dir=args.data, seed=args.seed)
    print(rep.summary())
    path = out / (f"eval-inpaint-{args.inpaint}-{scfg.sampler}-{rep.steps}-j{rp.jump_length}-r{rp.resample}"
                  f"{_engine_suffix(args)}.json")
    _write_report(path, json.dumps(rep.to_dict(), indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    return 0


def cmd_eval_nll(args: argparse.Namespace) -> int:
    from .evaluation.evaluate import run_test_images
    from .files import check_writable_file
    from .evaluation.likelihood import check_has_bound, format_nll, nll_bits_per_dim
    from .sampling.generate import load_model

    if args.engine != "torch":
        raise DdpmError("--engine applies to sampling; --nll runs the network in PyTorch (drop --engine)")
    if args.run is None:
        raise DdpmError("--nll needs a RUN or checkpoint")
    if args.n < 1:
        raise DdpmError(f"--n must be at least 1, got {args.n}")
    model = load_model(args.run, device=args.device, use_ema=not args.no_ema)
    check_has_bound(model.config)
    out = Path(args.out) / "nll.json" if args.out else model.run_folder() / "nll.json"
    check_writable_file(out, "report")  # before minutes of work
    images = run_test_images(model.config, args.n, args.data)  # the run's own test split
    report = nll_bits_per_dim(model, images, timesteps=args.nll_steps, batch_size=args.batch_size,
                              seed=args.seed, variance=args.nll_variance, clip=args.clip,
                              progress=not args.no_progress)
    print(format_nll(report))
    _write_report(out, json.dumps(report.to_dict(), indent=2))
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .config import VARIANCES
    from .data.sources import DEFAULT_REFERENCE, split_names
    from .core.schedules import SCHEDULES
    from .flags import names_help

    p = argparse.ArgumentParser(
        prog="ddpm", description="Denoising diffusion probabilistic models.",
        epilog="environment: the command sets OMP_WAIT_POLICY=PASSIVE for itself (idle OpenMP threads sleep: "
               "much faster training on a shared CPU) unless OMP_WAIT_POLICY is set; DDPM_OMP_WAIT_POLICY=off "
               "keeps OpenMP's default. On CUDA, sampling and evaluation use TF32; training follows --tf32.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model (a run folder under runs/)")
    t.add_argument("--preset", help="seed (the seed's recipe) | fast (small, for CPUs) | fast-cond "
                                    "(fast, class-conditional on Fashion-MNIST) | fast-rgb (fast at 32x32 RGB: "
                                    "give --dataset) | dit (fast's recipe with a small diffusion transformer) | "
                                    "dit-cond (dit, class-conditional) | rf, rf-cond (rectified flow) | edm, edm-cond (EDM)")
    t.add_argument("--config", help="a config.json to train from (e.g. RUN/config.json)")
    t.add_argument("--name", help="run name: the run lives in runs/NAME")
    t.add_argument("--out", help="run folder (instead of runs/NAME)")
    t.add_argument("--resume", action="store_true", help="continue the run from its last checkpoint")
    t.add_argument("--device", default="auto", help="auto | cpu | cuda")
    t.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)
    t.add_argument("--no-tensorboard", action="store_true",
                   help="no TensorBoard events in RUN/tb (written only when tensorboard is installed)")
    _add_train_flags(t)
    t.set_defaults(fn=cmd_train)

    s = sub.add_parser("sample", help="draw samples from a run or checkpoint")
    s.add_argument("run", help="run folder or checkpoint folder")
    _add_sample_flags(s)
    s.add_argument("--out", help="output folder (default RUN/samples)")
    s.add_argument("--gif", action="store_true", help="also write denoising.gif")
    s.add_argument("--gif-show", default="x_t", choices=["x_t", "x0"], help="animate x_t or the predicted x0")
    s.add_argument("--index", type=int, help="animate only image K of the grid")
    s.set_defaults(fn=cmd_sample)

    nz = sub.add_parser("noise", help="the forward process figure: one image noised at several t")
    nz.add_argument("--image", help="PNG/JPEG (default: the first image of --source)")
    nz.add_argument("--source", default="fashion-mnist",
                    help="a data source, as a run's --dataset: fashion-mnist (default), an image folder, an .npz, "
                         "a Hugging Face dataset")
    nz.add_argument("--t", type=_csv_ints, default=(0, 50, 100, 150, 199))
    nz.add_argument("--schedule", default="linear", help=names_help(SCHEDULES))
    nz.add_argument("--timesteps", type=int, default=200)
    nz.add_argument("--size", type=int, default=28)
    nz.add_argument("--data", help="folder holding the Fashion-MNIST IDX files")
    nz.add_argument("--seed", type=int, default=0)
    nz.add_argument("--out", default="noise.png")
    nz.set_defaults(fn=cmd_noise)

    ev = sub.add_parser("eval", help="sample quality (FD-FMNIST, KID, precision/recall) or --nll bits/dim")
    ev.add_argument("run", nargs="?", help="run folder or checkpoint to sample from")
    ev.add_argument("--samples", help="evaluate the images of a samples.npz instead")
    ev.add_argument("--real", action="store_true", help="evaluate --n real training images (the floor)")
    _add_sample_flags(ev, n_default=1000)
    ev.add_argument("--reference", help=f"{names_help(split_names())} | an image folder | an .npz | a Hugging Face "
                    f"dataset (default: a RUN's own test split; for --samples and --real, {DEFAULT_REFERENCE})")
    ev.add_argument("--features", help="a feature net saved by tools/fit_features.py (default: the shipped one)")
    ev.add_argument("--inception-weights", help="also Inception FID, with these weights (torchmetrics needed)")
    ev.add_argument("--data", help="folder holding the Fashion-MNIST IDX files")
    ev.add_argument("--out", help="folder for the JSON report (default: beside the samples)")
    g = ev.add_argument_group("likelihood (--nll)")
    g.add_argument("--nll", action="store_true", help="the variational bound (DDPM Eq. 5) in bits/dim on the run's test split")
    g.add_argument("--nll-steps", type=int, help="KL terms per image: stratified, unbiased estimate (default all T)")
    g.add_argument("--nll-variance", help=f"{names_help(VARIANCES)} (default: learned for learn-sigma runs)")
    g = ev.add_argument_group("inpainting (--inpaint)")
    g.add_argument("--inpaint", metavar="right|center", help="FD-FMNIST of the first --n images of the run's test split "
                   "completed by RePaint with this region unknown (the right half, or a centre square of half "
                   "the side), beside the originals' FD (the floor) and the hole left black")
    g.add_argument("--jump-length", type=int, default=10, help="RePaint's j (default 10)")
    g.add_argument("--resample", type=int, default=10, help="RePaint's r (default 10; 1: no resampling)")
    ev.set_defaults(fn=cmd_eval)

    d = sub.add_parser("demo", help="train the conditional fast preset for a few minutes, then sample a grid "
                                    "(one row per class) and a GIF")
    d.add_argument("--minutes", type=float, default=5.0)
    d.add_argument("--out", help="run folder (default runs/demo-TIME)")
    d.add_argument("--device", default="auto")
    d.add_argument("--data", help="folder holding the Fashion-MNIST IDX files")
    kind = d.add_mutually_exclusive_group()
    kind.add_argument("--cond", dest="cond", action="store_true", default=True,
                      help="train fast-cond: a grid with one row per class, guided (the default)")
    kind.add_argument("--uncond", dest="cond", action="store_false",
                      help="train the unconditional fast preset instead: a grid of random garments")
    d.set_defaults(fn=cmd_demo)

    pl = sub.add_parser("plot", help="a run's loss curves (overall and per quarter of t), lr and gradient norm")
    pl.add_argument("run", help="run folder")
    pl.add_argument("--out", help="PNG to write (default RUN/loss.png)")
    pl.set_defaults(fn=cmd_plot)

    sc = sub.add_parser("schedules", help=f"alpha_bar and signal-to-noise ratio of the beta schedules ({names_help(SCHEDULES)})")
    sc.add_argument("--timesteps", type=int, default=1000)
    sc.add_argument("--out", default="schedules.png")
    sc.set_defaults(fn=cmd_schedules)

    ex = sub.add_parser("export", help="the network as an ONNX graph (x_t, t[, cond]) -> out, checked "
                        "against PyTorch (needs ddpm[export]), or a run as a diffusers pipeline (ddpm[diffusers])")
    ex.add_argument("run", help="run folder or checkpoint folder")
    ex.add_argument("--onnx", action="store_true", help="write ONNX (dynamic batch)")
    ex.add_argument("--diffusers", metavar="DIR", help="write a DDPMPipeline folder (unet/, scheduler/, "
                    "model_index.json): a vp run of --arch diffusers-unet; DIR must be new or empty")
    ex.add_argument("--out", help="file to write (default RUN/model.onnx)")
    ex.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    ex.add_argument("--no-ema", action="store_true", help="export the raw weights, not the EMA")
    ex.set_defaults(fn=cmd_export)

    di = sub.add_parser("distill", help="a student run that samples in 1-4 steps what its teacher drew in many: "
                        "consistency (Song et al. 2023) or progressive (Salimans & Ho 2022) distillation")
    di.add_argument("teacher", help="the teacher's run or checkpoint folder, or a shipped model's name "
                    "(fashion-mnist)")
    di.add_argument("--out", required=True, help="the student's run folder")
    di.add_argument("--method",
                    help="consistency (default): the end of the teacher's ODE in one evaluation, sampled with "
                    "--sampler consistency at 1, 2 or 4 steps; progressive: DDIM steps halved round by round")
    di.add_argument("--teacher-steps", type=int,
                    help="progressive: DDIM steps of the first round's teacher; consistency: levels of the "
                    "teacher's DDIM ODE (default 16)")
    di.add_argument("--student-steps", type=int,
                    help="progressive: steps of the final student (halved each round); consistency: the steps "
                    "it samples with by default (default 4)")
    di.add_argument("--steps-per-round", type=int,
                    help="optimiser steps in all (consistency, default 250) or per halving (progressive, default 500)")
    di.add_argument("--target-decay", type=float,
                    help="consistency: moving-average decay of the target network (default 0.95)")
    di.add_argument("--batch-size", type=int, help="default: the teacher's")
    di.add_argument("--dataset", help="the student's training images (default: the teacher's data source; "
                    "give one for a diffusers pipeline teacher)")
    di.add_argument("--lr", type=float, help="default 1e-4")
    di.add_argument("--cond-drop", type=float,
                    help="conditional teachers: the share of the student's batches whose labels become the null "
                    "class, which trains its unconditional output (default: the teacher's training rate)")
    di.add_argument("--resume", action="store_true", help="continue the student from its last checkpoint")
    di.add_argument("--device", default="auto", help="auto | cpu | cuda")
    di.add_argument("--no-progress", action="store_true")
    di.set_defaults(fn=cmd_distill)

    ui = sub.add_parser("ui", help="a local web page: watch sampling step by step, compare samplers, "
                        "the forward process, training curves (needs ddpm[ui])")
    ui.add_argument("runs_given", nargs="*", metavar="RUN", help="run folders to show (besides those under --runs)")
    ui.add_argument("--runs", default="runs", help="also list every run folder directly under DIR (default runs/)")
    ui.add_argument("--host", default="127.0.0.1", help="address to bind: 127.0.0.1 (default) serves this machine "
                                                        "only; any other address needs the token printed at start")
    ui.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                    help="a further host name the page answers to (as when reached through a proxy or a DNS name; "
                         "repeat for more; '*': any). Other names are refused, against DNS rebinding")
    ui.add_argument("--port", type=int, default=8000)
    ui.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ui.set_defaults(fn=cmd_ui)

    ip = sub.add_parser("inpaint", help="fill in the black part of --mask in --image (RePaint; any model, "
                        "every sampler)", description=INPAINT_HELP)
    _add_edit_flags(ip, "inpaint")
    ip.add_argument("--mask", required=True, help="grey or black-and-white image of the model's size: "
                    "white (>= 50%% grey) = keep the input's pixel, black = fill it in")
    ip.add_argument("--jump-length", type=int, default=10, help="RePaint's j: grid levels gone back up at "
                    "each jump (default 10)")
    ip.add_argument("--resample", type=int, default=10, help="RePaint's r: passes over each jump point; 1 = "
                    "plain replacement, no resampling; costs about r times the sampler's steps (default 10)")
    ip.set_defaults(fn=cmd_inpaint)

    ed = sub.add_parser("edit", help="turn --image (e.g. a rough sketch) into a sample near it (SDEdit)")
    _add_edit_flags(ed, "edits")
    ed.add_argument("--strength", type=float, required=True, help="in (0, 1]: noise the image to t0 = S*T, then "
                    "denoise; small stays close to the input, 1 ignores it (plain sampling)")
    ed.set_defaults(fn=cmd_edit)
    return p


def _add_edit_flags(p: argparse.ArgumentParser, folder: str) -> None:
    """inpaint and edit: the run, the input image, the sampling flags, the outputs."""
    p.add_argument("run", help="run folder or checkpoint folder (any model, conditional or not)")
    p.add_argument("--image", required=True, help="PNG/JPEG, read like a data folder's images (resized and "
                   "centre-cropped to the model's size, grey or RGB as the model)")
    _add_sample_flags(p, n_default=8)
    p.add_argument("--out", help=f"output folder (default RUN/{folder}): grid.png (input | "
                   f"{'mask | ' if folder == 'inpaint' else ''}results), samples.npz")
    p.add_argument("--gif", action="store_true", help="also write denoising.gif (the first image's batch)")


def _add_sample_flags(s: argparse.ArgumentParser, n_default: int = 64) -> None:
    from .config import CLIPS, VARIANCES
    from .core.schedules import SPACINGS
    from .flags import names_help
    from .runtime.precision import PRECISIONS
    from .samplers import SAMPLERS

    def own(field: str) -> str:  # each sampler's default, from the table
        return ", ".join(f"{n} {getattr(spec, field) or 'T'}" for n, spec in SAMPLERS.items())

    s.add_argument("--sampler", default=None,
                   help="default: the process's own (ddpm on vp, heun on edm and rectified-flow); "
                        + "; ".join(f"{n}: {spec.summary}" for n, spec in SAMPLERS.items()))
    g = s.add_argument_group("class-conditional models")
    g.add_argument("--class", dest="classes", metavar="CLASS",
                   help="a class name (e.g. sneaker) or index, a comma list, or 'all' (one grid row per "
                        "class); several classes share --n evenly, rounded up; 'none': the null class (no "
                        "label). Unset, each image's class is drawn in the training set's proportions "
                        "(edits: the null class)")
    g.add_argument("--guidance", metavar="W",
                   help="classifier-free guidance w >= 0: eps = eps_c + w (eps_c - eps_u); 0 (the default) "
                        "is the plain conditional model; w is Ho & Salimans' w, diffusers' guidance_scale "
                        "is w + 1; costs one batched pass of twice the images (eval: a comma list, a sweep)")
    g.add_argument("--guidance-interval", metavar="LO,HI",
                   help="guide only where the noise level sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) is "
                        "in [LO, HI] (sigma units, as EDM; not t), Kynkaanniemi et al. 2024")
    a = s.add_argument_group("autoguidance (any model)")
    a.add_argument("--autoguidance", type=float, metavar="W",
                   help="guide away from a weaker model of the same kind (Karras et al. 2024): out = out + "
                        "w (out - out_guide); their guidance weight is 1 + w; costs one more pass per step")
    a.add_argument("--guiding-model", metavar="PATH",
                   help="the weaker model: a run or checkpoint folder (default: RUN/guide, which training "
                        "keeps at --guide-at of its budget; the fast presets do)")
    a.add_argument("--autoguidance-interval", metavar="LO,HI",
                   help="autoguide only where the noise level sigma_t is in [LO, HI] (sigma units, as "
                        "--guidance-interval); the guide is not run elsewhere, so those steps cost one pass")
    s.add_argument("--steps", type=int, help=f"sampling steps (default: the sampler's own: {own('default_steps')})")
    s.add_argument("--spacing", default=None,
                   help=f"{' | '.join(SPACINGS)} (default: the sampler's own: {own('default_spacing')})")
    s.add_argument("--eta", type=float, default=None, help="ddim only: noise, 0 (deterministic, the default) to 1")
    s.add_argument("--variance", default=None, help=f"ddpm only: {names_help(VARIANCES)} (default beta_tilde)")
    s.add_argument("--clip", default="clip", help=f"x0 clipping: {names_help(CLIPS)}")
    s.add_argument("--n", type=int, default=n_default)
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    s.add_argument("--precision", default="fp32",
                   help=f"{names_help(PRECISIONS)}: auto times bf16 against fp32 on this CPU once (cached) and "
                        "takes the faster; fp16 needs CUDA")
    s.add_argument("--device", default="auto")
    s.add_argument("--engine", default="torch", metavar="ENGINE",
                   help="what runs the network: torch (eager PyTorch, the default); openvino (fp32) or "
                        "openvino-int8 (NNCF int8, calibrated on this sampling's own network inputs): CPU, "
                        "--precision fp32, pip install 'ddpm[openvino]'; int8 wins only on CPUs with VNNI but "
                        "no native bfloat16 (docs/guides/engines.md)")
    s.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)


def main(argv: Sequence[str] | None = None) -> int:
    with Interrupts() as interrupts:  # first of all: a signal during the imports below waits for them
        try:
            code = _run(argv)
            interrupts.check()  # a signal that came during the last import
            return code
        except DdpmError as e:
            return _fail(str(e))
        except KeyboardInterrupt as e:
            print(_one_line(f"interrupted: {e}" if str(e) else "interrupted"), file=sys.stderr)
            return 128 + getattr(e, "signum", 2)  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
        except OSError as e:  # the last resort: a reader or writer that did not say it in its own words
            where = f"{e.filename}: " if e.filename else ""
            return _fail(f"{where}{e.strerror or e}")
        except MemoryError as e:
            return _fail(f"out of memory{': ' + str(e) if str(e) else ''} (try a smaller --batch-size or size)")


def _run(argv: Sequence[str] | None) -> int:
    from .runtime.env import apply_command_defaults, command_cuda_math

    apply_command_defaults()  # before torch loads (this module imports none): ddpm.runtime.env
    args = build_parser().parse_args(argv)
    _check_utf8(args)
    fn: Callable[[argparse.Namespace], int] = args.fn
    if getattr(args, "device", None) is not None:
        command_cuda_math(True)  # the command's own process only; `ddpm train` then follows train.tf32
    return fn(args)


def _check_utf8(args: argparse.Namespace) -> None:
    """Every name given, input or output, is UTF-8: a run written under bytes that are not could
    never be read back, listed or printed by a strict UTF-8 terminal."""
    import os

    for value in vars(args).values():
        for text in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(text, str) and not _encodes(text):
                raise DdpmError(f"the name {os.fsencode(text)!r} is not UTF-8; ddpm reads and writes names "
                                "in UTF-8 only: rename it or choose another")


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:  # undecodable bytes arrive as lone surrogates (PEP 383)
        return False


def _fail(message: str) -> int:
    print(_one_line(f"error: {message}"), file=sys.stderr)
    return 2


def _one_line(text: str, limit: int = 2000) -> str:
    """A message is one line, and never a 50 MB one."""
    text = " ".join(text.split("\n")).encode("utf-8", "backslashreplace").decode("utf-8")  # printable by any UTF-8 stream
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


if __name__ == "__main__":
    sys.exit(main())
