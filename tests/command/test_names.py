"""One table per closed set of names: the command's choices and help, the config checks and the
plots read it (no name list written twice)."""
from __future__ import annotations

import argparse
import typing

import pytest
import torch

from ddpm import config as C
from ddpm.cli import build_parser
from ddpm.core.schedules import SCHEDULES, SPACINGS, ScheduleSpec, make_betas, space_timesteps
from ddpm.errors import DdpmError
from ddpm.runtime.precision import PRECISIONS
from ddpm.samplers import SAMPLERS


def subcommand(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def action(parser: argparse.ArgumentParser, flag: str) -> argparse.Action:
    return next(a for a in parser._actions if flag in a.option_strings)


def literal(cls: type, field: str) -> tuple[str, ...]:
    tp = typing.get_type_hints(cls)[field]
    if typing.get_origin(tp) is not typing.Literal:  # X | None
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return typing.get_args(tp)


def test_config_names_are_the_tables() -> None:
    assert literal(C.DiffusionConfig, "schedule") == tuple(SCHEDULES)
    assert literal(C.SampleConfig, "spacing") == SPACINGS
    assert literal(C.SampleConfig, "clip") == C.CLIPS
    assert literal(C.SampleConfig, "variance") == C.VARIANCES
    assert literal(C.SampleConfig, "precision") == literal(C.TrainConfig, "precision") == PRECISIONS


def test_train_flags_show_the_tables() -> None:
    train = subcommand("train")
    assert action(train, "--schedule").metavar == "{" + ",".join(SCHEDULES) + "}"
    assert action(train, "--precision").metavar == "{" + ",".join(PRECISIONS) + "}"


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_sample_flags_show_the_tables(command: str) -> None:
    p = subcommand(command)
    sampler_help = action(p, "--sampler").help
    assert all(f"{name}: {spec.summary}" in sampler_help for name, spec in SAMPLERS.items())
    assert " | ".join(SPACINGS) in action(p, "--spacing").help
    assert " | ".join(C.CLIPS) in action(p, "--clip").help
    assert " | ".join(C.VARIANCES) in action(p, "--variance").help
    assert " | ".join(PRECISIONS) in action(p, "--precision").help


def test_other_subcommands_show_the_tables() -> None:
    assert " | ".join(SCHEDULES) in action(subcommand("noise"), "--schedule").help
    assert " | ".join(C.VARIANCES) in action(subcommand("eval"), "--nll-variance").help


def test_checks_name_the_table() -> None:
    with pytest.raises(DdpmError, match="unknown schedule 'zig'; choose one of: " + ", ".join(SCHEDULES)):
        make_betas("zig", 10)
    with pytest.raises(DdpmError, match="unknown diffusion.schedule 'zig'; choose one of: " + ", ".join(SCHEDULES)):
        C.RunConfig.from_dict({"diffusion": {"schedule": "zig"}})
    with pytest.raises(DdpmError, match="unknown clip 'zig'; choose one of: " + ", ".join(C.CLIPS)):
        C.check_sample_config(C.SampleConfig(clip="zig"))


def test_every_name_works() -> None:
    """Every name in each table is one the code behind it accepts."""
    from ddpm.core.diffusion import interpret, p_log_variance
    from ddpm.core.schedules import NoiseSchedule
    from ddpm.runtime.precision import autocast_dtype

    s = NoiseSchedule.create("linear", 10)
    x, t = torch.randn(2, 1, 4, 4), torch.tensor([3, 9])
    for name in SCHEDULES:
        assert make_betas(name, 10).shape == (10,)
    for spacing in SPACINGS:
        assert space_timesteps(10, 4, spacing)[-1] == 9
    for clip in C.CLIPS:
        x0 = interpret(s, x, x, t, objective="eps", learn_sigma=False, clip=clip).x0
        assert x0.shape == x.shape and (clip == "none" or x0.abs().max() <= 1 + 1e-6)
    for variance in C.VARIANCES:  # var_frac: a learn-sigma network's interpolation, for "learned"
        assert p_log_variance(s, t, 4, variance=variance, var_frac=torch.zeros_like(x)).shape[0] == 2
    for precision in PRECISIONS:
        if precision != "fp16":  # CUDA only, refused on a CPU with a one-line error
            autocast_dtype(precision, torch.device("cpu"))


def test_plot_schedules_draws_every_schedule(monkeypatch: pytest.MonkeyPatch) -> None:
    from ddpm.pictures.plots import schedule_panels

    def labels() -> list[str]:
        return [series.label.split(":")[0] for series in schedule_panels(50)[1].series]

    assert labels() == list(SCHEDULES)
    flat = ScheduleSpec(lambda T, b0, b1: torch.full((T,), 0.05, dtype=torch.float64), False, "constant beta")
    monkeypatch.setitem(SCHEDULES, "flat", flat)  # a schedule added to the table is drawn, with no other edit
    assert labels() == [*SCHEDULES] and "flat" in labels()


def test_data_sources_are_one_table_for_training_and_evaluation(monkeypatch: pytest.MonkeyPatch) -> None:
    """A source added to data.sources.SOURCES is at once training data, a class list, an
    evaluation reference (its splits) and a name in the command's help."""
    from ddpm.data import SOURCES, DataSource, class_names, load_dataset, load_labeled_dataset
    from ddpm.data.sources import reference_images
    from ddpm.evaluation.evaluate import default_floor, report_name

    def images(split: str, data_dir: object, download: bool) -> torch.Tensor:
        return torch.full((4 if split == "train" else 2, 1, 10, 10), 7 if split == "train" else 9, dtype=torch.uint8)

    def labels(split: str, data_dir: object, download: bool) -> torch.Tensor:
        return torch.arange(4 if split == "train" else 2) % 2

    monkeypatch.setitem(SOURCES, "toy", DataSource(images, labels, ("a", "b"), "a made-up source"))
    x = load_dataset("toy", size=5, channels=3)
    assert x.shape == (4, 3, 5, 5) and x.dtype == torch.uint8 and int(x.float().mean().round()) == 7
    lab = load_labeled_dataset("toy", size=10, channels=1, split="test")
    assert lab.labels.tolist() == [0, 1] and lab.class_names == ("a", "b") == class_names("toy")
    assert reference_images("toy-test", size=10, channels=1).shape == (2, 1, 10, 10)
    assert default_floor("toy-test") == "toy-train" and default_floor("some/folder") is None
    ref_help = action(subcommand("eval"), "--reference").help
    assert "toy-test" in ref_help and "fashion-mnist-test" in ref_help
    with pytest.raises(DdpmError, match="unknown reference 'toy-valid': use .*toy-test"):
        reference_images("toy-valid", size=10, channels=1)
    from types import SimpleNamespace

    from ddpm.evaluation.evaluate import real_images

    net = SimpleNamespace(config=SimpleNamespace(size=10, channels=1))  # the feature net's input size
    pool, real = real_images(3, net, reference="toy-test", seed=0)  # --real: the reference's training split
    assert pool == "toy-train" and real.shape == (3, 1, 10, 10) and bool((real == 7).all())
    assert report_name() == "eval.json" and report_name("ddim", 50, "bf16") == "eval-ddim-50-bf16.json"
    assert report_name("ddim", 50) == "eval-ddim-50.json"
