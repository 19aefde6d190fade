"""app.py, the demo page: one server per module (app.py as a subprocess on a free loopback
port, the `trained` model), driven by a real headless Chromium through selenium and by
gradio_client. Every caption is checked against what inference.py prints for the same file.
"""

import contextlib
import io
import json
import os
import struct
import subprocess
import sys
import threading
import time
import zlib
from types import SimpleNamespace

import pytest
import requests

import inference
from browser import clear_image, open_page, start_browser, upload
from conftest import ROOT, free_port

pytestmark = pytest.mark.slow

LIMIT_MB = 0.05  # --max_download_mb for the server under test: a 60 KB upload is "oversized"
MESSAGE = "Could not caption this image:"


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    model, _ = trained
    port = free_port()
    log_path = tmp_path_factory.mktemp("app") / "app.log"
    log = open(log_path, "w")
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "app.py", "--model_path", model, "--port", str(port),
         "--max_download_mb", str(LIMIT_MB), "--timeout", "1", "--num_captions", "2",
         # fp32 on both sides: the page batches concurrent requests, and int8 (auto's CPU
         # choice) scales activations per batch, so its captions can depend on the batch.
         "--precision", "fp32"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"})
    url = f"http://127.0.0.1:{port}/"
    while True:
        assert proc.poll() is None, open(log_path).read()[-3000:]
        assert time.monotonic() - start < 180, "app.py did not serve its page in 180 s"
        try:
            if requests.get(url, timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    print(f"\napp.py served its page {time.monotonic() - start:.1f} s after start")
    generation = json.load(open(os.path.join(model, "generation_config.json")))
    # The page's defaults: the model's own generation settings, as inference.py uses.
    settings = (generation["num_beams"], False, 1.0, 0.9, generation["max_new_tokens"])
    yield SimpleNamespace(url=url, proc=proc, log=log_path, model=model, settings=settings)
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def expected(trained, shapes_coco):
    """{path: the caption inference.py prints for that one file} for 10 images of the
    built-in set (run in this process: the same main(), without a second model start)."""
    model, _ = trained
    folder = os.path.join(shapes_coco, "val2014")
    paths = [os.path.join(folder, f"COCO_val2014_{500000 + i:012d}.jpg") for i in range(10)]
    captions = {}
    for path in paths:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert inference.main(["--image_path", path, "--model_path", model,
                                   "--precision", "fp32"]) == 0
        captions[path] = out.getvalue().strip()
        assert captions[path] and "\n" not in captions[path]
    return captions


def bad_files(folder):
    """{name: path} of the uploads that must each get a one-line message."""
    from PIL import Image

    good = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(good, format="JPEG")
    files = {"text.png": b"this is a text file, not a picture\n",
             "truncated.jpg": good.getvalue()[: len(good.getvalue()) // 2],
             "bomb.png": png_header(40000, 40000),
             "oversized.jpg": good.getvalue() + os.urandom(int(LIMIT_MB * 2**20) + 10_000)}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return {name: str(folder / name) for name in files}


def png_header(width, height):
    """A tiny PNG that claims width x height: PIL refuses it as a decompression bomb when
    opening it, before any pixel is decoded."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


# ----------------------------------------------------------------------------- the API

def test_ten_concurrent_api_requests_each_equal_inference(server, expected):
    from gradio_client import Client, handle_file

    client = Client(server.url, verbose=False)
    jobs = [client.submit(handle_file(path), *server.settings, api_name="/caption")
            for path in expected]
    results = [job.result(timeout=120) for job in jobs]
    assert [r[0] for r in results] == list(expected.values())
    for caption, ranked, message in results:
        assert message == "" and ranked["data"][0][0] == caption
        assert len(ranked["data"]) == 2  # --num_captions 2, beam width 2
        scores = [row[1] for row in ranked["data"]]
        assert scores == sorted(scores, reverse=True)


def test_every_bad_input_is_one_line_and_the_server_keeps_answering(server, expected,
                                                                     http_server, tmp_path):
    from gradio_client import Client, handle_file

    url, routes = http_server
    routes["/slow.jpg"] = (200, b"", "image/jpeg", {"delay": 3})  # --timeout is 1 s
    routes["/page"] = (200, b"<!DOCTYPE html><html><body>sign in</body></html>", "text/html")
    client = Client(server.url, verbose=False)
    messages = {}
    for name, path in bad_files(tmp_path).items():
        messages[name] = client.predict(handle_file(path), *server.settings,
                                        api_name="/caption")
    for name in ("404.jpg", "slow.jpg", "page"):
        messages[name] = client.predict(f"{url}/{name}", *server.settings,
                                        api_name="/caption_url")
    # A server path in the URL box: refused, not read (it would expose the server's files).
    path, _ = next(iter(expected.items()))
    messages["local path"] = client.predict(path, *server.settings, api_name="/caption_url")
    for name, (caption, ranked, message) in messages.items():
        assert caption == "" and message.startswith(MESSAGE), (name, message)
        assert "\n" not in message and "Traceback" not in message, (name, message)
    reasons = {name: m[2][len(MESSAGE):] for name, m in messages.items()}
    assert "not an image" in reasons["text.png"]
    assert "unreadable" in reasons["truncated.jpg"]
    assert "decompression bomb" in reasons["bomb.png"]
    assert "MB limit" in reasons["oversized.jpg"]
    assert "404" in reasons["404.jpg"]
    assert "timed out" in reasons["slow.jpg"]
    assert "HTML" in reasons["page"]
    assert "not an http(s) URL" in reasons["local path"]
    assert server.proc.poll() is None
    path, caption = next(iter(expected.items()))
    assert client.predict(handle_file(path), *server.settings, api_name="/caption")[0] == caption


# ----------------------------------------------------------------------------- a real browser

@pytest.fixture(scope="module")
def browser():
    driver = start_browser()
    if driver is None:
        pytest.fail("chromium and chromium-driver are not installed (.ci/run installs them: "
                    "apt-get install -y chromium chromium-driver)")
    yield driver
    driver.quit()


def test_browser_upload_captions_as_inference_does(server, expected, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    assert "Test metrics" in open_page(browser, server.url)  # from metrics.json
    path, caption = next(iter(expected.items()))
    assert upload(browser, path) == (caption, "")
    ranked = browser.find_element(By.ID, "ranked")
    WebDriverWait(browser, 10).until(lambda b: caption in ranked.get_attribute("textContent"))
    shot = tmp_path / "app.png"
    browser.save_screenshot(str(shot))
    print(f"\nscreenshot: {shot}")
    assert shot.stat().st_size > 10_000

    bad = bad_files(tmp_path)["text.png"]
    clear_image(browser)
    got_caption, message = upload(browser, bad)
    assert got_caption == "" and message.startswith(MESSAGE) and "\n" not in message
    path, caption = list(expected.items())[1]
    clear_image(browser)
    assert upload(browser, path) == (caption, "")  # the page still captions afterwards


# ----------------------------------------------------------------------------- start-up and batching

def test_model_that_fails_to_load_after_the_page_is_served_exits_with_one_line(tmp_path):
    """app.py serves the page before the model loads; a model directory that passes the
    up-front check (it has a config.json) but holds no weights must still end the server,
    with one line and exit code 2, not leave a page that never captions."""
    (tmp_path / "config.json").write_text('{"model_type": "vision-encoder-decoder"}')
    done = subprocess.run([sys.executable, "app.py", "--model_path", str(tmp_path), "--port",
                           str(free_port())], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                            "GRADIO_ANALYTICS_ENABLED": "False"})
    errors = [line for line in done.stderr.splitlines() if line.startswith("app.py: error:")]
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(errors) == 1 and f"cannot load model from {tmp_path}" in errors[0]


@pytest.mark.parametrize("one_request_per_call, calls", [(False, [3]), (True, [1, 1, 1])])
def test_queued_requests_share_a_generate_call_unless_int8(monkeypatch, tmp_path,
                                                           one_request_per_call, calls):
    """Gradio hands the page a batch of queued requests: with the same settings they are
    captioned in one call, but under int8 (activations scaled per batch) each request gets
    its own, so a visitor's caption never depends on strangers' images."""
    from captioning import page

    seen = []

    def fake_caption_sources(sources, *args, **kwargs):
        seen.append(len(sources))
        return [(s, [(f"caption of {os.path.basename(s)}", -0.5)], None) for s in sources]

    monkeypatch.setattr(page, "caption_sources", fake_caption_sources)
    captioner = page.PageCaptioner(num_captions=2, max_bytes=2**20, timeout=1)
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"{i}.jpg"))
        open(paths[-1], "wb").write(b"x")
    # The requests arrive while the model is still loading (app.py serves the page first):
    # they wait, and are grouped by what the model attached then says.
    answers = []
    waiting = threading.Thread(target=lambda: answers.append(captioner(
        paths, [3] * 3, [False] * 3, [1.0] * 3, [0.9] * 3, [16] * 3)))
    waiting.start()
    time.sleep(0.2)
    assert waiting.is_alive() and not seen  # nothing captioned before the model is there
    captioner.attach(None, None, None, one_request_per_call=one_request_per_call)
    waiting.join(timeout=10)
    captions, _, messages = answers[0]
    assert seen == calls
    assert captions == [f"caption of {i}.jpg" for i in range(3)] and messages == [""] * 3
