"""Every process through the command, end to end, on tiny class folders the test writes: train
(conditional, a guiding model kept), sample with each sampler that applies (guided and
autoguided, per-image seeds), inpaint (RePaint), edit (SDEdit), distill (both methods), export
ONNX and the web page's API; and the refusals of what does not fit a process. ``vp`` runs are
the older tests' subject (tests/command/test_cli.py); this file adds edm and rectified flow."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddpm.cli import main
from helpers import tiny_config, write_config

PROCESSES = {"edm": ["--process", "edm", "--objective", "edm", "--t-sampling", "lognormal", "--loss", "l2"],
             "rectified-flow": ["--process", "rectified-flow", "--objective", "velocity", "--t-sampling",
                                "logit-normal", "--loss", "l2"]}


def classes(root: Path, n: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for k, c in enumerate(("dark", "light")):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            a = rng.integers(0, 80, (8, 8), dtype=np.uint8) + 150 * k
            Image.fromarray(a).save(root / c / f"{i}.png")
    return root


def one_error_line(capsys: pytest.CaptureFixture, message: str) -> None:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err


@pytest.fixture(scope="module", params=list(PROCESSES))
def trained(request, tmp_path_factory) -> tuple[str, Path, Path]:
    tmp = tmp_path_factory.mktemp(request.param)
    data = classes(tmp / "data")
    cfg = write_config(tmp / "cfg.json", tiny_config(data, max_steps=4, guide_at=0.5))
    run = tmp / "run"
    assert main(["train", "--config", str(cfg), "--cond", *PROCESSES[request.param], "--out", str(run),
                 "--no-progress", "--no-tensorboard"]) == 0
    return request.param, run, tmp


def npz(folder: Path) -> np.ndarray:
    return np.load(folder / "samples.npz")["images"]


def test_the_run_names_its_process(trained) -> None:
    process, run, _ = trained
    d = json.loads((run / "config.json").read_text())["diffusion"]
    assert d["process"] == process and d["objective"] in ("edm", "velocity")


@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m", "heun", "consistency", None])
def test_every_sampler_guided_and_autoguided(trained, sampler) -> None:
    _, run, tmp = trained
    out = tmp / f"s-{sampler}"
    args = ["sample", str(run), "--n", "3", "--steps", "3", "--class", "light", "--guidance", "1.5",
            "--autoguidance", "0.5"] + ([] if sampler is None else ["--sampler", sampler])
    assert main([*args, "--out", str(out)]) == 0
    imgs = npz(out)
    assert imgs.shape == (3, 1, 8, 8) and imgs.dtype == np.uint8 and imgs.std() > 0
    # per-image seeds: image i depends on (seed, i) only, not on the batch. A batch of one runs
    # the convolutions in another order, so a pixel within float rounding of a grey-level
    # boundary may land one level over: at most one level, on at most 2% of the pixels.
    assert main([*args, "--out", str(tmp / f"b-{sampler}"), "--batch-size", "1"]) == 0
    diff = np.abs(npz(tmp / f"b-{sampler}").astype(int) - imgs.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() <= 0.02, (diff.max(), (diff > 0).mean())


def test_ddim_eta_is_the_stochastic_sampler(trained) -> None:
    _, run, tmp = trained
    a, b = tmp / "eta0", tmp / "eta1"
    assert main(["sample", str(run), "--sampler", "ddim", "--steps", "4", "--n", "2", "--out", str(a)]) == 0
    assert main(["sample", str(run), "--sampler", "ddim", "--eta", "1", "--steps", "4", "--n", "2",
                 "--out", str(b)]) == 0
    assert not np.array_equal(npz(a), npz(b))


def test_inpaint_and_edit(trained) -> None:
    _, run, tmp = trained
    image = tmp / "data" / "light" / "0.png"
    keep = np.full((8, 8), 255, np.uint8)
    keep[:, 4:] = 0
    Image.fromarray(keep).save(tmp / "mask.png")
    for sampler in ("ddim", "heun"):
        out = tmp / f"inpaint-{sampler}"
        assert main(["inpaint", str(run), "--image", str(image), "--mask", str(tmp / "mask.png"), "--n", "2",
                     "--sampler", sampler, "--steps", "4", "--jump-length", "2", "--resample", "2",
                     "--class", "light", "--guidance", "1", "--out", str(out)]) == 0
        src = np.asarray(Image.open(image))
        assert (npz(out)[:, 0, :, :4] == src[:, :4]).all()  # the kept pixels are the input's
    for strength in ("0.3", "1"):
        out = tmp / f"edit-{strength}"
        assert main(["edit", str(run), "--image", str(image), "--strength", strength, "--n", "2",
                     "--sampler", "ddim", "--steps", "6", "--out", str(out)]) == 0
        assert npz(out).shape == (2, 1, 8, 8)


@pytest.mark.parametrize("method", ["consistency", "progressive"])
def test_distill(trained, method) -> None:
    _, run, tmp = trained
    student = tmp / f"student-{method}"
    assert main(["distill", str(run), "--method", method, "--out", str(student), "--teacher-steps", "4",
                 "--student-steps", "2" if method == "consistency" else "1", "--steps-per-round", "2",
                 "--no-progress", "--device", "cpu"]) == 0
    assert main(["sample", str(student), "--n", "2", "--class", "dark", "--out", str(tmp / f"ss-{method}")]) == 0
    assert npz(tmp / f"ss-{method}").shape == (2, 1, 8, 8)


def test_export_onnx(trained) -> None:
    pytest.importorskip("onnx", reason="ddpm export needs ddpm[export]")
    pytest.importorskip("onnxruntime", reason="ddpm export checks the graph in ONNX Runtime")
    _, run, tmp = trained
    assert main(["export", str(run), "--onnx", "--out", str(tmp / "model.onnx")]) == 0
    assert (tmp / "model.onnx").stat().st_size > 0


def test_the_web_page(trained) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient
    from ddpm.ui.app import create_app
    from ddpm.ui.runs import RunIndex

    _, run, tmp = trained
    client = TestClient(create_app(RunIndex([run], tmp / "none")), base_url="http://127.0.0.1:8000",
                        headers={"X-DDPM-Token": ""})
    info = client.get("/api/runs").json()["runs"][0]
    name = info["name"]
    assert info["process"] == trained[0]
    assert client.get(f"/api/runs/{name}/forward.png?t=3").status_code == 200
    r = client.post("/api/sample", json={"run": name, "sampler": "heun", "steps": 3, "n": 2, "classes": "dark",
                                         "guidance": 1})
    assert r.status_code == 201, r.text
    with client.stream("GET", f"/api/jobs/{r.json()['id']}/events") as ev:
        last = [json.loads(line[6:]) for line in ev.iter_lines() if line.startswith("data: ")][-1]
    assert last["type"] == "done", last
    r = client.post("/api/sample", json={"run": name, "sampler": "ddpm", "steps": 3, "n": 2})
    assert r.status_code == 400 and "defined on the vp process only" in r.json()["error"]


def test_what_does_not_fit_is_one_line(trained, capsys) -> None:
    process, run, tmp = trained
    capsys.readouterr()
    assert main(["sample", str(run), "--sampler", "ddpm", "--n", "1", "--out", str(tmp / "no")]) == 2
    one_error_line(capsys, f"the ddpm sampler is defined on the vp process only, not on {process}")
    assert main(["eval", str(run), "--nll", "--n", "2", "--out", str(tmp / "no")]) == 2
    one_error_line(capsys, "the likelihood (DDPM's variational bound, Eq. 5) is the discrete chain's")
    assert not (tmp / "no").exists()


@pytest.mark.parametrize("flags,message", [
    (["--process", "ve"], "unknown process"),
    (["--process", "rectified-flow", "--objective", "eps"], "objective eps does not fit the rectified-flow process"),
    (["--process", "edm", "--learn-sigma"], "learned variances (--learn-sigma) are the discrete chain's"),
    (["--objective", "score"], "unknown objective"),
    (["--t-sampling", "beta"], "unknown t-sampling"),
    (["--process", "edm", "--sigma-min", "9", "--sigma-max", "1"], "edm needs 0 < sigma_min < sigma_max"),
])
def test_bad_training_requests_are_one_line(tmp_path: Path, capsys, flags, message) -> None:
    data = classes(tmp_path / "data", n=2)
    cfg = write_config(tmp_path / "cfg.json", tiny_config(data))
    capsys.readouterr()
    assert main(["train", "--config", str(cfg), *flags, "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    one_error_line(capsys, message)
    assert not (tmp_path / "run").exists()
