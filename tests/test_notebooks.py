"""The teaching notebooks (docs/notebooks) run top to bottom, at small sizes, and show their
pictures; the committed copies carry no outputs (tools/strip_notebooks.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402  (after the skips: nbclient brings it)
from jupyter_client.manager import KernelManager  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "docs" / "notebooks"
STRIP = ROOT / "tools" / "strip_notebooks.py"
KERNEL = "ddpm-notebook-tests"

# The sizes each notebook reads from its first code cell, small enough for a test run.
SMALL = {
    "DDPM_NOTEBOOK_STEPS": "2",
    "DDPM_NOTEBOOK_TRAIN_IMAGES": "64",
    "DDPM_NOTEBOOK_IMAGES": "2",
    "DDPM_NOTEBOOK_SAMPLE_STEPS": "2",
    "DDPM_NOTEBOOK_RESAMPLE": "2",
    "DDPM_NOTEBOOK_NFE": "2",
    "DDPM_NOTEBOOK_EVAL_IMAGES": "8",
}

# The pictures each notebook must show, at least this many of each kind.
PICTURES = {
    "01_annotated_diffusion.ipynb": {"image/png": 7, "image/gif": 1},
    "02_control.ipynb": {"image/png": 5},
    "03_ddpm_edm_flow.ipynb": {"image/png": 3},
}


def kernel_manager(folder: Path) -> KernelManager:
    """A kernel on this interpreter: a kernelspec of its own, since the name ``python3`` may
    resolve to another Python (a user's kernelspec, a system Jupyter)."""
    spec = folder / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"}))
    return KernelManager(kernel_name=KERNEL, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(folder)]))


def kernel_env(sizes: dict[str, str], tmp: Path) -> dict[str, str]:
    """The test's environment with this tree's src first on the kernel's path, the sizes, and
    ``tmp`` for the files a notebook writes (tempfile reads TMPDIR)."""
    path = [str(ROOT / "src"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), "TMPDIR": str(tmp), **sizes}


def execute(name: str, cwd: Path, sizes: dict[str, str] = SMALL, timeout: int = 600):
    """The notebook run top to bottom in ``cwd`` (nbclient raises on the first failing cell)."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    (cwd / ".tmp").mkdir()
    client = nbclient.NotebookClient(nb, km=kernel_manager(cwd / ".kernels"), timeout=timeout,
                                     resources={"metadata": {"path": str(cwd)}},
                                     extra_arguments=["--HistoryManager.hist_file=:memory:"])  # no ~/.ipython history
    client.execute(env=kernel_env(sizes, cwd / ".tmp"))
    return nb


def pictures(nb) -> dict[str, int]:
    """How many outputs of each picture type the notebook's cells produced."""
    counts: dict[str, int] = {}
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            for mime in out.get("data", {}):
                if mime.startswith("image/"):
                    counts[mime] = counts.get(mime, 0) + 1
    return counts


@pytest.mark.parametrize("name", sorted(PICTURES))
def test_notebook_runs_and_shows_its_pictures(name: str, tmp_path: Path) -> None:
    nb = execute(name, tmp_path)
    errors = [out for cell in nb.cells for out in cell.get("outputs", []) if out.get("output_type") == "error"]
    assert not errors, errors
    shown = pictures(nb)
    for mime, least in PICTURES[name].items():
        assert shown.get(mime, 0) >= least, f"{name}: {shown.get(mime, 0)} {mime} outputs, expected {least}"
    left = {p.name for p in tmp_path.iterdir()} - {".kernels", ".tmp"}
    assert not left, f"{name} wrote into its working folder: {sorted(left)}"


def test_every_notebook_is_tested() -> None:
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(PICTURES)


def test_committed_notebooks_are_stripped() -> None:
    run = subprocess.run([sys.executable, str(STRIP), "--check"], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_strip_check_names_an_unstripped_notebook(tmp_path: Path) -> None:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1 + 1", execution_count=1, outputs=[
        nbformat.v4.new_output("execute_result", {"text/plain": "2"}, execution_count=1)])])
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {}}
    path = tmp_path / "ran.ipynb"
    nbformat.write(nb, path)
    check = subprocess.run([sys.executable, str(STRIP), "--check", str(tmp_path)], capture_output=True, text=True)
    assert check.returncode == 1 and "ran.ipynb" in check.stdout + check.stderr
    assert subprocess.run([sys.executable, str(STRIP), str(path)]).returncode == 0
    cell = nbformat.read(path, as_version=4).cells[0]
    assert cell.outputs == [] and cell.execution_count is None
    assert "widgets" not in nbformat.read(path, as_version=4).metadata
    again = subprocess.run([sys.executable, str(STRIP), "--check", str(path)], capture_output=True, text=True)
    assert again.returncode == 0, again.stdout + again.stderr
