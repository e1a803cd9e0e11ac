"""`saetune explore` served for real and driven in headless Chromium (Debian's `chromium`).

Checks that the Features and Traces pages render in a browser, that a trace holding
``<script>``/``<img onerror>`` shows them as text and fires no dialog, and prints the Features
page's load time and the explorer process's memory (BENCHMARKS.md). Screenshots go to the test's
tmp dir; with ``SAETUNE_UPDATE_DOCS=1`` also to ``docs/``. ``SAETUNE_EXPLORE_RUN_DIR`` serves
another run dir (e.g. a full demo) instead of the small test pipeline.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from explorer_fixtures import XSS, pipeline_dir

CHROMIUM = "/usr/bin/chromium"
DOCS = Path(__file__).resolve().parents[1] / "docs"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mib(pid: int) -> float:
    """Resident memory of a process and its children (MiB), from /proc."""
    total = 0
    pids = [pid]
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
        pids += [int(p) for p in out]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    run = Path(os.environ.get("SAETUNE_EXPLORE_RUN_DIR") or pipeline_dir(tmp_path_factory))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    logs = tmp_path_factory.mktemp("explore")
    for attempt in range(3):  # a port free when picked can be taken before Streamlit binds it: then another
        port = _free_port()
        log = open(logs / f"explore{attempt}.log", "w+")
        proc = subprocess.Popen([sys.executable, "-m", "saetune.cli", "explore", str(run), "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        url = f"http://127.0.0.1:{port}"
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 180:
            try:
                if urllib.request.urlopen(url + "/_stcore/health", timeout=1).read() == b"ok":
                    break
            except OSError:
                if proc.poll() is not None:
                    break
                time.sleep(0.3)
        else:
            proc.kill()
            pytest.fail("saetune explore did not answer within 180 s")
        log.seek(0)
        if proc.poll() is None:
            break
        said = log.read()
        log.close()
        if f"Port {port} is not available" not in said:
            pytest.fail(f"saetune explore exited with {proc.returncode}:\n{said}")
    else:
        pytest.fail(f"saetune explore found no free port in 3 tries:\n{said}")
    assert f"http://127.0.0.1:{port}" in log.read()  # bound to localhost unless told otherwise
    yield url, proc, run
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def test_explorer_in_chromium(server, tmp_path):
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "Debian's chromium is missing: `make test` installs it (apt-get install chromium)"
    url, proc, run = server
    dialogs: list[str] = []
    shots = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))

        t0 = time.perf_counter()
        page.goto(url + "/Features")
        page.get_by_role("heading", name="feature", exact=False).first.wait_for(timeout=120_000)
        page.locator(".sx-tokens").first.wait_for(timeout=120_000)
        features_load = time.perf_counter() - t0
        page.wait_for_timeout(800)  # let the plotly charts draw
        page.set_viewport_size({"width": 1400, "height": 1700})  # Streamlit scrolls inside the page: grow it
        page.wait_for_timeout(800)
        shots["explorer_features.png"] = page.screenshot()
        page.set_viewport_size({"width": 1400, "height": 1000})

        page.goto(url + "/Traces")
        page.locator(".sx-tokens").first.wait_for(timeout=120_000)
        page.wait_for_timeout(800)
        shots["explorer_traces.png"] = page.screenshot(full_page=False)
        if not os.environ.get("SAETUNE_EXPLORE_RUN_DIR"):
            box = page.get_by_label("trace", exact=True)
            box.fill("1")
            box.press("Enter")
            page.get_by_text(XSS[:25], exact=False).first.wait_for(timeout=60_000)
            assert page.locator("img[src=x]").count() == 0
            assert page.evaluate("document.querySelectorAll('.sx-tokens script').length") == 0

        t0 = time.perf_counter()  # the same page again: caches warm, the browser's assets loaded
        page.goto(url + "/Features")
        page.locator(".sx-tokens").first.wait_for(timeout=120_000)
        features_reload = time.perf_counter() - t0

        page.goto(url + "/Reasoning_features")
        page.get_by_text("threshold", exact=False).first.wait_for(timeout=120_000)
        page.wait_for_timeout(800)
        shots["explorer_reasoning.png"] = page.screenshot(full_page=False)

        page.goto(url + "/Compare")
        page.get_by_role("heading", name="time and cost per stage").wait_for(timeout=120_000)
        page.wait_for_timeout(1200)
        shots["explorer_compare.png"] = page.screenshot(full_page=False)
        browser.close()
    assert dialogs == []
    rss = _rss_mib(proc.pid)
    print(f"\nFeatures page load (navigation to first context drawn): first {features_load:.2f} s, "
          f"again {features_reload:.2f} s; explorer process RSS after four page loads: {rss:.0f} MiB")
    for name, png in shots.items():
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
        (tmp_path / name).write_bytes(png)
        if os.environ.get("SAETUNE_UPDATE_DOCS") == "1":
            DOCS.mkdir(exist_ok=True)
            shutil.copy(tmp_path / name, DOCS / name)
