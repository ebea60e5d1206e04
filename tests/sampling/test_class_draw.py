"""A conditional model asked for no class draws each image's label in its training set's class
proportions, from that image's own generator; `--class none` is the null class."""
from __future__ import annotations

import dataclasses
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm.cli import main
from ddpm.config import SampleConfig
from ddpm.sampling.generate import generate, load_model
from ddpm.sampling.guidance import class_proportions, drawn_labels, request_labels
from helpers import make_images, tiny_config


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A conditional tiny run on unbalanced classes: 12, 6 and 6 images."""
    from ddpm.training.train import train

    root = tmp_path_factory.mktemp("draw")
    for name, n in (("a", 12), ("b", 6), ("c", 6)):
        make_images((root / "data" / name).mkdir(parents=True) or root / "data" / name, n=n)
    cfg = tiny_config(root / "data", max_steps=2)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=3))
    train(cfg, root / "run", device="cpu", progress=False, tensorboard=False, log=lambda s: None)
    return root / "run"


def test_the_draw_follows_the_proportions() -> None:
    probs = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    n = 20_000
    counts = torch.bincount(drawn_labels(seed=7, start=0, count=n, probs=probs), minlength=3).double()
    expected = n * probs
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 13.8  # 2 degrees of freedom: p = 0.001
    assert drawn_labels(7, 0, 50, torch.tensor([0.0, 1.0, 0.0])).eq(1).all()  # a class of none is never drawn


def test_image_i_has_the_same_label_whatever_else_is_drawn() -> None:
    probs = torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64)
    whole = drawn_labels(3, 0, 40, probs)
    assert torch.equal(torch.cat([drawn_labels(3, 0, 17, probs), drawn_labels(3, 17, 23, probs)]), whole)
    assert not torch.equal(drawn_labels(4, 0, 40, probs), whole)  # another seed, other labels


def test_a_new_run_stores_its_class_counts(run: Path) -> None:
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["data"]["class_counts"] == [12, 6, 6]
    props = class_proportions(load_model(run).config)
    assert props.probs.tolist() == [0.5, 0.25, 0.25] and props.source == "the run's training set"


def test_an_older_run_counts_its_data_or_draws_uniformly(run: Path, tmp_path: Path) -> None:
    config = load_model(run).config
    old = dataclasses.replace(config, data=dataclasses.replace(config.data, class_counts=()))
    props = class_proportions(old)
    assert props.probs.tolist() == [0.5, 0.25, 0.25] and "counted now" in props.source
    gone = dataclasses.replace(old, data=dataclasses.replace(old.data, source=str(tmp_path / "nowhere")))
    props = class_proportions(gone)
    assert props.probs.tolist() == pytest.approx([1 / 3] * 3) and props.source.startswith("uniform")
    said: list[str] = []
    labels, classes = request_labels(SampleConfig(n=4), gone, 4, say=said.append)
    assert classes is None and labels is not None and len(said) == 1 and "uniform" in said[0]


def test_the_default_draw_is_the_same_at_any_batch_size(run: Path) -> None:
    model = load_model(run)
    a = generate(model, SampleConfig(sampler="ddim", steps=3, n=6, batch_size=6, seed=5))
    b = generate(model, SampleConfig(sampler="ddim", steps=3, n=6, batch_size=4, seed=5))
    assert a.labels is not None and torch.equal(a.labels, b.labels) and torch.equal(a.images, b.images)
    assert a.per_class is None  # a plain grid, not rows of classes


def test_the_null_class_is_still_reachable(run: Path) -> None:
    model = load_model(run)
    null = generate(model, SampleConfig(sampler="ddim", steps=3, n=4, seed=1, classes="none"))
    assert null.labels is None
    drawn = generate(model, SampleConfig(sampler="ddim", steps=3, n=4, seed=1))
    assert not torch.equal(null.images, drawn.images)
    # the null class is what the network sees with no label at all
    x = torch.randn(2, 1, 8, 8)
    t = torch.tensor([3, 7])
    with torch.no_grad():
        assert torch.equal(model.net(x, t), model.net(x, t, torch.full((2,), 3)))


def test_guidance_applies_to_drawn_labels(run: Path) -> None:
    model = load_model(run)
    plain = generate(model, SampleConfig(sampler="ddim", steps=3, n=4, seed=2))
    guided = generate(model, SampleConfig(sampler="ddim", steps=3, n=4, seed=2, guidance=2.0))
    assert torch.equal(plain.labels, guided.labels) and guided.nfe == 2 * plain.nfe
    assert not torch.equal(plain.images, guided.images)


def test_the_command_draws_labels_by_default(run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "s"
    assert main(["sample", str(run), "--n", "8", "--sampler", "ddim", "--steps", "2", "--out", str(out),
                 "--no-progress"]) == 0
    labels = np.load(out / "samples.npz")["labels"]
    assert labels.shape == (8,) and set(labels.tolist()) <= {0, 1, 2}
    assert main(["sample", str(run), "--n", "8", "--sampler", "ddim", "--steps", "2", "--class", "none",
                 "--out", str(tmp_path / "n"), "--no-progress"]) == 0
    assert "labels" not in np.load(tmp_path / "n" / "samples.npz")
    assert main(["sample", str(run), "--class", "None", "--guidance", "1", "--out", str(tmp_path / "x")]) == 2


def test_the_web_pages_default_request_draws_labels(run: Path) -> None:
    from starlette.testclient import TestClient

    from ddpm.ui.app import create_app
    from ddpm.ui.runs import RunIndex

    c = TestClient(create_app(RunIndex([str(run)], None)), base_url="http://127.0.0.1:8000",
                   headers={"X-DDPM-Token": ""})
    job = c.post("/api/sample", json={"run": "run", "sampler": "ddim", "steps": 2, "n": 5, "stream": False})
    assert job.status_code == 201, job.text
    with c.stream("GET", f"/api/jobs/{job.json()['id']}/events") as r:
        list(r.iter_lines())
    npz = c.get(f"/api/jobs/{job.json()['id']}/files/samples.npz")
    assert npz.status_code == 200
    with zipfile.ZipFile(io.BytesIO(npz.content)) as z:
        assert "labels.npy" in z.namelist()


def test_reports_of_the_null_class_and_of_a_guided_draw_are_named_apart() -> None:
    from ddpm.evaluation.evaluate import report_name

    names = {report_name("dpm++2m", 20, labels=labels) for labels in (None, "drawn", "null", "drawn-cfg2")}
    assert names == {"eval-dpm++2m-20.json", "eval-dpm++2m-20-null.json", "eval-dpm++2m-20-cfg2.json"}


def test_a_sweep_needs_named_classes(run: Path, capsys) -> None:
    assert main(["eval", str(run), "--class", "none", "--guidance", "0,1", "--n", "4"]) == 2
    assert "--guidance takes one value here" in capsys.readouterr().err  # a plain eval, not a sweep


def test_an_edit_keeps_the_null_class_unless_a_class_is_named(run: Path) -> None:
    from ddpm.errors import DdpmError
    from ddpm.sampling.editing import edit

    model = load_model(run)
    image = torch.full((1, 8, 8), 128, dtype=torch.uint8)
    plain = edit(model, image, 0.5, SampleConfig(sampler="ddim", steps=4, n=2))
    assert plain.labels is None
    named = edit(model, image, 0.5, SampleConfig(sampler="ddim", steps=4, n=2, classes="b", guidance=1.0))
    assert named.labels.tolist() == [1, 1]
    with pytest.raises(DdpmError, match="needs --class"):
        edit(model, image, 0.5, SampleConfig(sampler="ddim", steps=4, n=2, guidance=1.0))


@pytest.mark.parametrize("command", ["sample", "eval", "inpaint", "edit"])
def test_the_help_says_the_default_draw_and_the_null_class(command: str) -> None:
    import argparse

    from ddpm.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    flag = next(a for a in sub.choices[command]._actions if "--class" in a.option_strings)
    assert "'none'" in flag.help and "null class" in flag.help
    assert "drawn in the training set's proportions" in flag.help
