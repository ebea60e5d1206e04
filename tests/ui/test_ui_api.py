"""`ddpm ui`'s JSON API through Starlette's test client, on a tiny run the tests train themselves."""
from __future__ import annotations

import io
import json
import os
import shutil
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

with warnings.catch_warnings():  # starlette would rather have httpx2; httpx works the same here
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient  # the ui extra; `make test` installs it

from ddpm.cli import main  # noqa: E402
from ddpm.ui.app import create_app  # noqa: E402
from ddpm.ui.jobs import decode_data_url  # noqa: E402
from ddpm.ui.runs import RunIndex  # noqa: E402
from helpers import tiny_config, write_config  # noqa: E402



def upload(client: TestClient, data: bytes, run: str = "tiny"):
    """An image sent as the page sends one: the bytes as the body."""
    return client.post(f"/api/upload?run={run}", content=data)


def local_client(app, **kw) -> TestClient:
    """A client that talks to the app as the page served at `ddpm ui`'s default address does
    (its own Host, and the header the page's script sends with every request)."""
    return TestClient(app, base_url="http://127.0.0.1:8000", headers={"X-DDPM-Token": ""}, **kw)

@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory: pytest.TempPathFactory, image_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("runs")
    cfg = write_config(root.parent / "cfg.json", tiny_config(image_dir, max_steps=2, sample_every=2))
    assert main(["train", "--config", str(cfg), "--out", str(root / "tiny"), "--no-progress",
                 "--no-tensorboard"]) == 0
    (root / "empty-run").mkdir()
    (root / "empty-run" / "log.jsonl").write_text("")
    (root / "not-a-run").mkdir()
    return root


@pytest.fixture()
def client(runs_dir: Path) -> TestClient:
    return local_client(create_app(RunIndex([], runs_dir)))


def events(client: TestClient, job: str) -> list[dict]:
    with client.stream("GET", f"/api/jobs/{job}/events") as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]


def sample(client: TestClient, **params: object) -> str:
    r = client.post("/api/sample", json={"run": "tiny", **params})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_lists_runs_and_meta(client: TestClient) -> None:
    runs = {r["name"]: r for r in client.get("/api/runs").json()["runs"]}
    assert set(runs) == {"tiny", "empty-run"}
    assert runs["tiny"]["checkpoint"] == "step-00000002" and runs["tiny"]["T"] == 20
    assert runs["empty-run"]["checkpoint"] is None
    meta = client.get("/api/meta").json()
    assert [s["name"] for s in meta["samplers"]] == ["ddpm", "ddim", "dpm++2m", "heun", "consistency"]
    assert "fp32" in meta["precisions"] and "sampler" in meta["fields"]
    page = client.get("/")
    assert page.status_code == 200 and "ddpm" in page.text
    for asset in ("app.js", "charts.js", "style.css"):
        assert client.get(f"/static/{asset}").status_code == 200


def test_sample_streams_every_step_then_downloads(client: TestClient) -> None:
    job = sample(client, sampler="ddim", steps=5, n=5, seed=3)
    evs = events(client, job)
    frames = [e for e in evs if e["type"] == "frame"]
    assert [f["done"] for f in frames] == [1, 2, 3, 4, 5] and evs[-1]["type"] == "done"
    done = evs[-1]
    assert done["nfe"] == 5 and done["steps"] == 5 and done["n"] == 5
    for f in frames:  # 5 images of 8x8 -> 3 per row, 2 rows, 2 px padding: 32 x 22
        for key in ("x_t", "x0"):
            assert decode_data_url(f[key]).size == (f["width"], f["height"]) == (32, 22)
    assert frames[0]["x_t"] != frames[-1]["x_t"]
    grid = Image.open(io.BytesIO(client.get(f"/api/jobs/{job}/files/grid.png").content))
    assert grid.size == (32, 22)
    npz = np.load(io.BytesIO(client.get(f"/api/jobs/{job}/files/samples.npz").content))["images"]
    assert npz.shape == (5, 1, 8, 8) and npz.dtype == np.uint8
    assert np.array_equal(np.asarray(grid)[2:10, 2:10], npz[0, 0])  # the grid shows the samples
    gif = Image.open(io.BytesIO(client.get(f"/api/jobs/{job}/files/denoising.gif").content))
    assert gif.n_frames == 5
    # the same request again draws the same pictures (seeded)
    again = events(client, sample(client, sampler="ddim", steps=5, n=5, seed=3))
    assert again[-1]["grid"] == done["grid"]


def test_compare_mode_sends_progress_not_frames(client: TestClient) -> None:
    evs = events(client, sample(client, sampler="heun", steps=3, n=2, stream=False))
    assert {e["type"] for e in evs} == {"progress", "done"} and evs[-1]["nfe"] == 5


def test_two_requests_at_once_get_their_own_results(client: TestClient) -> None:
    a, b = sample(client, sampler="ddpm", steps=20, n=2, seed=1), sample(client, sampler="ddim", steps=4, n=3, seed=2)
    ea, eb = events(client, a), events(client, b)
    assert ea[-1]["n"] == 2 and ea[-1]["steps"] == 20 and eb[-1]["n"] == 3 and eb[-1]["steps"] == 4
    assert len([e for e in ea if e["type"] == "frame"]) == 20


def test_cancel_stops_the_thread(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    import ddpm.ui.jobs as jobs

    gate = threading.Event()
    real = jobs.Job._hook

    def slow(self, ev):  # hold the sampler at its second step until the test has cancelled
        if ev.done == 2:
            gate.wait(10)
        return real(self, ev)

    monkeypatch.setattr(jobs.Job, "_hook", slow)
    job_id = sample(client, sampler="ddpm", steps=20, n=2)
    assert client.post(f"/api/jobs/{job_id}/cancel").status_code == 200
    gate.set()
    evs = events(client, job_id)
    assert evs[-1]["type"] == "cancelled" and len([e for e in evs if e["type"] == "frame"]) < 20
    job = client.app.state.jobs.get(job_id)
    job.thread.join(5)
    assert not job.thread.is_alive() and client.app.state.jobs.running() == 0
    assert client.get(f"/api/jobs/{job_id}/files/grid.png").status_code == 400


@pytest.mark.parametrize("params, status, message", [
    ({"steps": 0}, 400, "steps"),
    ({"steps": 21}, 400, "steps"),
    ({"sampler": "euler"}, 400, "unknown sampler"),
    ({"n": 0}, 400, "number of images"),
    ({"n": 65}, 400, "number of images"),
    ({"precision": "fp8"}, 400, "precision"),
    ({"eta": 3.0}, 400, "eta"),
    ({"seed": "x"}, 400, "seed"),
    ({"bogus": 1}, 400, "unknown parameter"),
    ({"guiding_model": "/etc"}, 400, "unknown parameter"),  # the page guides with RUN/guide only
    ({"autoguidance": 1}, 400, "no guiding model"),
    ({"autoguidance": -1}, 400, "Autoguidance must be"),  # the page's field, not the command's flag
    ({"autoguidance_interval": [0, 1]}, 400, "needs Autoguidance"),
    ({"autoguidance_interval": "0,1"}, 400, "must be a list"),
    ({"classes": "sneaker"}, 400, "conditional"),
    ({"run": "nope"}, 404, "no run"),
    ({"run": "../tiny"}, 404, "no run"),
    ({"run": "empty-run"}, 400, "no checkpoint"),
])
def test_bad_parameters_are_4xx_with_a_message(client: TestClient, params: dict, status: int, message: str) -> None:
    r = client.post("/api/sample", json={"run": "tiny", "sampler": "ddim", "steps": 5, **params})
    assert r.status_code == status and message in r.json()["error"], r.text
    assert "Traceback" not in r.text


def test_messages_speak_the_pages_words(client: TestClient, runs_dir: Path) -> None:
    """The page's field labels for the command's flags, every quote kept, no path of the server's."""
    def error(body: dict) -> str:
        r = client.post("/api/sample", json={"sampler": "ddim", "steps": 5, **body})
        assert r.status_code in (400, 404), r.text
        return r.json()["error"]

    assert error({"run": "tiny", "guidance": 2.0}) == "Guidance needs a class-conditional model"
    assert error({"run": "tiny", "classes": "bag"}) == "Class needs a class-conditional model; this one is unconditional"
    assert error({"run": "nope"}) == "no run named 'nope'"
    assert error({"run": "tiny", "steps": "x"}).endswith("got 'x'")
    msg = upload(client, b"not an image").json()["error"]
    assert msg.startswith("cannot read the uploaded image") and "/" not in msg, msg
    broken = runs_dir / "broken"
    shutil.copytree(runs_dir / "tiny", broken)
    try:
        (broken / "checkpoints" / "step-00000002" / "ema.safetensors").write_bytes(b"junk")
        msg = error({"run": "broken"})
        assert msg.startswith("checkpoint broken/checkpoints/step-00000002 is damaged") and str(runs_dir) not in msg
    finally:
        shutil.rmtree(broken)


def test_runs_say_whether_they_are_training(runs_dir: Path, tmp_path: Path) -> None:
    """A log written lately and no final checkpoint yet: training; the step budget's checkpoint
    written, or a log gone quiet: not (the page's header follows it)."""
    from dataclasses import replace

    from ddpm.config import RunConfig

    root = tmp_path / "runs"
    shutil.copytree(runs_dir / "tiny", root / "done")  # max_steps 2, checkpoint step 2
    (root / "starting").mkdir()
    for f in ("config.json", "log.jsonl"):
        shutil.copy(runs_dir / "tiny" / f, root / "starting" / f)
    shutil.copytree(runs_dir / "tiny", root / "halfway")  # a budget of 4 steps, checkpoint step 2
    cfg = RunConfig.load(root / "halfway" / "config.json")
    (root / "halfway" / "config.json").write_text(replace(cfg, train=replace(cfg.train, max_steps=4)).to_json())
    shutil.copytree(root / "halfway", root / "killed")
    old = time.time() - 3600
    os.utime(root / "killed" / "log.jsonl", (old, old))
    for run in ("done", "starting", "halfway"):
        os.utime(root / run / "log.jsonl")
    runs = {r["name"]: r["training"] for r in local_client(create_app(RunIndex([], root))).get("/api/runs").json()["runs"]}
    assert runs == {"done": False, "starting": True, "halfway": True, "killed": False}


def test_jobs_without_files_are_forgotten_first() -> None:
    """The store keeps the files the page links to: a cancelled or failed job goes before them."""
    import torch

    from ddpm.errors import DdpmError
    from ddpm.sampling.generate import Samples
    from ddpm.ui.jobs import JobStore

    def made(hook):
        return Samples(torch.zeros(1, 1, 8, 8, dtype=torch.uint8), nfe=1, steps=1)

    def failed(hook):
        raise DdpmError("no")

    store = JobStore(keep=2)
    kept = [store.start("tiny", made, stream=False) for _ in range(2)]
    for work in (failed, failed):
        kept[-1].thread.join(5)
        store.start("tiny", work, stream=False).thread.join(5)
    assert [store.get(j.id) for j in kept] == kept, "a job with files was dropped"


def test_not_json_and_unknown_job(client: TestClient) -> None:
    r = client.post("/api/sample", content=b"{not json")
    assert r.status_code == 400 and "JSON" in r.json()["error"]
    assert client.get("/api/jobs/nope/events").status_code == 404
    assert client.get("/api/jobs/nope/files/grid.png").status_code == 404


def test_paths_outside_the_runs_are_404(client: TestClient, runs_dir: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "config.json").write_text((runs_dir / "tiny" / "config.json").read_text())
    (secret / "log.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    os.symlink(secret, runs_dir / "link-out")  # a symlinked run folder pointing out of --runs
    (runs_dir / "tiny" / "samples" / "step-99999999.png").symlink_to(Path(__file__))  # a file pointing out
    try:
        assert "link-out" not in [r["name"] for r in client.get("/api/runs").json()["runs"]]
        for url in ("/api/runs/link-out/log", "/api/runs/..%2F..%2Fetc/log", "/api/runs/../../etc/log",
                    f"/api/runs/{secret}/log", "/api/runs/%2Fetc/schedules", "/static/../app.py",
                    "/static/%2e%2e/app.py", "/api/runs/not-a-run/log"):
            r = client.get(url)
            assert r.status_code == 404, (url, r.status_code, r.text)
            assert "secret" not in r.text and "0.5" not in r.text
        sample_png = client.get("/api/runs/tiny/sample.png")  # skips the symlink, serves the real one
        assert sample_png.status_code == 200 and sample_png.content[:4] == b"\x89PNG"
        assert client.get("/api/runs/tiny/log").json()["sample_step"] == 2
    finally:
        (runs_dir / "link-out").unlink()
        (runs_dir / "tiny" / "samples" / "step-99999999.png").unlink()


def test_forward_and_schedules(client: TestClient, image_dir: Path) -> None:
    s = client.get("/api/runs/tiny/schedules").json()
    assert s["T"] == 20 and s["schedule"] == "linear" and set(s["curves"]) == {"linear", "cosine", "quadratic", "sigmoid"}
    ab = np.array(s["curves"]["linear"]["alpha_bar"])
    betas = np.linspace(1e-4, 0.02, 20)  # DDPM's linear schedule, recomputed here
    assert np.allclose(ab, np.cumprod(1 - betas), rtol=1e-6)
    assert np.allclose(s["curves"]["linear"]["snr"], ab / (1 - ab), rtol=1e-6)
    pics = [np.asarray(Image.open(io.BytesIO(client.get(f"/api/runs/tiny/forward.png?t={t}").content)))
            for t in (0, 19)]
    assert pics[0].shape == (12, 32)  # x0 | x_t | noise: three 8x8 tiles
    x0, xt0, xt19 = pics[0][2:10, 2:10], pics[0][2:10, 12:20], pics[1][2:10, 12:20]
    assert np.abs(x0.astype(int) - xt0).max() <= 8 < np.abs(x0.astype(int) - xt19).mean()  # t=0 barely noised
    up = upload(client, (image_dir / "img03.png").read_bytes()).json()["upload"]
    assert client.get(f"/api/runs/tiny/forward.png?t=5&upload={up}").status_code == 200
    for q, msg in (("t=20", "t must be"), ("t=-1", "t must be"), ("t=abc", "whole number")):
        r = client.get(f"/api/runs/tiny/forward.png?{q}")
        assert r.status_code == 400 and msg in r.json()["error"]
    r = upload(client, b"not an image")
    assert r.status_code == 400 and "cannot read the uploaded image" in r.json()["error"]


def test_training_log_polls_new_records(client: TestClient, runs_dir: Path) -> None:
    first = client.get("/api/runs/tiny/log").json()
    assert [r["step"] for r in first["records"]] == [1, 2]
    assert client.get("/api/runs/tiny/log?after=1").json()["records"][0]["step"] == 2
    log = runs_dir / "tiny" / "log.jsonl"
    before = log.read_text()
    try:
        with log.open("a") as f:  # the run writes a new record, and half of the next one
            f.write(json.dumps({"step": 3, "loss": 0.25}) + "\n" + '{"step": 4, "lo')
        assert [r["step"] for r in client.get("/api/runs/tiny/log?after=2").json()["records"]] == [3]
    finally:
        log.write_text(before)
    assert client.get("/api/runs/empty-run/log").json() == {"records": [], "sample_step": None}


def test_models_are_loaded_once(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    import ddpm.ui.runs as runs

    loads = []
    real = runs.load_model
    monkeypatch.setattr(runs, "load_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    for _ in range(3):
        events(client, sample(client, sampler="ddim", steps=2, n=1))
    assert len(loads) == 1


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["ui", str(tmp_path / "missing")]) == 2
    assert "is not a run folder" in capsys.readouterr().err
    assert main(["ui", "--runs", str(tmp_path), "--port", "70000"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "--port" in err
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        assert main(["ui", "--runs", str(tmp_path), "--port", str(taken.getsockname()[1])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot listen on 127.0.0.1:") and "\n" not in err


def test_too_many_samples_at_once_is_a_400(runs_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ddpm.ui.jobs as jobs

    gate = threading.Event()
    real = jobs.Job._hook
    monkeypatch.setattr(jobs.Job, "_hook", lambda self, ev: gate.wait(10) and real(self, ev))
    client = local_client(create_app(RunIndex([], runs_dir), jobs=jobs.JobStore(max_running=1)))
    first = sample(client, sampler="ddim", steps=2, n=1)
    r = client.post("/api/sample", json={"run": "tiny", "sampler": "ddim", "steps": 2})
    assert r.status_code == 400 and "already running 1 at once" in r.json()["error"]
    gate.set()
    assert events(client, first)[-1]["type"] == "done"
    sample(client, sampler="ddim", steps=2, n=1)  # the slot is free again


def test_the_page_fetches_nothing_from_elsewhere() -> None:
    from ddpm.ui.app import STATIC

    for f in STATIC.iterdir():
        text = f.read_text()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, f.name


def test_frames_stream_while_it_samples(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    import ddpm.ui.jobs as jobs

    gate = threading.Event()
    real = jobs.Job._hook
    monkeypatch.setattr(jobs.Job, "_hook", lambda self, ev: (ev.done != 3 or gate.wait(10)) and real(self, ev))
    job_id = sample(client, sampler="ddpm", steps=20, n=4)
    job = client.app.state.jobs.get(job_id)
    seen = []
    with client.stream("GET", f"/api/jobs/{job_id}/events") as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                seen.append(json.loads(line[6:]))
                if seen[-1].get("done") == 2:
                    assert not job.finished  # step 2's frame reached the page while step 3 still runs
                    gate.set()
    assert [e["done"] for e in seen if e["type"] == "frame"] == list(range(1, 21))


def test_inpaint_and_edit(client: TestClient) -> None:
    src = np.asarray(Image.open(io.BytesIO(client.get("/api/runs/tiny/source.png?index=1").content)))
    assert src.shape == (8, 8)
    keep = np.ones((8, 8), np.uint8)
    keep[:, 4:] = 0  # fill in the right half
    common = {"run": "tiny", "sampler": "ddim", "steps": 4, "n": 3, "image": {"index": 1}}
    r = client.post("/api/edit", json={**common, "mode": "inpaint", "keep": keep.ravel().tolist(),
                                       "jump_length": 2, "resample": 2})
    assert r.status_code == 201, r.text
    evs = events(client, r.json()["id"])
    frames = [e for e in evs if e["type"] == "frame"]
    assert evs[-1]["type"] == "done" and frames and frames[-1]["done"] == frames[-1]["total"]
    shown = np.asarray(decode_data_url(frames[0]["x_t"]))  # the known half is shown as the input's
    assert np.array_equal(shown[2:10, 2:6], src[:, :4])
    out = np.load(io.BytesIO(client.get(f"/api/jobs/{r.json()['id']}/files/samples.npz").content))["images"]
    assert out.shape == (3, 1, 8, 8) and (out[:, 0, :, :4] == src[:, :4]).all()  # known pixels exact
    grid = decode_data_url(evs[-1]["grid"])  # input | mask | 3 completions
    assert grid.size == (2 + 5 * 10, 12)

    r = client.post("/api/edit", json={**common, "mode": "edit", "strength": 0.5})
    assert r.status_code == 201, r.text
    assert events(client, r.json()["id"])[-1]["type"] == "done"


@pytest.mark.parametrize("extra, message", [
    ({"mode": "edit", "strength": 0}, "Strength"),
    ({"mode": "edit", "strength": 1.5}, "Strength"),
    ({"mode": "edit", "strength": "a lot"}, "strength"),
    ({"mode": "inpaint", "keep": [1, 0]}, "8x8"),
    ({"mode": "inpaint", "keep": [1] * 64}, "keeps every pixel"),
    ({"mode": "inpaint", "keep": [0] * 64, "resample": 0}, "Resample r"),
    ({"mode": "paint"}, "unknown edit mode"),
    ({"mode": "edit", "strength": 0.5, "image": {"path": "/etc/passwd"}}, "image must be"),
    ({"mode": "edit", "strength": 0.5, "steps": 0}, "steps"),
])
def test_bad_edits_are_400(client: TestClient, extra: dict, message: str) -> None:
    r = client.post("/api/edit", json={"run": "tiny", "sampler": "ddim", "steps": 4, "n": 1, **extra})
    assert r.status_code == 400 and message in r.json()["error"], r.text


def test_class_and_guidance_on_a_conditional_run(tmp_path: Path, image_dir: Path) -> None:
    from dataclasses import replace

    from helpers import make_images

    data = tmp_path / "data"
    for name in ("left", "right"):
        (data / name).mkdir(parents=True)
        make_images(data / name, n=8)
    cfg = tiny_config(data, max_steps=2)
    cfg = replace(cfg, model=replace(cfg.model, num_classes=2), data=replace(cfg.data, class_names=("left", "right")))
    runs = tmp_path / "runs"
    assert main(["train", "--config", str(write_config(tmp_path / "c.json", cfg)), "--out", str(runs / "cond"),
                 "--no-progress", "--no-tensorboard"]) == 0
    client = local_client(create_app(RunIndex([], runs)))
    info = client.get("/api/runs").json()["runs"][0]
    assert info["num_classes"] == 2 and info["class_names"] == ["left", "right"]
    assert {"classes", "guidance"} <= set(client.get("/api/meta").json()["fields"])
    r = client.post("/api/sample", json={"run": "cond", "sampler": "ddim", "steps": 3, "n": 4, "classes": "all",
                                         "guidance": 2.0})
    assert r.status_code == 201, r.text
    evs = events(client, r.json()["id"])
    done = evs[-1]
    assert done["type"] == "done" and done["n"] == 4
    assert decode_data_url(done["grid"]).size == (22, 22)  # a row per class: 2 x 2 tiles
    r = client.post("/api/sample", json={"run": "cond", "sampler": "ddim", "steps": 3, "n": 6, "classes": "all"})
    evs = events(client, r.json()["id"])  # 3 of each class: frames and result in rows of 3, one per class
    assert evs[0]["width"] == decode_data_url(evs[-1]["grid"]).size[0] == 32 and evs[0]["height"] == 22
    r = client.post("/api/sample", json={"run": "cond", "sampler": "ddim", "steps": 3, "n": 5, "classes": "all"})
    job = r.json()["id"]  # exactly the 5 asked for: 3 of the first class, 2 of the second, short row blank
    assert events(client, job)[-1]["n"] == 5
    assert np.load(io.BytesIO(client.get(f"/api/jobs/{job}/files/samples.npz").content))["images"].shape[0] == 5
    assert Image.open(io.BytesIO(client.get(f"/api/jobs/{job}/files/grid.png").content)).size == (32, 22)
    r = client.post("/api/sample", json={"run": "cond", "sampler": "ddim", "steps": 3, "n": 16, "classes": "right"})
    evs = events(client, r.json()["id"])  # one class: the square grid of an unconditional run, not a strip
    assert evs[0]["width"] == evs[0]["height"] == decode_data_url(evs[-1]["grid"]).size[0] == 42
    for bad, msg in (({"classes": "middle"}, "middle"), ({"guidance": -1.0}, "Guidance")):
        r = client.post("/api/sample", json={"run": "cond", "sampler": "ddim", "steps": 3, **bad})
        assert r.status_code == 400 and msg in r.json()["error"], r.text


def test_a_page_that_goes_away_cancels_its_sample(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    import ddpm.ui.jobs as jobs

    real = jobs.Job._hook
    monkeypatch.setattr(jobs.Job, "_hook", lambda self, ev: time.sleep(0.05) or real(self, ev))
    job_id = sample(client, sampler="ddpm", steps=20, n=2)
    with client.stream("GET", f"/api/jobs/{job_id}/events") as r:
        next(line for line in r.iter_lines() if line.startswith("data: "))  # one frame, then leave
    job = client.app.state.jobs.get(job_id)
    job.thread.join(10)
    assert not job.thread.is_alive() and json.loads(job.events[-1])["type"] == "cancelled"


def test_a_bug_is_a_one_line_500(runs_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ddpm.ui.panels as panels

    def broken(cfg):
        raise RuntimeError("schedules exploded")

    monkeypatch.setattr(panels, "schedule_curves", broken)
    client = local_client(create_app(RunIndex([], runs_dir)), raise_server_exceptions=False)
    r = client.get("/api/runs/tiny/schedules")
    assert r.status_code == 500 and r.json() == {"error": "internal error: RuntimeError: schedules exploded"}


def test_long_runs_stream_a_bounded_number_of_frames(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    import ddpm.ui.jobs as jobs

    monkeypatch.setattr(jobs, "MAX_FRAMES", 6)  # 20 steps: every 4th, plus the first and the last
    evs = events(client, sample(client, sampler="ddpm", steps=20, n=1))
    assert [e["done"] for e in evs if e["type"] == "frame"] == [1, 4, 8, 12, 16, 20]
    assert [e["done"] for e in evs if e["type"] in ("frame", "progress")] == list(range(1, 21))


def test_generate_hook_counts_over_batches_and_stops(runs_dir: Path) -> None:
    """The library hook the page is built on: StepEvent per step over all batches; False stops."""
    from ddpm.config import SampleConfig
    from ddpm.sampling import SamplingCancelled, generate, load_model

    model = load_model(runs_dir / "tiny")
    seen = []
    s = generate(model, SampleConfig(sampler="ddim", steps=4, n=5, batch_size=2),
                 on_step=lambda ev: seen.append((ev.done, ev.total, ev.batch_start, tuple(ev.x_t.shape))))
    assert [d for d, *_ in seen] == list(range(1, 13)) and {t for _, t, *_ in seen} == {12}
    assert [b for _, _, b, _ in seen] == [0] * 4 + [2] * 4 + [4] * 4 and seen[-1][3] == (1, 1, 8, 8)
    assert s.images.shape == (5, 1, 8, 8)
    calls = []
    with pytest.raises(SamplingCancelled):
        generate(model, SampleConfig(sampler="ddpm", steps=20, n=2), on_step=lambda ev: calls.append(ev.done) or ev.done < 3)
    assert calls == [1, 2, 3]


def test_a_student_run_names_its_own_sampling(runs_dir: Path, tmp_path: Path) -> None:
    """A distilled run (distill.json beside its config) tells the page how it samples, and the
    page's request for it (the student's sampler, steps and trailing grid) runs."""
    root = tmp_path / "runs"
    shutil.copytree(runs_dir / "tiny", root / "student")
    (root / "student" / "distill.json").write_text(json.dumps(
        {"teacher": "elsewhere", "method": "consistency", "teacher_steps": 8, "student_steps": 2}))
    shutil.copytree(runs_dir / "tiny", root / "progressive")
    (root / "progressive" / "distill.json").write_text(json.dumps(
        {"teacher": "elsewhere", "method": "progressive", "teacher_steps": 8, "student_steps": 2}))
    c = local_client(create_app(RunIndex([], root)))
    runs = {r["name"]: r for r in c.get("/api/runs").json()["runs"]}
    assert runs["student"]["student"] == {"method": "consistency", "sampler": "consistency", "spacing": "trailing",
                                          "eta": None, "steps": 2}
    assert runs["progressive"]["student"]["sampler"] == "ddim" and runs["progressive"]["student"]["eta"] == 0.0
    r = c.post("/api/sample", json={"run": "student", "sampler": "consistency", "steps": 2, "spacing": "trailing",
                                    "eta": None, "n": 2})
    assert r.status_code == 201, r.text
    evs = events(c, r.json()["id"])
    assert evs[-1]["type"] == "done" and [e["done"] for e in evs if e["type"] == "frame"] == [1, 2]
