"""`sparsevl serve` end to end: a real server process on a free loopback port, driven by headless Chromium
(Debian's /usr/bin/chromium through Playwright) and by 20 concurrent API clients.

Chromium missing is a failure, not a skip: `.ci/run` installs it.
"""

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
from PIL import Image

from sparsevl.serve.assistant import VisionAssistant

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
MAX_UPLOAD_MB = 1
RSS_BOUND_MB = 1500  # whole server process, tiny model, during 20 concurrent requests (measured ~540 MB)
RSS_GROWTH_BOUND_MB = 150  # growth over the 20 requests (measured < 10 MB)

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    """(url, process) of `sparsevl serve` on a free loopback port; stopped after the module."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "GRADIO_TEMP_DIR": str(tmp_path_factory.mktemp("gradio_tmp"))}
    with open(log, "w") as handle:
        process = subprocess.Popen([sys.executable, "-m", "sparsevl", "serve", "--model", str(tiny_checkpoint),
                                    "--port", str(port), "--max_upload_mb", str(MAX_UPLOAD_MB),
                                    "--max_new_tokens", "8"], stdout=handle, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            break
        except (urllib.error.URLError, ConnectionError):
            if process.poll() is not None or time.time() > deadline:
                process.kill()
                pytest.fail(f"server did not start:\n{log.read_text()}")
            time.sleep(0.5)
    yield url, process
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def assistant(tiny_checkpoint):
    return VisionAssistant.load(tiny_checkpoint)


@pytest.fixture(scope="module")
def browser():
    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} is missing: `make test` installs it (scripts/system_deps.sh)"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


def open_page(browser, url):
    page = browser.new_page()
    page.goto(url)
    page.wait_for_selector("#image_file input[type=file]", state="attached", timeout=60_000)
    return page


def test_browser_upload_ask_and_read_the_answer(server, browser, assistant, shapes_dir):
    url, _ = server
    image_path = shapes_dir / "images" / "test" / "000001.png"
    expected = assistant.ask(Image.open(image_path).convert("RGB"), "what colour is the square?", max_new_tokens=8)
    page = open_page(browser, url)
    page.set_input_files("#image_file input[type=file]", str(image_path))
    page.wait_for_selector("#overlay img", timeout=30_000)  # the patch-grid preview appears on upload
    page.fill("#question textarea", "what colour is the square?")
    page.click("#ask")
    page.wait_for_function("document.querySelector('#answer textarea').value.length > 0", timeout=60_000)
    assert page.input_value("#answer textarea") == expected.text
    assert "64 of 64 visual tokens kept" in page.inner_text("#kept_note")
    assert "dense model" in page.inner_text("#expert_load")
    assert page.inner_text("#message").strip() == ""


def test_browser_shows_why_a_non_image_upload_is_rejected(server, browser, tmp_path):
    url, _ = server
    fake = tmp_path / "holiday.png"
    fake.write_text("this is text, not a PNG")
    page = open_page(browser, url)
    page.set_input_files("#image_file input[type=file]", str(fake))
    page.wait_for_function("document.querySelector('#message').innerText.includes('rejected')", timeout=30_000)
    assert "holiday.png is not an image" in page.inner_text("#message")


def test_oversized_upload_is_refused_with_a_message(server, tmp_path):
    url, _ = server
    boundary = "sparsevlboundary"
    payload = b"\0" * (MAX_UPLOAD_MB * 2**20 + 1024)
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + payload + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(url + "gradio_api/upload", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 413
    assert "maximum allowed size" in refused.value.read().decode()


def test_listens_only_on_loopback_by_default(server):
    url, process = server
    listening = [c.laddr for c in psutil.Process(process.pid).net_connections(kind="inet") if c.status == "LISTEN"]
    assert listening, "the server listens on nothing"
    assert all(address.ip in ("127.0.0.1", "::1") for address in listening), listening
    assert int(url.rsplit(":", 1)[1].strip("/")) in [address.port for address in listening]


def test_twenty_concurrent_requests_within_the_memory_bound(server, assistant, shapes_dir):
    from gradio_client import Client, handle_file

    url, process = server
    server_process = psutil.Process(process.pid)
    client = Client(url, verbose=False)
    images = [shapes_dir / "images" / "test" / f"{i:06d}.png" for i in range(4)]
    expected = [assistant.ask(Image.open(path).convert("RGB"), "what shape?", max_new_tokens=8).text
                for path in images]
    start_rss = server_process.memory_info().rss
    def ask(image):
        """One request; a connection the server closed between two keep-alive requests (httpx's
        RemoteProtocolError, seen once in a loaded full-suite run) is retried once: it says nothing of answers."""
        try:
            return client.predict(handle_file(str(image)), "what shape?", 8, 0.0, api_name="/answer")
        except httpx.RemoteProtocolError:
            return client.predict(handle_file(str(image)), "what shape?", 8, 0.0, api_name="/answer")

    with ThreadPoolExecutor(max_workers=20) as pool:
        futures = [pool.submit(ask, images[i % 4]) for i in range(20)]
        peak_rss = start_rss
        while not all(future.done() for future in futures):
            peak_rss = max(peak_rss, server_process.memory_info().rss)
            time.sleep(0.05)
    results = [future.result() for future in futures]
    assert [r[1] for r in results] == [""] * 20  # no error message
    assert [r[0] for r in results] == [expected[i % 4] for i in range(20)]
    assert peak_rss < RSS_BOUND_MB * 2**20, f"peak RSS {peak_rss / 2**20:.0f} MB"
    assert peak_rss - start_rss < RSS_GROWTH_BOUND_MB * 2**20, f"RSS grew {(peak_rss - start_rss) / 2**20:.0f} MB"
