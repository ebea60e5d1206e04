"""A colour run end to end through the command, on tiny RGB folders the test writes itself (two
classes, a test/ split): train conditional, sample guided, inpaint and edit an RGB image,
distill, export ONNX, evaluate (what applies) and show in the web page (its API)."""
from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddpm.cli import main
from ddpm.config import preset
from helpers import tiny_config, write_config

CLASSES = ("blue", "red")  # sorted, as a folder's classes are
CHANNEL = {"blue": 2, "red": 0}


def rgb_classes(root: Path, size: int, n: int = 6, test: int = 2) -> Path:
    """root/<class>/i.png and root/test/<class>/i.png: reddish and bluish squares with a bright box."""
    rng = np.random.default_rng(size)
    for part, count in (("", n), ("test", test)):
        for c in CLASSES:
            for i in range(count):
                (root / part / c).mkdir(parents=True, exist_ok=True)
                a = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
                a[..., CHANNEL[c]] += 150
                a[size // 4: size // 2, size // 4 + i % 4: size // 2 + i % 4] = 255
                Image.fromarray(a).save(root / part / c / f"{i}.png")
    return root


def one_error_line(capsys: pytest.CaptureFixture, message: str) -> None:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err


def train_colour(tmp_path: Path, size: int) -> tuple[Path, Path]:
    data = rgb_classes(tmp_path / f"rgb{size}", size)
    cfg = write_config(tmp_path / "cfg.json", tiny_config(data, max_steps=2))
    run = tmp_path / f"run{size}"
    assert main(["train", "--config", str(cfg), "--dataset", str(data), "--image-size", str(size), "--channels", "3",
                 "--cond", "--out", str(run), "--no-progress", "--no-tensorboard"]) == 0
    saved = json.loads((run / "config.json").read_text())
    assert saved["data"]["channels"] == saved["model"]["channels"] == 3 and saved["data"]["image_size"] == size
    assert saved["data"]["class_names"] == list(CLASSES) and saved["data"]["source"] == str(data)
    assert saved["data"]["class_counts"] == [6, 6]  # test/ is not trained on
    return run, data


def test_fast_rgb_preset_is_fast_at_32x32_rgb() -> None:
    fast, rgb = preset("fast"), preset("fast-rgb")
    assert rgb.data.image_size == 32 and rgb.data.channels == rgb.model.channels == 3 and rgb.preset == "fast-rgb"
    assert rgb.model.dim_mults == fast.model.dim_mults and rgb.train == fast.train and rgb.diffusion == fast.diffusion
    assert (fast.data.image_size, fast.data.channels, fast.model.channels) == (28, 1, 1)  # unchanged


@pytest.mark.parametrize("size", [32, pytest.param(64, marks=pytest.mark.slow)])
def test_colour_run_end_to_end(tmp_path: Path, size: int, capsys: pytest.CaptureFixture) -> None:
    run, data = train_colour(tmp_path, size)
    out = tmp_path / "guided"
    assert main(["sample", str(run), "--n", "4", "--sampler", "ddim", "--steps", "3", "--class", "blue",
                 "--guidance", "2", "--out", str(out)]) == 0
    imgs = np.load(out / "samples.npz")["images"]
    assert imgs.shape == (4, 3, size, size) and imgs.dtype == np.uint8

    image, keep = data / "test" / "red" / "0.png", np.full((size, size), 255, np.uint8)
    keep[:, size // 2:] = 0
    Image.fromarray(keep).save(tmp_path / "mask.png")  # one channel: the same pixels of every colour
    assert main(["inpaint", str(run), "--image", str(image), "--mask", str(tmp_path / "mask.png"), "--n", "2",
                 "--sampler", "ddim", "--steps", "3", "--jump-length", "1", "--resample", "1", "--class", "red",
                 "--out", str(tmp_path / "inpaint")]) == 0
    filled = np.load(tmp_path / "inpaint" / "samples.npz")["images"]
    src = np.asarray(Image.open(image)).transpose(2, 0, 1)
    assert filled.shape == (2, 3, size, size) and (filled[:, :, :, : size // 2] == src[:, :, : size // 2]).all()
    assert main(["edit", str(run), "--image", str(image), "--strength", "0.5", "--n", "2", "--sampler", "ddim",
                 "--steps", "4", "--out", str(tmp_path / "edits")]) == 0
    assert np.load(tmp_path / "edits" / "samples.npz")["images"].shape == (2, 3, size, size)

    grey = tmp_path / "grey.png"
    Image.fromarray(np.zeros((size, size), np.uint8)).save(grey)
    capsys.readouterr()
    for cmd in ("edit", "inpaint"):
        extra = ["--strength", "0.5"] if cmd == "edit" else ["--mask", str(tmp_path / "mask.png")]
        assert main([cmd, str(run), "--image", str(grey), *extra, "--out", str(tmp_path / f"grey-{cmd}")]) == 2
        one_error_line(capsys, "is grey (one channel, mode L); the model draws colour (3 channels)")
        assert not (tmp_path / f"grey-{cmd}").exists()

    student = tmp_path / "student"
    assert main(["distill", str(run), "--out", str(student), "--teacher-steps", "4", "--student-steps", "1",
                 "--steps-per-round", "2", "--no-progress", "--device", "cpu"]) == 0
    assert main(["sample", str(student), "--n", "2", "--class", "red", "--out", str(tmp_path / "s1")]) == 0
    assert np.load(tmp_path / "s1" / "samples.npz")["images"].shape == (2, 3, size, size)

    pytest.importorskip("onnx", reason="ddpm export needs ddpm[export]")
    pytest.importorskip("onnxruntime", reason="ddpm export checks the graph in ONNX Runtime")
    assert main(["export", str(run), "--onnx", "--out", str(tmp_path / "model.onnx")]) == 0
    import onnx

    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims[1:] == [3, size, size]


def test_colour_run_evaluation_says_what_applies(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    run, _ = train_colour(tmp_path, 32)
    capsys.readouterr()
    for extra in ([], ["--inpaint", "right"], ["--class", "all", "--guidance", "0,1"]):
        assert main(["eval", str(run), "--n", "8", "--sampler", "ddim", "--steps", "2", *extra]) == 2
        one_error_line(capsys, "draws 3x32x32 images of ")
    assert not (run / "samples").exists()
    # Inception FID alone, against the run's own test split at its size (the metric itself is
    # torchmetrics', stood in for here: its weights come from the internet).
    import ddpm.evaluation.evaluate as evaluate

    seen = []
    monkeypatch.setattr(evaluate, "inception_fid", lambda x, ref, w: seen.append((x.shape, ref.shape)) or 12.5)
    assert main(["eval", str(run), "--n", "8", "--sampler", "ddim", "--steps", "2", "--inception-weights",
                 str(tmp_path / "missing.pth")]) == 2
    one_error_line(capsys, "missing.pth not found")
    (tmp_path / "w.pth").write_bytes(b"weights")
    assert main(["eval", str(run), "--n", "8", "--sampler", "ddim", "--steps", "2", "--inception-weights",
                 str(tmp_path / "w.pth"), "--out", str(tmp_path / "ev")]) == 0
    assert seen == [((8, 3, 32, 32), (4, 3, 32, 32))]
    rep = json.loads((tmp_path / "ev" / "eval-ddim-2.json").read_text())
    assert rep["inception_fid"] == 12.5 and rep["n_reference"] == 4 and rep["reference"].endswith("(test)")
    # The likelihood needs no features: the bound on the run's own test split.
    assert main(["eval", str(run), "--nll", "--nll-steps", "2", "--n", "3", "--no-progress",
                 "--out", str(tmp_path / "nll")]) == 0
    assert json.loads((tmp_path / "nll" / "nll.json").read_text())["n_images"] == 3


def test_colour_run_in_the_web_page(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient
    from ddpm.ui.app import create_app
    from ddpm.ui.runs import RunIndex

    runs = tmp_path / "runs"
    runs.mkdir()
    train_colour(runs, 32)
    client = TestClient(create_app(RunIndex([], runs)), base_url="http://127.0.0.1:8000",
                        headers={"X-DDPM-Token": ""})
    src = np.asarray(Image.open(io.BytesIO(client.get("/api/runs/run32/source.png?index=7").content)))
    assert src.shape == (32, 32, 3) and src[..., 0].mean() > src[..., 2].mean()  # image 7: the second class, red
    fwd = np.asarray(Image.open(io.BytesIO(client.get("/api/runs/run32/forward.png?t=0").content)))
    assert fwd.ndim == 3 and fwd.shape[2] == 3  # the run's own colour data, not Fashion-MNIST
    r = client.post("/api/sample", json={"run": "run32", "sampler": "ddim", "steps": 2, "n": 2, "classes": "red"})
    assert r.status_code == 201, r.text
    with client.stream("GET", f"/api/jobs/{r.json()['id']}/events") as ev:
        last = [json.loads(line[6:]) for line in ev.iter_lines() if line.startswith("data: ")][-1]
    assert last["type"] == "done", last
    got = np.load(io.BytesIO(client.get(f"/api/jobs/{r.json()['id']}/files/samples.npz").content))["images"]
    assert got.shape == (2, 3, 32, 32)
    keep = np.ones((32, 32), np.uint8)
    keep[:, 16:] = 0
    common = {"run": "run32", "sampler": "ddim", "steps": 2, "n": 2, "image": {"index": 7}}
    for extra in ({"mode": "inpaint", "keep": keep.ravel().tolist(), "jump_length": 1, "resample": 1},
                  {"mode": "edit", "strength": 0.5}):
        r = client.post("/api/edit", json={**common, **extra})
        assert r.status_code == 201, r.text
        with client.stream("GET", f"/api/jobs/{r.json()['id']}/events") as ev:
            assert [json.loads(line[6:]) for line in ev.iter_lines() if line.startswith("data: ")][-1]["type"] == "done"
        got = np.load(io.BytesIO(client.get(f"/api/jobs/{r.json()['id']}/files/samples.npz").content))["images"]
        assert got.shape == (2, 3, 32, 32)
        if extra["mode"] == "inpaint":  # the known half, every colour of it, is the input's
            assert (got[:, :, :, :16] == src.transpose(2, 0, 1)[:, :, :16]).all()
    buf = io.BytesIO()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(buf, "PNG")
    r = client.post("/api/upload?run=run32", content=buf.getvalue())
    assert r.status_code == 400 and "is grey" in r.json()["error"]
    buf = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(buf, "PNG")
    assert client.post("/api/upload?run=run32", content=buf.getvalue()).status_code == 201


def test_bad_data_sources_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """An unknown source, an .npz without images, a Hugging Face dataset without an image column:
    one line, exit status 2, no run folder written."""
    np.savez(tmp_path / "no-images.npz", pictures=np.zeros((4, 8, 8), np.uint8))
    cases = [(tmp_path / "nowhere", "unknown data source"),
             (tmp_path / "no-images.npz", "has no 'images' array (it holds pictures)")]
    try:
        import datasets

        datasets.Dataset.from_dict({"text": ["a", "b"]}).save_to_disk(str(tmp_path / "text"))
        cases.append((tmp_path / "text", "has no image column (its columns: text (Value))"))
    except ImportError:  # the rest still runs; tests/data/test_sources.py says why it skips
        pass
    cfg = write_config(tmp_path / "cfg.json", tiny_config(tmp_path))
    capsys.readouterr()
    good = str(rgb_classes(tmp_path / "good", 8, n=2))
    for source, message in cases:
        for flags in (["--dataset", str(source)], ["--dataset", str(source), "--cond"],
                      ["--dataset", good, "--test-source", str(source)]):
            assert main(["train", "--config", str(cfg), *flags, "--out", str(tmp_path / "r"), "--no-progress"]) == 2
            one_error_line(capsys, message)
            assert not (tmp_path / "r").exists()


def test_noise_figure_of_a_colour_source(tmp_path: Path) -> None:
    data = rgb_classes(tmp_path / "rgb", 16, n=1, test=0)
    out = tmp_path / "noise.png"
    assert main(["noise", "--source", str(data), "--size", "16", "--t", "0,100", "--out", str(out)]) == 0
    tiles = np.asarray(Image.open(out))
    assert tiles.ndim == 3 and tiles.shape[2] == 3 and tiles.shape[1] >= 2 * 16


def test_colour_run_measured_by_features_fitted_to_its_data(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--features NET (here an untrained one of the run's shape): the report compares the samples
    with the run's own test split, its training split the floor."""
    import torch

    from ddpm.evaluation.features import FeatureNet, FeatureNetConfig, FeatureNetMeta, save_feature_net

    run, _ = train_colour(tmp_path, 32)
    torch.manual_seed(0)
    net = FeatureNet(FeatureNetConfig(channels=3, size=32, widths=(8, 8, 8), feature_dim=8, num_classes=2))
    save_feature_net(net.eval(), tmp_path / "rgb-features.safetensors", FeatureNetMeta(dataset="rgb32",
                                                                                        class_names=CLASSES))
    assert main(["eval", str(run), "--n", "8", "--sampler", "ddim", "--steps", "2", "--features",
                 str(tmp_path / "rgb-features.safetensors"), "--out", str(tmp_path / "ev")]) == 0
    rep = json.loads((tmp_path / "ev" / "eval-ddim-2.json").read_text())
    assert rep["reference"] == f"{tmp_path / 'rgb32'} (test)" and rep["n_reference"] == 4
    assert rep["fd"] >= 0 and rep["fd_reference"] is not None and rep["n_samples"] == 8
    small = FeatureNet(FeatureNetConfig())  # 1x28x28: not this run's images
    save_feature_net(small.eval(), tmp_path / "grey.safetensors", FeatureNetMeta(dataset="other"))
    capsys.readouterr()
    assert main(["eval", str(run), "--n", "8", "--features", str(tmp_path / "grey.safetensors")]) == 2
    one_error_line(capsys, "the feature net takes 1x28x28 images; ")


def test_a_run_whose_data_has_no_test_split(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """eval --nll reads the run's own test split: none is one line, nothing written; a
    --test-source given at training stands in."""
    data = rgb_classes(tmp_path / "flat", 8, n=4, test=0)
    cfg = write_config(tmp_path / "cfg.json", tiny_config(data, max_steps=1))
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--channels", "3", "--out", str(run), "--no-progress",
                 "--no-tensorboard"]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--nll", "--nll-steps", "2", "--n", "2", "--no-progress"]) == 2
    one_error_line(capsys, "has no test split")
    assert not (run / "nll.json").exists()
    held_out = rgb_classes(tmp_path / "held-out", 8, n=1, test=0)
    run2 = tmp_path / "run2"
    assert main(["train", "--config", str(cfg), "--channels", "3", "--test-source", str(held_out), "--out", str(run2),
                 "--no-progress", "--no-tensorboard"]) == 0
    assert main(["eval", str(run2), "--nll", "--nll-steps", "2", "--n", "5", "--no-progress"]) == 0
    assert json.loads((run2 / "nll.json").read_text())["n_images"] == 2  # all the held-out images
