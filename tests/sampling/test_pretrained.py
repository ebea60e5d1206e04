"""The model that ships in the package: it loads by name, samples from the command line into
the current folder (never into the package), fits the size budget, and yields to a real path."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ddpm.cli import main
from ddpm.data.readers import FASHION_MNIST_CLASSES
from ddpm.sampling import load_model
from ddpm.sampling.pretrained import ASSETS, pretrained_path, resolve_run
from ddpm.ui.runs import RunIndex

SHIPPED = ASSETS / "fashion-mnist"


def _tree(p: Path) -> dict[str, int]:
    return {str(f.relative_to(p)): f.stat().st_mtime_ns for f in p.rglob("*")}


def test_shipped_model_is_whole_and_small() -> None:
    assert pretrained_path("fashion-mnist") == SHIPPED
    files = [f for f in SHIPPED.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 5_000_000
    assert (SHIPPED / "config.json").is_file() and (SHIPPED / "log.jsonl").stat().st_size > 0
    model = load_model("fashion-mnist")
    assert model.config.model.num_classes == 10
    assert tuple(model.config.data.class_names) == FASHION_MNIST_CLASSES
    assert model.run_folder() == Path("runs") / "fashion-mnist"


def test_shipped_model_autoguides_with_its_own_small_guide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    """The package ships a guiding model (a smaller, earlier model of the same kind) in
    fashion-mnist/guide, so --autoguidance works by name, at one more pass per step."""
    import re

    model = load_model("fashion-mnist")
    assert model.has_guide()
    guide = model.guide()
    n_guide, n_model = (sum(p.numel() for p in m.parameters()) for m in (guide, model.net))
    assert n_guide < n_model / 2  # small, so the folder keeps to its 5 MB
    monkeypatch.chdir(tmp_path)
    base = ["sample", "fashion-mnist", "--class", "sneaker", "--n", "2", "--sampler", "ddim", "--steps", "2",
            "--device", "cpu", "--no-progress"]
    nfe = []
    for extra in ([], ["--autoguidance", "0.5"]):
        capsys.readouterr()
        assert main([*base, *extra]) == 0
        nfe.append(int(re.search(r"(\d+) network evaluations per image", capsys.readouterr().out).group(1)))
    assert nfe == [2, 4]


def test_sample_by_name_writes_beside_the_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    before = _tree(SHIPPED)
    assert main(["sample", "fashion-mnist", "--class", "sneaker,bag", "--n", "2", "--sampler", "ddim",
                 "--steps", "2", "--device", "cpu", "--no-progress"]) == 0
    out = tmp_path / "runs" / "fashion-mnist" / "samples"
    with np.load(out / "samples.npz") as z:
        assert z["images"].shape == (2, 1, 28, 28)  # --n shared by the classes asked for
    assert (out / "grid.png").is_file()
    assert _tree(SHIPPED) == before  # the installed package is never written


def test_a_real_path_wins_over_the_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fashion-mnist").mkdir()
    assert resolve_run("fashion-mnist") == Path("fashion-mnist")
    assert resolve_run("no-such-model") == Path("no-such-model")
    assert main(["sample", "fashion-mnist", "--n", "1", "--device", "cpu"]) == 2  # the empty folder: one error line


def test_ui_lists_the_shipped_model_when_there_is_nothing_else(tmp_path: Path) -> None:
    assert [r.path for r in RunIndex([], tmp_path / "none").runs()] == [SHIPPED.resolve()]
    assert [r.path for r in RunIndex(["fashion-mnist"], None).runs()] == [SHIPPED.resolve()]


def test_distill_takes_the_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ddpm.training.distill as distill_mod

    seen = []

    def fake_distill(d, out, **kw):  # the training itself is tested in test_distill.py
        seen.append(d)
        raise distill_mod.DdpmError("stopped here")

    monkeypatch.setattr(distill_mod, "distill", fake_distill)
    monkeypatch.chdir(tmp_path)
    assert main(["distill", "fashion-mnist", "--out", str(tmp_path / "s"), "--device", "cpu"]) == 2
    assert [Path(d.teacher) for d in seen] == [SHIPPED]
