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
