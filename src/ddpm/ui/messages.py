"""The library's one-line errors in the page's words: its field labels for the command's flags,
and no path of the server's disk.

The library speaks to the command line (``--guidance needs --class``); the page has a form whose
fields carry other names. One table maps each flag the sampling and editing checks name to the
label the page shows; a hint that names any other flag (how to train, say) is a command's hint
and is left out.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

# flag -> the label of the page's field (index.html), or words for what the page sets itself
FIELD_LABELS = {
    "--sampler": "Sampler", "--steps": "Steps", "--seed": "Seed", "--n": "Images",
    "--precision": "Precision", "--class": "Class", "--guidance": "Guidance",
    "--autoguidance": "Autoguidance", "--guidance-interval": "the guidance interval",
    "--autoguidance-interval": "the autoguidance interval", "--eta": "the sampler's eta",
    "--spacing": "the step spacing", "--variance": "the sampler's variance",
    "--strength": "Strength", "--resample": "Resample r", "--jump-length": "Jump length j",
    "--batch-size": "the batch size",
}
_FLAG = re.compile(r"--[a-z][a-z0-9-]*")
_FLAG_HINT = re.compile(r"\s*\([^()]*--[a-z][^()]*\)")  # "(train one with --cond ...)"
_PATH = re.compile(r"""(['"]?)(/[^\s'":;,]+)\1""")  # an absolute path, quoted or not


def page_message(text: str, runs: Iterable[tuple[str, Path]] = ()) -> str:
    """``text`` with flags named by the page's labels and server paths replaced: a path inside a
    run by the run's name and the path within it, any other by its last part."""
    text = _FLAG.sub(lambda m: FIELD_LABELS.get(m.group(), m.group()), text)
    text = _FLAG_HINT.sub("", text)
    text = _FLAG.sub(lambda m: m.group()[2:].replace("-", " "), text)  # a flag no field has
    known = [(name, Path(p)) for name, p in runs]
    return _PATH.sub(lambda m: _shown_path(Path(m.group(2)), known), text)


def _shown_path(p: Path, runs: list[tuple[str, Path]]) -> str:
    for name, root in runs:
        if p.is_relative_to(root):
            return str(Path(name) / p.relative_to(root))
    return p.name  # a path the page never named: its last part only
