"""The demo page's two user-facing times, on a trained model (by default the demo's).

    make demo                      # trains the tiny model this bench uses by default
    python bench/app.py [--model_path data/demo/model] [--starts 3] [--uploads 8]

- cold start: `python app.py` in a fresh process until GET / answers 200 (page served),
  and on until its first caption comes back through the API (gradio_client, a
  640x480 JPEG, the page's default settings): app.py serves the page while the model
  is still loading, so the two differ. --starts times; the best and every run are printed
- upload to caption: in headless Chromium (tests/browser.py, what tests/test_app.py drives),
  from handing a 640x480 JPEG to the page's file input until its caption shows, for
  --uploads different photos after one warm-up upload; best and median are printed (the
  warm-up, the first generate of the process, is printed apart)

Targets: page served within 15 s, caption within 1 s.
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from caption import write_photos  # noqa: E402  (bench/caption.py, beside this file)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(model_path, port):
    """-> (process, seconds from spawn to the page served)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "app.py", "--model_path", model_path,
                             "--port", str(port)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                            env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"app.py exited with {proc.returncode}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200:
                return proc, time.perf_counter() - start
        except requests.ConnectionError:
            pass
        time.sleep(0.05)


def stop(proc):
    proc.terminate()
    proc.wait(timeout=30)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_path", default=os.path.join(ROOT, "data/demo/model"),
                   help="trained model directory")
    p.add_argument("--starts", type=int, default=3, help="cold starts timed")
    p.add_argument("--uploads", type=int, default=8, help="uploads timed after the warm-up")
    args = p.parse_args(argv)
    from browser import clear_image, open_page, start_browser, upload

    from gradio_client import Client, handle_file

    generation = json.load(open(os.path.join(args.model_path, "generation_config.json")))
    # the page's defaults: beam width, sampling off, temperature, top-p, maximum length
    settings = (generation.get("num_beams") or 1, False, 1.0, 0.9,
                generation.get("max_new_tokens") or 32)
    with tempfile.TemporaryDirectory() as folder:
        photo = write_photos(folder, 1, seed=2)[0]
        starts, captions = [], []
        for _ in range(args.starts):
            port = free_port()
            began = time.perf_counter()
            proc, seconds = start_app(args.model_path, port)
            client = Client(f"http://127.0.0.1:{port}/", verbose=False)
            caption = client.predict(handle_file(photo), *settings, api_name="/caption")[0]
            captions.append(time.perf_counter() - began)
            assert caption, "the first caption came back empty"
            starts.append(seconds)
            stop(proc)
    print(f"cold start to page served: best {min(starts):.1f} s "
          f"(runs: {', '.join(f'{s:.1f}' for s in starts)}; target 15 s)")
    print(f"cold start to first caption (API): best {min(captions):.1f} s "
          f"(runs: {', '.join(f'{s:.1f}' for s in captions)})")

    port = free_port()
    proc, _ = start_app(args.model_path, port)
    browser = start_browser()
    try:
        open_page(browser, f"http://127.0.0.1:{port}/")
        with tempfile.TemporaryDirectory() as folder:
            photos = write_photos(folder, args.uploads + 1, seed=1)
            times = []
            for path in photos:
                clear_image(browser)
                start = time.perf_counter()
                caption, message = upload(browser, path)
                times.append(time.perf_counter() - start)
                assert caption and not message, message
    finally:
        browser.quit()
        stop(proc)
    warm = times[1:]
    print(f"upload to caption (640x480 JPEG, headless Chromium): best {min(warm):.2f} s, "
          f"median {statistics.median(warm):.2f} s over {len(warm)} uploads "
          f"(first upload of the process: {times[0]:.2f} s; target 1 s)")


if __name__ == "__main__":
    main()
