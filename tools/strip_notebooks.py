"""Strip Jupyter notebooks for git: no outputs, no execution counts, no widget state, no
per-run metadata (the kernel's language_info, cell timings). In place; ``--check`` changes
nothing and exits 1 naming each notebook that is not stripped.

    python tools/strip_notebooks.py                  # every notebook under docs/notebooks
    python tools/strip_notebooks.py --check [PATH ...]
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "docs" / "notebooks"
KEEP_NOTEBOOK_METADATA = ("kernelspec",)  # what a notebook needs to open on the right kernel
DROP_CELL_METADATA = ("execution", "collapsed", "scrolled", "ExecuteTime", "widgets")


def stripped(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """A copy of ``nb`` without outputs, execution counts and run-dependent metadata."""
    nb = copy.deepcopy(nb)
    nb.metadata = nbformat.NotebookNode({k: v for k, v in nb.metadata.items() if k in KEEP_NOTEBOOK_METADATA})
    for cell in nb.cells:
        for key in DROP_CELL_METADATA:
            cell.metadata.pop(key, None)
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    return nb


def text_of(nb: nbformat.NotebookNode) -> str:
    """The file's text as nbformat writes it (ending in a newline, as ``nbformat.write`` does)."""
    text = nbformat.writes(nb)
    return text if text.endswith("\n") else text + "\n"


def notebooks(paths: list[Path]) -> list[Path]:
    """The .ipynb files named, or found under the folders named (checkpoints folders aside)."""
    found: list[Path] = []
    for p in paths:
        if p.is_dir():
            found += sorted(q for q in p.rglob("*.ipynb") if ".ipynb_checkpoints" not in q.parts)
        else:
            found.append(p)
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="strip the outputs of Jupyter notebooks, in place")
    ap.add_argument("paths", nargs="*", type=Path, help=f"notebooks or folders (default: {DEFAULT.relative_to(ROOT)})")
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 naming notebooks not stripped")
    args = ap.parse_args(argv)
    unstripped = []
    for path in notebooks(args.paths or [DEFAULT]):
        try:
            old = path.read_text(encoding="utf-8")
            new = text_of(stripped(nbformat.reads(old, as_version=4)))
        except (OSError, ValueError) as e:  # nbformat's NotJSONError is a ValueError
            print(f"error: cannot read notebook {path}: {e}", file=sys.stderr)
            return 2
        if new == old:
            continue
        unstripped.append(path)
        if not args.check:
            path.write_text(new, encoding="utf-8")
            print(f"stripped {path}")
    if args.check and unstripped:
        for path in unstripped:
            print(f"not stripped: {path} (run python tools/strip_notebooks.py)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
