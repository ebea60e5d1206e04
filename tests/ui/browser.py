"""Debian's headless Chromium driven by Playwright, and `ddpm ui` as a subprocess: for the page's
browser tests and bench/ui_latency.py (Playwright's own browser download needs the internet).
Test code: it lives with the tests, not in the package."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

CHROMIUM = os.environ.get("DDPM_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
HOW_TO_INSTALL = ("install Debian's Chromium (`apt-get install chromium`, or `make browser` as root) and the "
                  "test extra (`pip install -e '.[test]'`, which brings playwright); "
                  "or point DDPM_CHROMIUM at a Chromium binary")


class BrowserMissing(RuntimeError):
    """No Chromium or no Playwright here; the message says how to install them."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def chromium(user_data_dir: Path, viewport: tuple[int, int] = (1280, 900),
             args: tuple[str, ...] = ()) -> Iterator[Any]:
    """A Playwright browser context on a new, empty profile in ``user_data_dir``; ``args``: more
    Chromium switches (e.g. ``--host-resolver-rules=MAP evil.example 127.0.0.1``)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise BrowserMissing(f"playwright is not installed: {HOW_TO_INSTALL}") from None
    exe = CHROMIUM if os.path.isfile(CHROMIUM) else shutil.which("chromium")
    if exe is None:
        raise BrowserMissing(f"no Chromium at {CHROMIUM}: {HOW_TO_INSTALL}")
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            str(user_data_dir), executable_path=exe, headless=True, args=[*CHROMIUM_ARGS, *args],
            viewport={"width": viewport[0], "height": viewport[1]})
        try:
            yield ctx
        finally:
            ctx.close()


@contextmanager
def ui_server(runs: list[str], runs_dir: str | Path, *, threads: int | None = None,
              timeout: float = 60.0) -> Iterator[str]:
    """`ddpm ui RUN... --runs DIR` on a free port of 127.0.0.1; yields its address."""
    port = free_port()
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the `ddpm` command runs (ddpm.runtime.env)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "ddpm.cli", "ui", *runs, "--runs", str(runs_dir), "--port", str(port),
           "--device", "cpu"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(url + "api/meta", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    out = proc.stdout.read() if proc.stdout else ""
                    raise RuntimeError(f"`ddpm ui` did not start (exit {proc.poll()}): {out}") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
