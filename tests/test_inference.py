"""inference.py on real files and a loopback HTTP server."""

import io
import re
import shutil
import json
import os

import numpy as np
import pytest
from PIL import Image

import inference


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    for i, color in enumerate([(220, 30, 30), (30, 60, 220), (30, 170, 40)]):
        Image.new("RGB", (80, 60), color).save(d / f"COCO_val2014_{i + 1:012d}.jpg")
    return d


def _jpeg_bytes():
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 100, 0)).save(buf, format="JPEG")
    return buf.getvalue()


def test_one_image_prints_one_caption(trained, images, capsys):
    out, _ = trained
    rc = inference.main(["--image_path", str(images / "COCO_val2014_000000000001.jpg"),
                         "--model_path", out])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and len(lines) == 1 and "\t" not in lines[0]


def test_directory_in_sorted_order_with_json_outputs(trained, images, tmp_path, capsys):
    out, _ = trained
    rc = inference.main(["--image_path", str(images), "--model_path", out, "--batch_size", "2",
                         "--json", str(tmp_path / "c.json"),
                         "--coco_results", str(tmp_path / "r.json")])
    lines = capsys.readouterr().out.strip().splitlines()
    names = sorted(os.listdir(images))
    assert rc == 0 and [l.split("\t")[0] for l in lines] == [str(images / n) for n in names]
    assert [r["image_id"] for r in json.load(open(tmp_path / "r.json"))] == [1, 2, 3]
    assert len(json.load(open(tmp_path / "c.json"))) == 3


def test_bad_inputs_one_line_each_others_still_captioned(trained, images, tmp_path,
                                                         http_server, capsys):
    out, _ = trained
    url, routes = http_server
    routes["/ok.jpg"] = (200, _jpeg_bytes(), "image/jpeg")
    routes["/page"] = (200, b"<!DOCTYPE html><html><body>hi</body></html>", "text/html")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("this is not an image")
    (tmp_path / "trunc.jpg").write_bytes(_jpeg_bytes()[:120])
    good = str(images / "COCO_val2014_000000000002.jpg")
    bad = [str(tmp_path / "missing.jpg"), str(tmp_path / "empty.jpg"),
           str(tmp_path / "text.jpg"), str(tmp_path / "trunc.jpg"), f"{url}/404.jpg",
           f"{url}/page", "ftp://example.invalid/x.jpg"]
    rc = inference.main(["--image_path", good, f"{url}/ok.jpg"] + bad + ["--model_path", out])
    captured = capsys.readouterr()
    err_lines = [l for l in re.split(r"[\r\n]+", captured.err)  # not the progress bar
                 if l.strip() and "img/s" not in l and "%|" not in l
                 and not l.startswith("inference.py: precision")]  # the choice, said once
    assert rc == 1 and "Traceback" not in captured.err
    assert len(err_lines) == len(bad)
    for source, line in zip(bad, err_lines):
        assert line.startswith(source + ":")
    assert "HTML" in captured.err and "404" in captured.err
    assert [l.split("\t")[0] for l in captured.out.strip().splitlines()] == [good, f"{url}/ok.jpg"]


def test_server_misbehaviour_each_one_line(trained, http_server, capsys):
    out, _ = trained
    url, routes = http_server
    routes["/ok.jpg"] = (200, _jpeg_bytes(), "image/jpeg")
    routes["/slow.jpg"] = (200, _jpeg_bytes(), "image/jpeg", {"delay": 3})
    routes["/huge.jpg"] = (200, b"\xff" * 300_000, "image/jpeg")
    routes["/huge-unsized.jpg"] = (200, b"\xff" * 300_000, "image/jpeg", {"no_length": True})
    routes["/loop"] = (302, b"", "text/plain", {"headers": {"Location": "/loop2"}})
    routes["/loop2"] = (302, b"", "text/plain", {"headers": {"Location": "/loop"}})
    routes["/hop"] = (302, b"", "text/plain", {"headers": {"Location": "/ok.jpg"}})
    sources = [f"{url}/ok.jpg", f"{url}/slow.jpg", f"{url}/huge.jpg",
               f"{url}/huge-unsized.jpg", f"{url}/loop", f"{url}/hop"]
    rc = inference.main(["--image_path", *sources, "--model_path", out, "--timeout", "1",
                         "--max_download_mb", "0.2"])
    captured = capsys.readouterr()
    errors = {line.split(": ", 1)[0]: line for line in re.split(r"[\r\n]+", captured.err)
              if line.startswith("http")}
    assert rc == 1 and "Traceback" not in captured.err
    assert "timed out" in errors[f"{url}/slow.jpg"]
    assert "MB limit" in errors[f"{url}/huge.jpg"]
    assert "MB limit" in errors[f"{url}/huge-unsized.jpg"]
    assert "redirect" in errors[f"{url}/loop"]
    assert set(errors) == {f"{url}/{p}" for p in ("slow.jpg", "huge.jpg", "huge-unsized.jpg", "loop")}
    captioned = [l.split("\t")[0] for l in captured.out.strip().splitlines()]
    assert captioned == [f"{url}/ok.jpg", f"{url}/hop"]  # one redirect is fine


def test_nlpconnect_shaped_model_dir_captions(nlpconnect_dir, images, capsys):
    """Shaped like nlpconnect/vit-gpt2-image-captioning: a plain GPT-2 tokenizer (vocab.json,
    merges.txt) with no pad token, a ViTImageProcessor, and the generation settings in
    config.json with no generation_config.json."""
    rc = inference.main(["--image_path", str(images), "--model_path", nlpconnect_dir])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and len(lines) == 3


def test_bad_model_path_is_one_line(tmp_path, images, capsys):
    rc = inference.main(["--image_path", str(images), "--model_path", str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert rc == 2 and "no model at" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "empty").mkdir()
    rc = inference.main(["--image_path", str(images), "--model_path", str(tmp_path / "empty")])
    err = capsys.readouterr().err
    assert rc == 2 and "no config.json" in err and len(err.strip().splitlines()) == 1


def test_no_trained_model_yet_says_how_to_make_one(tmp_path, images, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./image_captioning_model here
    rc = inference.main(["--image_path", str(images)])
    err = capsys.readouterr().err
    assert rc == 2 and "make demo" in err and "--model_path" in err
    assert len(err.strip().splitlines()) == 1
