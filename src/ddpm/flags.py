"""Command-line flags made from the config dataclasses: one flag per field.

Each field's type gives the flag's type and choices (a ``Literal``'s names are shown, ``bool`` gives
``--x/--no-x``, ``tuple[int, ...]`` a comma list, ``X | None`` also takes ``none``) and the
field's ``metadata["help"]`` gives its help. A field name that two sections share gets the
section in its flag (``--model-channels``, ``--data-channels``). ``ALIASES`` keeps the older,
shorter flags (``--dataset``, ``--data``, ``--channels``) working.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Callable, Literal, get_args, get_origin

from .config import DataConfig, DiffusionConfig, ModelConfig, TrainConfig

SECTIONS: dict[str, type] = {"model": ModelConfig, "diffusion": DiffusionConfig, "data": DataConfig,
                             "train": TrainConfig}
TITLES = {"model": "model", "diffusion": "diffusion", "data": "data", "train": "training"}
# flag -> (fields it sets, help); each field is "section.name"
ALIASES: dict[str, tuple[tuple[str, ...], str]] = {
    "dataset": (("data.source",), "same as --source"),
    "data": (("data.data_dir",), "same as --data-dir"),
    "channels": (("data.channels", "model.channels"), "image channels of the data and the network"),
}
ALIAS_PREFIX = "alias:"
METAVARS = {int: "INT", float: "FLOAT", str: "TEXT"}


def flag_names() -> dict[str, str]:
    """``"section.field"`` -> its flag (without the leading dashes), for every config field."""
    count: dict[str, int] = {}
    for cls in SECTIONS.values():
        for f in dataclasses.fields(cls):
            count[f.name] = count.get(f.name, 0) + 1
    return {f"{sec}.{f.name}": (f"{sec}-{f.name}" if count[f.name] > 1 else f.name).replace("_", "-")
            for sec, cls in SECTIONS.items() for f in dataclasses.fields(cls)}


def _csv(elem: Callable[[str], Any]) -> Callable[[str], tuple[Any, ...]]:
    def parse(s: str) -> tuple[Any, ...]:
        try:
            return tuple(elem(v.strip()) for v in s.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {s!r}") from None
    parse.__name__ = f"comma-separated {elem.__name__}"
    return parse


def _or_none(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse_or_none(s: str) -> Any:
        return None if s.lower() == "none" else parse(s)
    parse_or_none.__name__ = parse.__name__  # argparse's "invalid int value" message
    return parse_or_none


def argument_options(tp: Any) -> dict[str, Any]:
    """``add_argument`` keywords for a field annotated ``tp``."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in get_args(tp) if a is not type(None)][0]
        opts = argument_options(inner)
        if "type" in opts:
            opts["type"], opts["metavar"] = _or_none(opts["type"]), opts["metavar"] + "|none"
        return opts
    if origin is Literal:  # the names shown; the check is the config's, one line (config.override)
        return {"metavar": "{" + ",".join(map(str, get_args(tp))) + "}"}
    if origin is tuple:
        elem = get_args(tp)[0]
        return {"type": _csv(elem), "metavar": f"{METAVARS[elem]},..."}
    if tp is bool:
        return {"action": argparse.BooleanOptionalAction}
    return {"type": tp, "metavar": METAVARS[tp]}


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per field of the four run sections, grouped by section, plus the aliases."""
    names = flag_names()
    for sec, cls in SECTIONS.items():
        g = p.add_argument_group(TITLES[sec])
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = f"{sec}.{f.name}"
            g.add_argument(f"--{names[key]}", dest=key, default=argparse.SUPPRESS,
                           help=f.metadata.get("help"), **argument_options(hints[f.name]))
    g = p.add_argument_group("short names")
    for flag, (targets, help) in ALIASES.items():
        sec, name = targets[0].split(".")
        opts = argument_options(typing.get_type_hints(SECTIONS[sec])[name])
        g.add_argument(f"--{flag}", dest=ALIAS_PREFIX + flag, default=argparse.SUPPRESS, help=help, **opts)


def config_changes(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The fields the flags set, by section: ``{"model": {"dim": 64}, ...}`` (aliases first,
    so that a field's own flag wins over a short name)."""
    given = vars(args)
    out: dict[str, dict[str, Any]] = {}
    for flag, (targets, _) in ALIASES.items():
        if ALIAS_PREFIX + flag in given:
            for key in targets:
                sec, name = key.split(".")
                out.setdefault(sec, {})[name] = given[ALIAS_PREFIX + flag]
    for key in flag_names():
        if key in given:
            sec, name = key.split(".")
            out.setdefault(sec, {})[name] = given[key]
    return out


def names_help(names: Any) -> str:
    """A closed set of names (a table's keys) as the command's help shows it: ``a | b | c``."""
    return " | ".join(map(str, names))
