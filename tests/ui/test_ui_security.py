"""`ddpm ui` answers only its own page: the Host it serves, its own Origin, JSON (or its header) for
anything that changes state, no framing, the token off loopback; and every request is bounded
(images, work, bytes, pixels, nesting) before any work starts."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
from PIL import Image
from starlette.testclient import TestClient

from ddpm.ui import limits
from ddpm.ui.app import create_app
from ddpm.ui.guard import access_for
from ddpm.ui.jobs import JobStore
from ddpm.ui.runs import RunIndex
from helpers import tiny_run

PAGE = {"X-DDPM-Token": ""}  # what the page's script sends with every request
SAMPLE = {"run": "run", "sampler": "ddim", "steps": 3, "n": 2}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, image_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("sec")
    tiny_run(root, image_dir, num_classes=2, max_steps=2)
    return root


class CountingStore(JobStore):
    """The page's job store, counting the jobs it was asked to start."""

    started = 0

    def start(self, *args, **kw):
        self.started += 1
        return super().start(*args, **kw)


@pytest.fixture()
def store() -> CountingStore:
    return CountingStore()


def client_for(runs: Path, store: JobStore, host: str = "127.0.0.1", port: int = 8000,
               base: str | None = None, allow: tuple[str, ...] = (), **kw) -> TestClient:
    app = create_app(RunIndex([], runs), jobs=store, access=access_for(host, port, allow))
    return TestClient(app, base_url=base or f"http://127.0.0.1:{port}", **kw)


@pytest.mark.parametrize("host", ["evil.example:8000", "127.0.0.1:9999", "localhost.evil.example:8000",
                                  "192.168.1.5:8000", ""])
def test_a_host_that_is_not_the_address_served_is_refused(runs: Path, store: JobStore, host: str) -> None:
    c = client_for(runs, store)
    for path in ("/", "/api/runs", "/api/runs/run/log"):
        r = c.get(path, headers={"host": host})
        assert r.status_code == 421 and "does not answer to the name" in r.json()["error"], (path, host)
    assert c.post("/api/sample", json=SAMPLE, headers={"host": host, **PAGE}).status_code == 421
    assert store.started == 0


@pytest.mark.parametrize("host", ["127.0.0.1:8000", "localhost:8000", "[::1]:8000", "LOCALHOST:8000"])
def test_the_loopback_names_of_the_port_served_are_answered(runs: Path, store: JobStore, host: str) -> None:
    assert client_for(runs, store).get("/api/runs", headers={"host": host}).status_code == 200


def test_names_the_user_allows_are_answered(runs: Path, store: JobStore) -> None:
    c = client_for(runs, store, allow=("ddpm.lan",))
    assert c.get("/api/meta", headers={"host": "ddpm.lan:8000"}).status_code == 200
    assert c.get("/api/meta", headers={"host": "other.lan:8000"}).status_code == 421


def test_another_sites_posts_start_nothing(runs: Path, store: JobStore) -> None:
    c = client_for(runs, store)
    # a page elsewhere: no-cors POSTs (text/plain, no custom header), or with its own Origin
    cases = [({"content-type": "text/plain"}, 415),
             ({"content-type": "text/plain", "origin": "http://evil.example"}, 403),
             ({"content-type": "application/json", "origin": "http://evil.example", **PAGE}, 403),
             ({"content-type": "application/json", "origin": "http://127.0.0.1:9999", **PAGE}, 403),
             ({"content-type": "application/json", "sec-fetch-site": "cross-site", **PAGE}, 403),
             ({"content-type": "application/x-www-form-urlencoded"}, 415)]
    for headers, status in cases:
        for path in ("/api/sample", "/api/edit", "/api/upload?run=run"):
            r = c.post(path, content=json.dumps(SAMPLE), headers=headers)
            assert r.status_code == status, (path, headers, r.text)
    assert store.started == 0
    ok = c.post("/api/sample", json=SAMPLE, headers={"origin": "http://127.0.0.1:8000", **PAGE})
    assert ok.status_code == 201  # the page's own origin


def test_a_cancel_from_elsewhere_is_refused(runs: Path, store: JobStore) -> None:
    c = client_for(runs, store)
    job = c.post("/api/sample", json={**SAMPLE, "steps": 20}, headers=PAGE).json()["id"]
    assert c.post(f"/api/jobs/{job}/cancel", headers={"content-type": "text/plain"}).status_code == 415
    assert c.post(f"/api/jobs/{job}/cancel", headers=PAGE).status_code == 200


def test_every_answer_forbids_framing(runs: Path, store: JobStore) -> None:
    c = client_for(runs, store)
    for r in (c.get("/"), c.get("/api/runs"), c.get("/api/runs/nope/log"), c.get("/", headers={"host": "x:1"})):
        assert r.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
        assert r.headers["x-content-type-options"] == "nosniff"


def test_off_loopback_every_request_needs_the_token(runs: Path, store: JobStore) -> None:
    access = access_for("0.0.0.0", 8000)
    assert access.token and len(access.token) >= 32
    app = create_app(RunIndex([], runs), jobs=store, access=access)
    c = TestClient(app, base_url="http://127.0.0.1:8000")
    assert c.get("/").status_code == 403 and c.get("/api/runs").status_code == 403
    assert c.get("/api/runs", headers={"X-DDPM-Token": "wrong"}).status_code == 403
    assert c.get("/api/runs", params={"token": access.token[:-1]}).status_code == 403
    assert c.post("/api/sample", json=SAMPLE, headers=PAGE).status_code == 403 and store.running() == 0
    assert c.get("/api/runs", headers={"X-DDPM-Token": access.token}).status_code == 200
    first = c.get("/", params={"token": access.token})  # the address printed at start
    assert first.status_code == 200 and access.cookie in first.headers["set-cookie"]
    assert "samesite=strict" in first.headers["set-cookie"].lower()
    assert c.get("/api/runs").status_code == 200  # the cookie it set: the page's pictures load
    assert access_for("127.0.0.1", 8000).token is None and access_for("::1", 8000).token is None


def test_the_address_printed_off_loopback_carries_the_token(runs: Path, monkeypatch, capsys) -> None:
    import uvicorn

    from ddpm.ui import app as ui_app
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: None)
    monkeypatch.setattr(ui_app, "_check_port", lambda host, port: None)
    ui_app.serve([], str(runs), host="0.0.0.0", port=8123)
    line = capsys.readouterr().out
    assert "http://127.0.0.1:8123/?token=" in line and "with the token" in line
    ui_app.serve([], str(runs), host="127.0.0.1", port=8124)
    assert "token" not in capsys.readouterr().out


def test_a_list_of_thousands_of_classes_is_refused(runs: Path, store: JobStore) -> None:
    c = client_for(runs, store, headers=PAGE)
    r = c.post("/api/sample", json={**SAMPLE, "classes": ",".join(["c0", "c1"] * 2500)})
    assert r.status_code == 400 and "5,000 classes" in r.json()["error"] and "64" in r.json()["error"]
    assert store.started == 0


def test_resampling_a_billion_times_is_refused_before_any_work(runs: Path, store: JobStore, image_dir) -> None:
    c = client_for(runs, store, headers=PAGE)
    size = 8
    body = {**SAMPLE, "mode": "inpaint", "image": {"index": 0}, "keep": [1] * (size * size // 2) + [0] * (size * size // 2),
            "jump_length": 1, "resample": 1_000_000_000}
    r = c.post("/api/edit", json=body)
    assert r.status_code == 400 and "network evaluations" in r.json()["error"], r.text
    assert f"{limits.MAX_WORK:,}" in r.json()["error"] and store.running() == 0


def test_work_is_images_times_evaluations(runs: Path, store: JobStore, monkeypatch) -> None:
    c = client_for(runs, store, headers=PAGE)
    monkeypatch.setattr(limits, "MAX_WORK", 2 * 10 * 2 - 1)  # 2 images x 10 steps x 2 passes, less one
    r = c.post("/api/sample", json={**SAMPLE, "steps": 10, "classes": "c0", "guidance": 1.0})
    assert r.status_code == 400 and "40 network evaluations" in r.json()["error"]
    assert c.post("/api/sample", json={**SAMPLE, "steps": 10, "classes": "c0"}).status_code == 201


def test_an_upload_is_read_only_up_to_its_limit(runs: Path, store: JobStore, monkeypatch) -> None:
    import asyncio

    from starlette.requests import Request

    read = []

    async def receive():  # a body of 100 chunks of 100 bytes, with no Content-Length
        read.append(1)
        return {"type": "http.request", "body": b"x" * 100, "more_body": len(read) < 100}

    request = Request({"type": "http", "method": "POST", "headers": []}, receive)
    with pytest.raises(limits.TooLarge, match="more than 1,000 bytes"):
        asyncio.run(limits.read_body(request, 1000, "the image"))
    assert len(read) == 11  # abandoned at the first chunk past the limit, not read to the end
    c = client_for(runs, store, headers=PAGE)
    monkeypatch.setattr("ddpm.ui.app.MAX_UPLOAD", 1000)
    r = c.post("/api/upload?run=run", content=b"x" * 2000)  # declared too large: refused before reading
    assert r.status_code == 413 and "2,000 bytes" in r.json()["error"]


def test_an_upload_of_too_many_pixels_is_refused_from_its_header(runs: Path, store: JobStore) -> None:
    buf = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buf, "PNG")  # a small file of 144 M pixels
    assert len(buf.getvalue()) < 100_000
    c = client_for(runs, store, headers=PAGE)
    r = c.post("/api/upload?run=run", content=buf.getvalue())
    assert r.status_code == 400 and "12,000 x 12,000 pixels" in r.json()["error"]
    assert f"{limits.MAX_UPLOAD_PIXELS:,}" in r.json()["error"]


def test_an_upload_is_decoded_once_at_the_runs_size(runs: Path, store: JobStore, image_dir: Path) -> None:
    app = create_app(RunIndex([], runs), jobs=store, access=access_for("127.0.0.1", 8000))
    c = TestClient(app, base_url="http://127.0.0.1:8000", headers=PAGE)
    buf = io.BytesIO()
    Image.new("RGB", (300, 200), (200, 10, 10)).save(buf, "PNG")
    key = c.post("/api/upload?run=run", content=buf.getvalue()).json()["upload"]
    kept = app.state.uploads[key]
    assert tuple(kept.image.shape) == (1, 8, 8) and not isinstance(kept, bytes)
    assert c.get(f"/api/runs/run/forward.png?upload={key}").status_code == 200
    assert c.post("/api/upload?run=nope", content=buf.getvalue()).status_code == 404


@pytest.mark.parametrize("seed", [2**70, -1, 2**62 + 1])
def test_a_forward_seed_out_of_range_is_a_400(runs: Path, store: JobStore, seed: int) -> None:
    r = client_for(runs, store).get(f"/api/runs/run/forward.png?seed={seed}")
    assert r.status_code == 400 and "seed" in r.json()["error"]
    assert client_for(runs, store).get(f"/api/runs/run/forward.png?seed={2**62}").status_code == 200


def test_deeply_nested_json_is_a_400(runs: Path, store: JobStore) -> None:
    c = client_for(runs, store, headers=PAGE)
    r = c.post("/api/sample", content="[" * 100_000 + "]" * 100_000, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]


def test_nan_and_infinity_in_a_log_are_null(runs: Path, store: JobStore) -> None:
    log = runs / "run" / "log.jsonl"
    saved = log.read_text()
    try:
        with log.open("a") as f:
            f.write('{"step": 99, "loss": NaN, "grad_norm": Infinity, "lr": -Infinity}\n')
        r = client_for(runs, store).get("/api/runs/run/log?after=98")
        assert r.status_code == 200
        assert r.json()["records"][-1] | {} == {"step": 99, "loss": None, "grad_norm": None, "lr": None}
    finally:
        log.write_text(saved)


def test_a_run_folder_named_in_bytes_that_are_not_utf8_does_not_break_the_list(runs: Path, store: JobStore) -> None:
    import os
    import shutil

    odd = os.path.join(os.fsencode(runs), b"run-\xff")
    shutil.copytree(runs / "run", os.fsdecode(odd))
    try:
        r = client_for(runs, store).get("/api/runs")
        assert r.status_code == 200 and [x["name"] for x in r.json()["runs"]] == ["run"]
    finally:
        shutil.rmtree(odd)


def test_bounds_leave_the_page_its_limits(runs: Path, store: JobStore) -> None:
    c = client_for(runs, store, headers=PAGE)
    assert c.post("/api/sample", json={**SAMPLE, "n": 64, "classes": "all"}).status_code == 201
    assert math.isfinite(limits.MAX_WORK) and limits.MAX_IMAGES == 64
