"""`ddpm ui` end to end in a real headless Chromium (Debian's, driven by Playwright).

Where Chromium or Playwright cannot be had these tests FAIL, saying how to install them:
CI must run them, never skip them silently.
"""
from __future__ import annotations

import http.server
import json
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import pytest

from ddpm.cli import main
from browser import BrowserMissing, chromium, ui_server
from helpers import tiny_config, write_config

pytestmark = pytest.mark.slow  # the whole file: see pyproject's markers

T = 1000  # diffusion steps of the tiny run: the ancestral sampler's 1000 steps take long enough to cancel
REBOUND = "evil.example"
SCREENSHOT = os.environ.get("DDPM_UI_SCREENSHOT")  # where to keep the sample panel's picture


def train_tiny(root: Path, image_dir: Path) -> None:
    cfg = tiny_config(image_dir, max_steps=2, sample_every=2)
    cfg = replace(cfg, diffusion=replace(cfg.diffusion, timesteps=T))
    assert main(["train", "--config", str(write_config(root.parent / "cfg.json", cfg)),
                 "--out", str(root / "tiny"), "--no-progress", "--no-tensorboard"]) == 0


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory, image_dir: Path) -> Iterator[Any]:
    """The page of `ddpm ui --runs DIR` in Chromium, DIR holding a tiny run trained meanwhile
    (the three start side by side: the server lists run folders as they appear)."""
    root = tmp_path_factory.mktemp("uiruns")
    training = ThreadPoolExecutor(1).submit(train_tiny, root, image_dir)
    try:
        # evil.example resolves to this machine, as DNS rebinding makes a foreign name do
        browser = chromium(tmp_path_factory.mktemp("profile"), args=(f"--host-resolver-rules=MAP {REBOUND} 127.0.0.1",))
        ctx = browser.__enter__()
    except BrowserMissing as e:
        pytest.fail(f"the browser tests need a browser: {e}", pytrace=False)
    try:
        with ui_server([], root) as url:
            training.result()
            pg = ctx.new_page()
            pg.set_default_timeout(20_000)
            pg.errors = []  # console errors and uncaught exceptions, checked at the end
            pg.runs_root = root
            pg.on("console", lambda m: m.type == "error" and pg.errors.append(f"{m.text} ({m.location})"))
            pg.on("pageerror", lambda e: pg.errors.append(str(e)))
            pg.goto(url)
            pg.wait_for_function("document.querySelector('#run').options.length > 0")
            yield pg
    finally:
        browser.__exit__(None, None, None)


def shown_images(pg: Any, panel: str) -> list[dict[str, Any]]:
    return pg.eval_on_selector_all(f"{panel} img", """imgs => imgs.filter(i => i.offsetParent !== null)
        .map(i => ({id: i.id, complete: i.complete, w: i.naturalWidth, h: i.naturalHeight}))""")


def set_form(pg: Any, form: str, **values: Any) -> None:
    for k, v in values.items():
        sel = f"{form} [name={k}]"
        if pg.eval_on_selector(sel, "e => e.tagName") == "SELECT":
            pg.select_option(sel, str(v))
        else:
            pg.fill(sel, str(v))


def test_sample_stream_scrub_cancel_forward(page: Any, tmp_path: Path) -> None:
    pg = page
    set_form(pg, "#sample-form", sampler="ddim", steps=20, n=9, seed=1)
    pg.click("#sample-go")
    pg.wait_for_function("window.ddpmTimings.done !== undefined")
    assert pg.evaluate("state.frames.length") == 20
    assert "20 network evaluations" in pg.inner_text("#sample-status")
    imgs = shown_images(pg, "#panel-sample")
    assert {i["id"] for i in imgs} == {"img-xt", "img-x0"}
    for i in imgs:  # 9 images of 8x8: 3 per row, 2 px padding -> 32 x 32, decoded
        assert i["complete"] and (i["w"], i["h"]) == (32, 32), i
    assert pg.is_visible("#downloads")
    grid = pg.request.get(pg.eval_on_selector("#dl-grid", "a => a.href"))
    assert grid.ok and grid.body()[:4] == b"\x89PNG"
    pg.locator("#panel-sample").screenshot(path=SCREENSHOT or str(tmp_path / "ui-sample.png"))

    last = pg.locator("#img-xt").screenshot()
    pg.fill("#scrub", "0")  # back to the first step: noisier
    pg.wait_for_function("document.querySelector('#scrub-label').textContent.startsWith('step 1 of')")
    pg.wait_for_function("document.querySelector('#img-xt').complete")
    assert pg.locator("#img-xt").screenshot() != last
    assert all(i["complete"] and i["w"] == 32 for i in shown_images(pg, "#panel-sample"))

    # a second sample, cancelled mid-way: the page says so and keeps what it had
    set_form(pg, "#sample-form", sampler="ddpm", steps=T, n=16)
    pg.click("#sample-go")
    pg.wait_for_function("state.frames.length >= 3")
    pg.click("#sample-cancel")
    pg.wait_for_function("document.querySelector('#sample-status').textContent.startsWith('cancelled')")
    assert 3 <= pg.evaluate("state.frames.length") < T
    assert pg.is_enabled("#sample-go") and pg.is_hidden("#error")

    # the forward process: the slider moves t, the picture and the curves follow
    pg.click("nav button[data-tab=forward]")
    pg.wait_for_function("document.querySelector('#fwd-img').naturalWidth > 0")
    assert pg.evaluate("document.querySelector('#fwd-img').naturalWidth") == 32  # x0 | x_t | noise
    before = pg.locator("#fwd-img").screenshot()
    pg.fill("#fwd-t", str(T - 1))
    pg.wait_for_function(f"document.querySelector('#fwd-readout').textContent.startsWith('t = {T - 1}')")
    pg.wait_for_timeout(300)
    assert pg.locator("#fwd-img").screenshot() != before
    assert pg.evaluate("""(() => { const c = document.querySelector('#chart-snr'), d = c.getContext('2d')
        .getImageData(0, 0, c.width, c.height).data; let ink = 0;
        for (let i = 0; i < d.length; i += 4) ink += d[i + 3] > 0; return ink; })()""") > 1000
    assert pg.errors == [], pg.errors


def test_compare_and_training(page: Any) -> None:
    pg = page
    pg.click("nav button[data-tab=compare]")
    set_form(pg, "#compare-form", n=4)
    pg.click("#compare-go")
    pg.wait_for_function("document.querySelectorAll('#compare-out .col p').length == 2 && "
                         "[...document.querySelectorAll('#compare-out .col p')].every(p => p.textContent.includes('NFE'))")
    texts = pg.eval_on_selector_all("#compare-out .col p", "ps => ps.map(p => p.textContent)")
    assert texts[0].startswith("NFE 20 ") and texts[1].startswith("NFE 10 "), texts
    assert all(i["w"] == 22 for i in shown_images(pg, "#panel-compare"))  # 4 images: 2 x 2 tiles

    pg.click("nav button[data-tab=training]")
    pg.wait_for_function("document.querySelector('#train-status').textContent.startsWith('step 2')")
    pg.wait_for_function("document.querySelector('#train-sample').naturalWidth > 0")
    assert pg.errors == [], pg.errors


def test_edit_panel_paints_a_mask_and_inpaints(page: Any) -> None:
    pg = page
    pg.click("nav button[data-tab=edit]")
    pg.wait_for_function("edit.img !== null && edit.keep !== null")
    box = pg.locator("#edit-canvas").bounding_box()  # paint a stroke over the right part
    pg.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + box["height"] * 0.2)
    pg.mouse.down()
    pg.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + box["height"] * 0.8, steps=8)
    pg.mouse.up()
    painted = pg.evaluate("edit.keep.filter(v => v === 0).length")
    assert 0 < painted < 64
    set_form(pg, "#edit-form", steps=4, n=2, jump_length=2, resample=2)
    pg.click("#edit-go")
    pg.wait_for_function("document.querySelector('#edit-result').naturalWidth > 0")
    assert pg.evaluate("document.querySelector('#edit-result').naturalWidth") == 42  # input | mask | 2 results
    assert "network evaluations" in pg.inner_text("#edit-status")
    set_form(pg, "#edit-form", mode="edit")
    pg.click("#edit-go")
    pg.wait_for_function("document.querySelector('#edit-status').textContent.includes('network evaluations')")
    assert pg.errors == [], pg.errors


def test_bad_parameters_show_a_message(page: Any) -> None:
    # a bad parameter: a message on the page, no traceback (the 400 itself is logged by Chromium)
    pg = page
    pg.click("nav button[data-tab=sample]")
    set_form(pg, "#sample-form", steps=0)
    pg.click("#sample-go")
    pg.wait_for_selector("#error:not([hidden])")
    msg = pg.inner_text("#error")
    assert "steps" in msg and "Traceback" not in msg
    assert all("400" in e for e in pg.errors), pg.errors


def test_a_student_samples_as_it_was_trained(page: Any) -> None:
    """A distilled run picked in the list sets the student's own sampler and steps, and samples
    with them (a consistency student: 2 steps, 2 network evaluations)."""
    pg = page
    shutil.copytree(pg.runs_root / "tiny", pg.runs_root / "student")
    (pg.runs_root / "student" / "distill.json").write_text(json.dumps(
        {"teacher": "elsewhere", "method": "consistency", "teacher_steps": 8, "student_steps": 2}))
    errors_before = len(pg.errors)
    pg.reload()
    pg.wait_for_function("[...document.querySelector('#run').options].some(o => o.value === 'student')")
    pg.select_option("#run", "student")
    assert pg.eval_on_selector("#sample-form [name=sampler]", "e => e.value") == "consistency"
    assert pg.eval_on_selector("#sample-form [name=steps]", "e => e.value") == "2"
    pg.click("nav button[data-tab=sample]")
    set_form(pg, "#sample-form", n=4)
    pg.click("#sample-go")
    pg.wait_for_function("window.ddpmTimings.done !== undefined")
    assert pg.evaluate("state.frames.length") == 2
    assert "2 network evaluations" in pg.inner_text("#sample-status")
    assert pg.errors[errors_before:] == [], pg.errors


def test_autoguidance_where_the_run_kept_a_guide(page: Any) -> None:
    """A run with RUN/guide shows the autoguidance field, and sampling with it costs one more
    pass per step; a run without one hides it."""
    pg = page
    shutil.copytree(pg.runs_root / "tiny", pg.runs_root / "guided")
    latest = (pg.runs_root / "tiny" / "latest").read_text().strip()
    shutil.copytree(pg.runs_root / "tiny" / "checkpoints" / latest, pg.runs_root / "guided" / "guide")
    errors_before = len(pg.errors)
    pg.reload()
    pg.wait_for_function("[...document.querySelector('#run').options].some(o => o.value === 'guided')")
    pg.select_option("#run", "tiny")
    assert pg.eval_on_selector("#sample-form .ag", "e => e.hidden")
    pg.select_option("#run", "guided")
    assert not pg.eval_on_selector("#sample-form .ag", "e => e.hidden")
    pg.click("nav button[data-tab=sample]")
    set_form(pg, "#sample-form", sampler="ddim", steps=3, n=4, autoguidance=1)
    pg.click("#sample-go")
    pg.wait_for_function("window.ddpmTimings.done !== undefined")
    assert "6 network evaluations" in pg.inner_text("#sample-status")
    assert pg.errors[errors_before:] == [], pg.errors


def test_nothing_broken_before_the_first_picture(page: Any) -> None:
    """A fresh page shows no broken-image icon in any panel: a picture appears once there is one."""
    pg = page
    errors_before = len(pg.errors)
    pg.reload()
    pg.wait_for_function("document.querySelector('#run').options.length > 0")
    for tab in ("sample", "compare", "edit"):
        pg.click(f"nav button[data-tab={tab}]")
        assert [i for i in shown_images(pg, f"#panel-{tab}") if i["w"] == 0] == [], tab
    assert pg.errors[errors_before:] == [], pg.errors


def test_a_conditional_runs_default_view_is_a_grid_of_the_count_asked(page: Any, tmp_path: Path,
                                                                        image_dir: Path) -> None:
    """The form's defaults on a class-conditional run draw a square grid (not one long row), and
    "all" draws exactly the number of images asked for, a row per class."""
    from helpers import tiny_run

    pg = page
    errors_before = len(pg.errors)
    shutil.copytree(tiny_run(tmp_path, image_dir, num_classes=3, max_steps=1), pg.runs_root / "cond")
    pg.reload()
    pg.wait_for_function("[...document.querySelector('#run').options].some(o => o.value === 'cond')")
    pg.select_option("#run", "cond")
    pg.click("nav button[data-tab=sample]")
    set_form(pg, "#sample-form", sampler="ddim", steps=2)  # the rest as the page starts: 16 images
    pg.click("#sample-go")
    pg.wait_for_function("window.ddpmTimings.done !== undefined")
    grid = pg.eval_on_selector("#img-x0", "i => [i.naturalWidth, i.naturalHeight, i.getBoundingClientRect().width]")
    assert grid[:2] == [42, 42] and grid[2] >= 3 * 42, grid  # 4 x 4 tiles of 8 px, enlarged
    set_form(pg, "#sample-form", classes="all", n=16)
    pg.click("#sample-go")
    pg.wait_for_function("document.querySelector('#sample-status').textContent.startsWith('16 images')")
    assert pg.eval_on_selector("#img-x0", "i => [i.naturalWidth, i.naturalHeight]") == [62, 32]  # 6 + 5 + 5
    assert pg.errors[errors_before:] == [], pg.errors


def test_switching_runs_mid_sample_stops_the_old_one(page: Any) -> None:
    pg = page
    errors_before = len(pg.errors)
    if not (pg.runs_root / "tiny-copy").exists():
        shutil.copytree(pg.runs_root / "tiny", pg.runs_root / "tiny-copy")
    pg.reload()
    pg.wait_for_function("[...document.querySelector('#run').options].some(o => o.value === 'tiny-copy')")
    pg.select_option("#run", "tiny")
    set_form(pg, "#sample-form", sampler="ddpm", steps=T, n=4)
    pg.click("#sample-go")
    pg.wait_for_function("state.frames.length >= 3")
    old = pg.evaluate("state.job.id")
    pg.select_option("#run", "tiny-copy")
    pg.wait_for_timeout(500)  # long enough for many more of the old job's frames, were they still drawn
    assert pg.evaluate("state.frames.length") == 0 and pg.evaluate("state.job") is None
    assert pg.eval_on_selector("#img-xt", "i => i.hasAttribute('src')") is False
    assert pg.is_enabled("#sample-go") and pg.is_hidden("#downloads")
    last = pg.evaluate(f"fetch('/api/jobs/{old}/events').then(r => r.text())").strip().splitlines()[-1]
    assert json.loads(last[len("data: "):])["type"] == "cancelled"  # the server stopped it too
    assert pg.errors[errors_before:] == [], pg.errors


def test_the_forward_slider_asks_only_for_the_latest_t(page: Any) -> None:
    """A drag across 40 values of t sends a request or two, never two at once, and the picture
    shown is the last t's."""
    pg = page
    errors_before = len(pg.errors)
    pg.select_option("#run", "tiny")
    pg.click("nav button[data-tab=forward]")
    pg.wait_for_function("document.querySelector('#fwd-img').naturalWidth > 0")
    pg.wait_for_timeout(300)
    seen, flight = [], {"now": 0, "most": 0}

    def started(req: Any) -> None:
        if "forward.png" in req.url:
            seen.append(req.url)
            flight["now"] += 1
            flight["most"] = max(flight["most"], flight["now"])

    def ended(req: Any) -> None:
        if "forward.png" in req.url:
            flight["now"] -= 1

    pg.on("request", started)
    pg.on("requestfinished", ended)
    pg.on("requestfailed", ended)
    try:
        for t in range(1, 41):  # a drag: one input event every 10 ms
            pg.evaluate(f"(() => {{ const s = document.querySelector('#fwd-t'); s.value = {t * 20};"
                        "s.dispatchEvent(new Event('input')); })()")
            pg.wait_for_timeout(10)
        pg.wait_for_function("document.querySelector('#fwd-readout').textContent.startsWith('t = 800')")
        for _ in range(100):  # until the network has been quiet a while
            pg.wait_for_timeout(300)
            if flight["now"] == 0 and "t=800" in seen[-1]:
                break
    finally:
        pg.remove_listener("request", started)
        pg.remove_listener("requestfinished", ended)
        pg.remove_listener("requestfailed", ended)
    assert 1 <= len(seen) <= 4 and "t=800" in seen[-1], seen
    assert flight["most"] == 1, flight
    assert pg.errors[errors_before:] == [], pg.errors


def test_downloads_of_a_dropped_sample_say_so(page: Any) -> None:
    """A download works while the server keeps the sample; once later samples have pushed it out,
    the link says so on the page instead of failing silently."""
    pg = page
    errors_before = len(pg.errors)
    pg.select_option("#run", "tiny")
    pg.click("nav button[data-tab=sample]")
    set_form(pg, "#sample-form", sampler="ddim", steps=2, n=1)
    pg.click("#sample-go")
    pg.wait_for_selector("#downloads:not([hidden])")
    with pg.expect_download() as got:
        pg.click("#dl-grid")
    assert Path(got.value.path()).read_bytes()[:4] == b"\x89PNG"
    later = pg.evaluate("""async () => { const url = document.querySelector('#dl-grid').href;
      for (let i = 1; i <= 20; i++) {  // later samples, as other tabs make, until the server drops this one
        const job = await postJSON('/api/sample', {run: 'tiny', sampler: 'ddim', steps: 1, n: 1});
        await new Promise(done => { const es = new EventSource(`/api/jobs/${job.id}/events`);
          es.onmessage = m => { if (JSON.parse(m.data).type === 'done') { es.close(); done(); } }; });
        if ((await fetch(url, {method: 'HEAD'})).status === 404) return i; } }""")
    assert later is not None and later >= 8, later  # it outlived the eight the server keeps
    pg.click("#dl-grid")
    pg.wait_for_selector("#error:not([hidden])")
    assert "no such sample" in pg.inner_text("#error") and "keeps the files of the latest" in pg.inner_text("#error")
    assert pg.is_hidden("#downloads")
    assert all("404" in e for e in pg.errors[errors_before:]), pg.errors


def test_run_state_follows_the_run_folder(page: Any) -> None:
    """A run that gets its checkpoint while the page is open: the header shows it, and says when
    training has stopped, without a reload."""
    pg = page
    errors_before = len(pg.errors)
    later, tiny = pg.runs_root / "later", pg.runs_root / "tiny"
    later.mkdir()
    shutil.copy(tiny / "config.json", later / "config.json")
    shutil.copy(tiny / "log.jsonl", later / "log.jsonl")  # written just now: training
    pg.reload()
    pg.wait_for_function("[...document.querySelector('#run').options].some(o => o.value === 'later')")
    pg.select_option("#run", "later")
    info = pg.inner_text("#run-info")
    assert "no checkpoint yet" in info and "training now" in info, info
    shutil.copytree(tiny / "checkpoints", later / "checkpoints")
    shutil.copy(tiny / "latest", later / "latest")  # the final checkpoint: training is over
    pg.wait_for_function("document.querySelector('#run-info').textContent.includes('step-00000002')",
                         timeout=10_000)
    assert "training now" not in pg.inner_text("#run-info")
    pg.click("nav button[data-tab=training]")
    pg.wait_for_function("document.querySelector('#train-status').textContent.includes('not training now')")
    assert pg.errors[errors_before:] == [], pg.errors


def test_a_dead_server_is_named(page: Any) -> None:
    """A server that does not answer: the page says so in words, not "Failed to fetch"."""
    pg = page
    errors_before = len(pg.errors)
    pg.click("nav button[data-tab=sample]")
    pg.route("**/api/**", lambda route: route.abort("connectionrefused"))
    try:
        pg.click("#sample-go")
        pg.wait_for_selector("#error:not([hidden])")
        assert pg.inner_text("#error") == "the ddpm ui server is not answering (stopped?)"
    finally:
        pg.unroute("**/api/**")
    assert all("ERR_CONNECTION_REFUSED" in e for e in pg.errors[errors_before:]), pg.errors


@contextmanager
def site_elsewhere(html: str) -> Iterator[str]:
    """Another web site: ``html`` served at http://127.0.0.2:PORT/ (another loopback address,
    so another origin than the page's 127.0.0.1)."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = html.encode()
            self.send_response(200)
            self.send_header("content-type", "text/html")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.2", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.2:{server.server_address[1]}/"
    finally:
        server.shutdown()


ATTACK = """<!doctype html><iframe id=f src="{ui}"></iframe><script>
window.result = (async () => {{
  const body = JSON.stringify({{run: "tiny", sampler: "ddpm", steps: 1000, n: 64}});
  for (let i = 0; i < 4; i++)  // what a page can send anywhere without asking: no-cors, text/plain
    await fetch("{ui}api/sample", {{method: "POST", mode: "no-cors", headers: {{"Content-Type": "text/plain"}}, body}});
  const read = await fetch("{ui}api/runs").then(r => r.text()).catch(e => "refused: " + e.name);
  const json = await fetch("{ui}api/sample", {{method: "POST", headers: {{"Content-Type": "application/json"}}, body}})
    .then(r => r.status).catch(e => "refused: " + e.name);
  return {{read, json}};
}})();
</script>"""


def test_a_page_on_another_site_can_neither_start_read_nor_frame(page: Any) -> None:
    pg = page
    ui = pg.url.split("?")[0].rsplit("/", 1)[0] + "/"
    seen: list[tuple[str, str, int]] = []
    with site_elsewhere(ATTACK.format(ui=ui)) as evil:
        other = pg.context.new_page()
        other.on("response", lambda r: r.url.startswith(ui) and seen.append((r.request.method, r.url, r.status)))
        try:
            other.goto(evil)
            result = other.evaluate("window.result")
            frame_text = other.frames[1].evaluate("document.body ? document.body.innerText : ''")
        finally:
            other.close()
    assert result["read"].startswith("refused") and result["json"].startswith("refused"), result
    posts = [status for method, url, status in seen if method == "POST" and url.endswith("/api/sample")]
    assert len(posts) == 4 and set(posts) <= {403, 415}, seen
    assert "Sample" not in frame_text  # the page refused to be framed
    set_form(pg, "#sample-form", sampler="ddim", steps=3, n=4, seed=0)  # the user's own click still works
    pg.click("nav button[data-tab=sample]")
    pg.click("#sample-go")
    pg.wait_for_function("window.ddpmTimings.done !== undefined && !document.querySelector('#sample-cancel:not([disabled])')")
    assert "already running" not in pg.inner_text("#error")


def test_a_foreign_name_resolving_to_this_machine_is_refused(page: Any) -> None:
    """DNS rebinding: a foreign name that resolves to 127.0.0.1 loads nothing of the page."""
    port = int(page.url.split(":")[2].split("/")[0])
    pg = page.context.new_page()
    try:
        r = pg.goto(f"http://{REBOUND}:{port}/")
        assert r.status == 421 and "does not answer to the name" in pg.inner_text("body")
        assert pg.evaluate("fetch('/api/runs').then(r => r.status)") == 421
    finally:
        pg.close()
