"""End to end through the command, on a few dozen tiny images the test makes itself."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddpm.cli import main
from ddpm.config import RunConfig
from helpers import tiny_config, write_config


def test_train_resume_sample(tmp_path: Path, image_dir: Path) -> None:
    cfg = write_config(tmp_path / "cfg.json", tiny_config(image_dir, sample_every=3))
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(run), "--no-progress"]) == 0
    assert (run / "latest").read_text().strip() == "step-00000004"
    assert (run / "samples" / "step-00000003.png").is_file()
    logs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in logs)
    saved = RunConfig.load(run / "config.json")
    assert saved.model.dim == 8 and saved.data.image_size == 8

    assert main(["train", "--out", str(run), "--resume", "--max-steps", "6", "--no-progress"]) == 0
    assert (run / "latest").read_text().strip() == "step-00000006"
    assert len(list((run / "checkpoints").glob("step-*"))) == 2  # keep=2

    out = tmp_path / "samples"
    assert main(["sample", str(run), "--n", "5", "--batch-size", "3", "--gif", "--out", str(out)]) == 0
    imgs = np.load(out / "samples.npz")["images"]
    assert imgs.shape == (5, 1, 8, 8) and imgs.dtype == np.uint8
    assert Image.open(out / "grid.png").size[0] > 8
    gif = Image.open(out / "denoising.gif")
    assert gif.n_frames == 21  # x_T plus one frame per step of the 20

    for sampler, steps in (("ddim", 5), ("dpm++2m", 5), ("heun", 3)):
        assert main(["sample", str(run / "checkpoints" / "step-00000006"), "--n", "2", "--sampler", sampler,
                     "--steps", str(steps), "--out", str(tmp_path / sampler)]) == 0


def test_noise_figure(tmp_path: Path, image_dir: Path) -> None:
    out = tmp_path / "noise.png"
    assert main(["noise", "--image", str(image_dir / "img00.png"), "--size", "12", "--out", str(out)]) == 0
    assert Image.open(out).size[0] >= 5 * 12


@pytest.mark.parametrize("argv, message", [
    (["train", "--preset", "nope"], "unknown preset"),
    (["train", "--preset", "seed", "--schedule", "zigzag", "--out", "{tmp}/r"], "unknown schedule"),
    (["train", "--preset", "seed", "--loss", "l3", "--out", "{tmp}/r"], "unknown loss"),
    (["train", "--preset", "seed", "--batch-size", "0", "--out", "{tmp}/r"], "batch size"),
    (["train", "--preset", "seed", "--image-size", "30", "--out", "{tmp}/r"], "image size 30"),
    (["train", "--preset", "seed", "--dataset", "{tmp}/missing", "--out", "{tmp}/r"], "missing"),
    (["train", "--preset", "seed", "--max-steps", "-3", "--out", "{tmp}/r"], "positive"),
    (["sample", "{tmp}/nothing"], "no run or checkpoint"),
    (["noise", "--image", "{tmp}/none.png"], "none.png"),
    (["noise", "--t", "0,500"], "--t"),
])
def test_bad_input_one_line(argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err


def test_bad_checkpoints(tmp_path: Path, image_dir: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = write_config(tmp_path / "cfg.json", tiny_config(image_dir, max_steps=2))
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(run), "--no-progress"]) == 0
    ck = run / "checkpoints" / "step-00000002"
    capsys.readouterr()
    # a truncated weights file is caught by its checksum
    w = ck / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    assert main(["sample", str(ck), "--n", "1"]) == 2
    assert "damaged" in capsys.readouterr().err
    w.write_bytes(data)
    # a config that does not match the weights
    c = json.loads((ck / "config.json").read_text())
    c["model"]["dim"] = 16
    (ck / "config.json").write_text(json.dumps(c))
    assert main(["sample", str(ck), "--n", "1"]) == 2
    assert "damaged" in capsys.readouterr().err  # the config's checksum no longer matches
    # a file that is not a checkpoint at all
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "meta.json").write_text("not json")
    assert main(["sample", str(junk)]) == 2
    assert "meta.json" in capsys.readouterr().err
    # an existing run is never overwritten
    assert main(["train", "--config", str(cfg), "--out", str(run), "--no-progress"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_eval_samples_against_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`ddpm eval --samples` with the shipped feature net, offline, against a reference folder."""
    rng = np.random.default_rng(0)
    ref = tmp_path / "ref"
    ref.mkdir()
    for i in range(40):
        a = np.zeros((28, 28), np.uint8)
        a[4:24, 6 + i % 5: 20 + i % 5] = 180 + i
        Image.fromarray(a).save(ref / f"r{i}.png")
    fake = rng.integers(0, 256, (40, 1, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", images=fake)
    assert main(["eval", "--samples", str(tmp_path / "samples.npz"), "--reference", str(ref)]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["n_samples"] == 40 and report["n_reference"] == 40 and report["fd"] > 0
    assert report["fd_reference"] is None and report["source"].endswith("samples.npz")
    capsys.readouterr()
    np.savez(tmp_path / "bad.npz", images=fake.astype(np.float32))
    assert main(["eval", "--samples", str(tmp_path / "bad.npz"), "--reference", str(ref)]) == 2
    assert "uint8" in capsys.readouterr().err
    assert main(["eval"]) == 2
    assert "exactly one" in capsys.readouterr().err


# The hand-written flag table the command had before its flags came from the config dataclasses:
# each of these must still parse to the same field.
OLD_TRAIN_FLAGS: dict[str, tuple[str, str, list[str], object]] = {  # flag -> (section, field, argv, value)
    "dim": ("model", "dim", ["40"], 40), "dim-mults": ("model", "dim_mults", ["1,2"], (1, 2)),
    "use-convnext": ("model", "use_convnext", [], True), "no-use-convnext": ("model", "use_convnext", [], False),
    "learn-sigma": ("model", "learn_sigma", [], True), "grad-checkpoint": ("model", "grad_checkpoint", [], True),
    "timesteps": ("diffusion", "timesteps", ["300"], 300), "schedule": ("diffusion", "schedule", ["cosine"], "cosine"),
    "loss": ("diffusion", "loss", ["l1"], "l1"), "objective": ("diffusion", "objective", ["v"], "v"),
    "loss-weighting": ("diffusion", "loss_weighting", ["min_snr"], "min_snr"),
    "min-snr-gamma": ("diffusion", "min_snr_gamma", ["3.5"], 3.5),
    "offset-noise": ("diffusion", "offset_noise", ["0.1"], 0.1),
    "vlb-weight": ("diffusion", "vlb_weight", ["0.01"], 0.01),
    "dataset": ("data", "source", ["some/folder"], "some/folder"),
    "image-size": ("data", "image_size", ["32"], 32), "data": ("data", "data_dir", ["idx"], "idx"),
    "batch-size": ("train", "batch_size", ["16"], 16), "lr": ("train", "lr", ["3e-4"], 3e-4),
    "lr-schedule": ("train", "lr_schedule", ["cosine"], "cosine"),
    "warmup-steps": ("train", "warmup_steps", ["7"], 7), "epochs": ("train", "epochs", ["2.5"], 2.5),
    "max-steps": ("train", "max_steps", ["11"], 11), "minutes": ("train", "minutes", ["1.5"], 1.5),
    "ema-decay": ("train", "ema_decay", ["0.9"], 0.9), "max-grad-norm": ("train", "max_grad_norm", ["1"], 1.0),
    "sample-every": ("train", "sample_every", ["9"], 9), "checkpoint-every": ("train", "checkpoint_every", ["13"], 13),
    "keep": ("train", "keep", ["3"], 3), "log-every": ("train", "log_every", ["5"], 5),
    "seed": ("train", "seed", ["42"], 42), "compile": ("train", "compile", [], True),
    "no-channels-last": ("train", "channels_last", [], False), "precision": ("train", "precision", ["bf16"], "bf16"),
    "no-tf32": ("train", "tf32", [], False),
}
BUDGET = ("epochs", "max_steps", "minutes")


def _parse_train(*flags: str, preset: str = "seed") -> RunConfig:
    from ddpm.cli import build_config, build_parser

    args = build_parser().parse_args(["train", "--preset", preset, *flags])
    args.run_dir = None
    return build_config(args)


def _with(cfg: RunConfig, section: str, **changes: object) -> RunConfig:
    from dataclasses import replace

    if any(k in BUDGET for k in changes):  # a budget flag replaces the preset's whole budget
        changes = {**{b: None for b in BUDGET}, **changes}
    return replace(cfg, **{section: replace(getattr(cfg, section), **changes)})


@pytest.mark.parametrize("flag", OLD_TRAIN_FLAGS)
def test_old_train_flags_parse_to_the_same_field(flag: str) -> None:
    from ddpm.config import preset

    section, name, argv, value = OLD_TRAIN_FLAGS[flag]
    got = _parse_train(f"--{flag}", *argv)
    assert got == _with(preset("seed"), section, **{name: value})
    assert type(getattr(getattr(got, section), name)) is type(value)


def test_channels_sets_data_and_model() -> None:
    cfg = _parse_train("--channels", "3")
    assert cfg.data.channels == 3 and cfg.model.channels == 3
    cfg = _parse_train("--channels", "3", "--model-channels", "1")  # a field's own flag wins
    assert cfg.data.channels == 3 and cfg.model.channels == 1


def _other_value(tp: object, default: object) -> tuple[list[str], object]:
    """Flag arguments that set a field of type ``tp`` to something other than ``default``."""
    import types
    import typing

    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if default is not None:
            return ["none"], None
        return _other_value([a for a in typing.get_args(tp) if a is not type(None)][0], None)
    if origin is typing.Literal:
        v = next(c for c in typing.get_args(tp) if c != default)
        return [v], v
    if origin is tuple:
        v = {int: (3, 5), float: (0.25, 0.5)}.get(typing.get_args(tp)[0], ("a", "b"))
        return [",".join(map(str, v))], v
    if tp is bool:
        return [], not default
    return {int: (["7"], 7), float: (["0.25"], 0.25), str: (["elsewhere"], "elsewhere")}[tp]


# a preset of each network: the base the model section's flags are tried on
NETWORK_PRESETS = {"unet": "seed", "dit": "dit", "diffusers-unet": "diffusers-unet"}


def test_every_config_field_has_a_flag_with_help() -> None:
    """One flag per field of the four run sections (the model: of each network's config, on a
    preset of that network): it sets exactly that field, typed. ``arch`` picks the network."""
    import dataclasses
    import typing

    from ddpm.config import preset
    from ddpm.flags import SECTIONS, flag_names, members

    names = flag_names()
    for section, tp in SECTIONS.items():
        for cls in members(tp):
            hints = typing.get_type_hints(cls)
            name = NETWORK_PRESETS[cls.arch] if section == "model" else "seed"
            base = preset(name)
            for f in dataclasses.fields(cls):
                assert f.metadata.get("help"), f"{section}.{f.name} has no help"
                if f.name == "arch":
                    continue
                default = getattr(getattr(base, section), f.name)
                argv, value = _other_value(hints[f.name], default)
                flag = names[f"{section}.{f.name}"]
                if hints[f.name] is bool:
                    flag = flag if value else "no-" + flag
                got = _parse_train(f"--{flag}", *argv, preset=name)
                assert got == _with(base, section, **{f.name: value}), flag
    assert set(SECTIONS) == {f.name for f in dataclasses.fields(RunConfig)} - {"preset"}


def test_bad_flag_values_are_one_line(capsys: pytest.CaptureFixture) -> None:
    """A Literal field's flag shows its names, and a wrong name is the config's one-line error."""
    from ddpm.cli import build_parser

    assert "{linear,cosine,quadratic,sigmoid}" in build_parser()._subparsers._group_actions[0].choices[
        "train"].format_help()
    assert main(["train", "--preset", "seed", "--objective", "q", "--max-steps", "1"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: unknown objective 'q'; choose one of: eps, x0, v")


# ---------------------------------------------------------------- the process: no surprises

def _python(code: str, **env: str) -> str:
    """Run ``code`` in a fresh interpreter with OMP_WAIT_POLICY and DDPM_* unset, plus ``env``."""
    import os
    import subprocess
    import sys

    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "DDPM_OMP_WAIT_POLICY")}
    r = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_import_ddpm_changes_nothing() -> None:
    """`import ddpm` (and the command's module) load no torch and set no variable; the public names work."""
    out = _python("import os, sys, ddpm, ddpm.cli; print('torch' in sys.modules, os.environ.get('OMP_WAIT_POLICY')); "
                  "from ddpm import SampleConfig, load_model, UNet; print(os.environ.get('OMP_WAIT_POLICY'))")
    assert out.splitlines() == ["False None", "None"]


@pytest.mark.parametrize("env, want", [
    ({}, "PASSIVE ddpm"),  # the command's default, set before torch loads
    ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE user"),  # the user's own setting wins
    ({"DDPM_OMP_WAIT_POLICY": "off"}, "None nobody"),  # ours turned off: libgomp's default
])
def test_command_sets_the_wait_policy_before_torch(env: dict[str, str], want: str, tmp_path: Path) -> None:
    code = ("import os, sys\nfrom ddpm.cli import main\n"
            f"assert main(['schedules', '--timesteps', '10', '--out', {str(tmp_path / 's.png')!r}]) == 0\n"
            "from ddpm.runtime.env import process_settings\ns = process_settings()\n"
            "print(s['omp_wait_policy'], s['omp_wait_policy_set_by'].split()[0])")
    assert _python(code, **env).splitlines()[-1] == want


_REUSE = ("import ctypes, resource\n"  # glibc's malloc itself: what the setting changes, without a framework's own sizes
          "libc = ctypes.CDLL(None)\n"
          "libc.malloc.restype = ctypes.c_void_p\n"
          "libc.free.argtypes = [ctypes.c_void_p]\n"
          "def faults(k):\n"
          "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
          "    for _ in range(k):\n"
          "        p = libc.malloc(64 << 20)  # 64 MiB, over glibc's largest default mmap threshold\n"
          "        ctypes.memset(p, 1, 64 << 20)\n"
          "        libc.free(p)\n"
          "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before\n"
          "faults(2)\n"
          "print(faults(5))")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
@pytest.mark.parametrize("env, kept", [({}, True), ({"DDPM_MALLOC": "off"}, False),
                                       ({"MALLOC_ARENA_MAX": "4"}, False)])
def test_command_keeps_freed_memory(env: dict[str, str], kept: bool, tmp_path: Path) -> None:
    """The command's process reuses a freed 64 MiB block (no page faults) instead of mapping it
    afresh (16,384 faults of 4 KiB each time, 81,920 in 5); the opt-out and a user's own
    MALLOC_* leave glibc alone."""
    code = ("from ddpm.cli import main\n"
            f"assert main(['schedules', '--timesteps', '10', '--out', {str(tmp_path / 's.png')!r}]) == 0\n" + _REUSE)
    n = int(_python(code, **env).splitlines()[-1])
    assert (n < 2000) if kept else (n > 5 * 16000), n


def test_library_import_leaves_the_allocator_alone() -> None:
    n = int(_python("import ddpm\nfrom ddpm import load_model, SampleConfig\n" + _REUSE).splitlines()[-1])
    assert n > 5 * 16000, n


def test_load_model_leaves_cuda_settings_alone(tmp_path: Path, image_dir: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A library caller's process keeps its TF32 / cuDNN settings after load_model and train
    (checked as if CUDA were there)."""
    import torch

    from ddpm.sampling import load_model

    cfg = write_config(tmp_path / "cfg.json", tiny_config(image_dir, max_steps=1))
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    flags = lambda: (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,  # noqa: E731
                     torch.backends.cudnn.benchmark)
    def set_flags(tf32: bool, cudnn_tf32: bool, benchmark: bool) -> None:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32, cudnn_tf32
        torch.backends.cudnn.benchmark = benchmark

    before = flags()
    try:
        set_flags(False, False, False)
        with monkeypatch.context() as m:
            m.setattr(torch.cuda, "is_available", lambda: True)
            load_model(tmp_path / "run", device=torch.device("cpu"))
        assert flags() == (False, False, False)
        # train.tf32 holds during the call, not after it (switched as on CUDA, on any build)
        import ddpm.training.run as R
        import ddpm.training.train as T

        monkeypatch.setattr(R, "fast_cuda_math", lambda on: set_flags(on, on, True))
        T.train(tiny_config(image_dir, max_steps=1), tmp_path / "run2", device="cpu", progress=False,
                tensorboard=False, log=lambda _: None)
        assert flags() == (False, False, False)
    finally:
        set_flags(*before)


@pytest.mark.slow
@pytest.mark.parametrize("flag, labelled", [([], True), (["--uncond"], False)])
def test_demo_end_to_end(flag: list[str], labelled: bool, tmp_path: Path) -> None:
    """`ddpm demo` on tiny made-up Fashion-MNIST files: by default the conditional preset, one grid
    row per class (8 images of each of the 10 classes); --uncond: 64 unlabelled images."""
    from helpers import fake_fashion

    from ddpm.cli import main

    fake_fashion(tmp_path / "fm", n_train=40, n_test=4)
    out = tmp_path / "demo"
    assert main(["demo", "--minutes", "0.01", "--out", str(out), "--device", "cpu", "--data", str(tmp_path / "fm"),
                 *flag]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["num_classes"] == (10 if labelled else 0)
    with np.load(out / "samples" / "samples.npz") as z:
        if labelled:
            assert np.bincount(z["labels"], minlength=10).tolist() == [8] * 10
        else:
            assert "labels" not in z and len(z["images"]) == 64
    assert (out / "samples" / "grid.png").is_file() and (out / "samples" / "denoising.gif").is_file()


@pytest.mark.parametrize("cond", [False, True])
def test_demo_autoguides_only_with_a_kept_guide(cond: bool, tmp_path: Path) -> None:
    """The demo samples with its run's own guide when training kept one, and plainly (never an
    error) when the budget ended first, as in the end-to-end test above."""
    from ddpm.config import preset
    from ddpm.demo import DEMO_COND_SAMPLER, DEMO_SAMPLER, demo_sampler
    from ddpm.sampling.generate import LoadedModel

    run = tmp_path / "run"
    (run / "checkpoints" / "step-00000001").mkdir(parents=True)  # a run folder holds its checkpoints
    model = LoadedModel(None, None, preset("fast-cond" if cond else "fast"), 1, run / "checkpoints" / "step-00000001")
    want = (DEMO_COND_SAMPLER if cond else DEMO_SAMPLER).autoguidance
    assert demo_sampler(model, cond).autoguidance == 0.0
    (run / "guide").mkdir(parents=True)
    (run / "guide" / "meta.json").write_text("{}")
    assert demo_sampler(model, cond).autoguidance == want
    assert demo_sampler(model, cond=False).autoguidance > 0  # the unconditional demo is autoguided
