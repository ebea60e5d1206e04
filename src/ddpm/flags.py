"""Command-line flags made from the config dataclasses: one flag per field.

Each field's type gives the flag's type and choices (a ``Literal``'s names are shown, ``bool`` gives
``--x/--no-x``, ``tuple[int, ...]`` a comma list, ``X | None`` also takes ``none``) and the
field's ``metadata["help"]`` gives its help. A field name that two sections share gets the
section in its flag (``--model-channels``, ``--data-channels``). ``ALIASES`` keeps the older,
shorter flags (``--dataset``, ``--data``, ``--channels``) working.

The model section is a union of configs, one per network (``--arch``): a field the networks
share (``--learn-sigma``) is one flag, and a network's own fields (``--dim``, ``--depth``) are
flags that ``config.override`` refuses, in one line, for a run of another network.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Callable, Literal, get_args, get_origin

from .config import AnyModelConfig, DataConfig, DiffusionConfig, TrainConfig

# section -> its config class, or a union of them (the model: one config per network)
SECTIONS: dict[str, Any] = {"model": AnyModelConfig, "diffusion": DiffusionConfig, "data": DataConfig,
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


def members(section: Any) -> tuple[type, ...]:
    """A section's config classes: the members of a union, else the one class."""
    return get_args(section) if get_origin(section) in (typing.Union, types.UnionType) else (section,)


def section_fields(section: Any) -> dict[str, tuple[Any, str | None]]:
    """Field name -> (its type, its help) over every class of a section, in order, each name
    once; ``arch`` (a union's tag) typed as the choice of all its members' names."""
    out: dict[str, tuple[Any, str | None]] = {}
    for cls in members(section):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            out.setdefault(f.name, (hints[f.name], f.metadata.get("help")))
    if "arch" in out and len(members(section)) > 1:
        names = tuple(c.arch for c in members(section))  # each member's default: its one name
        out["arch"] = (Literal[names], out["arch"][1])  # type: ignore[valid-type]
    return out


def flag_names() -> dict[str, str]:
    """``"section.field"`` -> its flag (without the leading dashes), for every config field."""
    count: dict[str, int] = {}
    for section in SECTIONS.values():
        for name in section_fields(section):
            count[name] = count.get(name, 0) + 1
    return {f"{sec}.{name}": (f"{sec}-{name}" if count[name] > 1 else name).replace("_", "-")
            for sec, section in SECTIONS.items() for name in section_fields(section)}


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


def _groups(sec: str) -> dict[str, list[str]]:
    """A section's help groups -> their fields: a union's shared fields under the section's
    title, then each member's own under "title (--arch NAME)"."""
    classes = members(SECTIONS[sec])
    names = list(section_fields(SECTIONS[sec]))
    if len(classes) == 1:
        return {TITLES[sec]: names}
    own = [{f.name for f in dataclasses.fields(c)} for c in classes]
    groups = {TITLES[sec]: [n for n in names if all(n in o for o in own)]}
    for cls, o in zip(classes, own):
        groups[f"{TITLES[sec]} (--arch {cls.arch})"] = [n for n in names if n in o and n not in groups[TITLES[sec]]]
    return groups


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per field of the four run sections, grouped by section (the model: by network),
    plus the aliases."""
    names = flag_names()
    for sec, section in SECTIONS.items():
        fields = section_fields(section)
        for title, group in _groups(sec).items():
            g = p.add_argument_group(title)
            for name in group:
                tp, help = fields[name]
                g.add_argument(f"--{names[f'{sec}.{name}']}", dest=f"{sec}.{name}", default=argparse.SUPPRESS,
                               help=help, **argument_options(tp))
    g = p.add_argument_group("short names")
    for flag, (targets, help) in ALIASES.items():
        sec, name = targets[0].split(".")
        opts = argument_options(section_fields(SECTIONS[sec])[name][0])
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
