"""Your own images and captions: an imagefolder (metadata.jsonl or .csv), a Flickr8k-style
Karpathy json, and Hub-style datasets (parquet, save_to_disk), each through dataloader.py ->
train.py -> inference.py -> metrics.py on files the tests write themselves."""

import csv
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

import dataloader
import inference
import metrics
import train

pytestmark = pytest.mark.slow

NON_ASCII = ["Ein roter Kreis über dem grünen Feld", "一个红色的圆圈在左上角",
             "دائرة حمراء في الزاوية", "a red circle 🔴 in the corner"]


def _image(path, color, gray=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = Image.new("RGB", (48, 40), color)
    (img.convert("L") if gray else img).save(path, quality=95)


def _folder_rows():
    """(file_name, captions, split) with every case the issue names. 15 files on disk
    (one grayscale) and 2 listed but missing; image 3 has an empty caption among others;
    image 4's captions come as repeated rows; the split column uses val and validation."""
    rows = []
    for i in range(14):
        name = f"photos/{'nested/deep/' if i % 3 == 0 else ''}img_{i:02d}.jpg"
        split = "train" if i < 10 else ("val" if i == 10 else "validation" if i == 11 else "test")
        captions = [f"a shape number {i}", NON_ASCII[i % 4]]
        if i == 3:
            captions = ["", "a blue square"]
        rows.append((name, captions, split))
    rows.append(("gray.jpg", ["a grey picture"], "train"))
    rows.append(("photos/img_04.jpg", ["another caption for four"], "train"))  # repeated row
    rows.append(("missing_one.jpg", ["never there"], "train"))
    rows.append(("sub/missing_two.jpg", ["not there either"], "test"))
    return rows


def make_imagefolder(root, form):
    rng = np.random.default_rng(0)
    for name, _, _ in _folder_rows():
        if "missing" not in name:
            _image(os.path.join(root, name), tuple(int(c) for c in rng.integers(0, 255, 3)),
                   gray=name == "gray.jpg")
    if form == "jsonl":
        with open(os.path.join(root, "metadata.jsonl"), "w", encoding="utf-8") as f:
            for name, captions, split in _folder_rows():
                f.write(json.dumps({"file_name": name, "captions": captions, "split": split},
                                   ensure_ascii=False) + "\n")
    else:
        with open(os.path.join(root, "metadata.csv"), "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file_name", "caption", "split"])
            for name, captions, split in _folder_rows():
                for caption in captions:  # one row per caption
                    writer.writerow([name, caption, split])
            writer.writerow(["photos/img_01.jpg", "quoted, with a comma\nand a newline", "train"])


def _pipeline(tmp_path, source_args, expect_rows):
    data, model = tmp_path / "data", tmp_path / "model"
    assert dataloader.main([*source_args, "--save_path", str(data), "--encoder_model", "tiny",
                            "--decoder_model", "tiny", "--quiet"]) == 0
    m = json.load(open(data / "manifest.json", encoding="utf-8"))
    assert m["rows"] == expect_rows
    assert train.main(["--data_path", str(data), "--output_dir", str(model), "--epochs", "1",
                       "--batch_size", "4", "--num_beams", "1", "--runs_dir",
                       str(tmp_path / "runs"), "--num_preview_images", "0", "--quiet"]) == 0
    return m, data, model


@pytest.mark.parametrize("form", ["jsonl", "csv"])
def test_imagefolder_end_to_end(tmp_path, form, capsys):
    root = tmp_path / "mine"
    make_imagefolder(str(root), form)
    m, data, model = _pipeline(tmp_path, ["--source", "folder", "--image_dir", str(root)],
                               {"train": 10, "validation": 2, "test": 2})
    assert m["skipped"] == {"missing_image": 2, "empty_caption": 1, "no_caption": 0}
    assert m["images"]["train"]["dropped_non_rgb"] == 1  # gray.jpg
    from captioning.store import load_split

    train_rows = {r["file_name"]: list(r["captions"]) for r in load_split(str(data), "train")}
    assert train_rows["photos/img_04.jpg"][-1] == "another caption for four"
    assert train_rows["photos/img_01.jpg"][1] == NON_ASCII[1]  # UTF-8 kept as is
    if form == "csv":
        assert "quoted, with a comma and a newline" in train_rows["photos/img_01.jpg"]
    capsys.readouterr()
    image = root / "photos" / "nested" / "deep" / "img_00.jpg"
    assert inference.main(["--image_path", str(image), "--model_path", str(model)]) == 0
    assert capsys.readouterr().out.count("\n") == 1  # one caption (1 epoch: maybe empty)
    metadata = root / ("metadata.jsonl" if form == "jsonl" else "metadata.csv")
    assert metrics.main(["--predictions", str(model / "test_results_coco.json"),
                         "--annotations", str(metadata), "--out", str(tmp_path / "s.json")]) == 0
    rescored = json.load(open(tmp_path / "s.json"))
    reported = json.load(open(model / "metrics.json"))["test"]
    assert rescored["cider"] == pytest.approx(reported["cider"], abs=1e-9)


def test_flickr_style_karpathy_json(tmp_path):
    images = tmp_path / "Flicker8k_Dataset"
    rows = []
    for i in range(16):
        name = f"{1000 + i}_abc.jpg"
        _image(str(images / name), (10 * i, 100, 200))
        rows.append({"filename": name, "imgid": i, "split": "train" if i < 10 else
                     ("val" if i < 13 else "test"),
                     "sentences": [{"raw": f"a picture number {i}", "tokens": []},
                                   {"raw": f"photo {i}"}]})
    karpathy = tmp_path / "dataset_flickr8k.json"
    karpathy.write_text(json.dumps({"images": rows, "dataset": "flickr8k"}))
    m, data, model = _pipeline(tmp_path, ["--source", "karpathy", "--karpathy_json",
                                          str(karpathy), "--image_dir", str(images)],
                               {"train": 10, "validation": 3, "test": 3})
    assert inference.main(["--image_path", str(images / "1000_abc.jpg"), "--model_path",
                           str(model)]) == 0
    assert metrics.main(["--predictions", str(model / "test_results_coco.json"),
                         "--annotations", str(karpathy)]) == 0


def _hub_rows(n=20):
    rows = []
    for i in range(n):
        buf = io.BytesIO()
        Image.new("RGB", (40, 40), (12 * i, 50, 90)).save(buf, format="JPEG")
        rows.append({"image": {"bytes": buf.getvalue(), "path": None},
                     "text": [f"colour number {i}", "a square"] if i % 2 else f"colour {i}"})
    return rows


@pytest.mark.parametrize("form", ["parquet", "save_to_disk"])
def test_hub_style_datasets(tmp_path, form):
    import datasets

    features = datasets.Features({"image": datasets.Image(),
                                  "text": datasets.Value("string")})
    rows = _hub_rows()
    for r in rows:  # one schema: a list cell becomes its first caption here, JSON in text
        if isinstance(r["text"], list):
            r["text"] = json.dumps(r["text"])
    ds = datasets.Dataset.from_list(rows, features=features)
    if form == "parquet":
        source = tmp_path / "captions.parquet"
        ds.to_parquet(str(source))
        expect = {"train": 16, "validation": 2, "test": 2}  # seeded 10% / 10% split
    else:
        source = tmp_path / "saved"
        datasets.DatasetDict({"train": ds.select(range(14)), "validation": ds.select(range(14, 17)),
                              "test": ds.select(range(17, 20))}).save_to_disk(str(source))
        expect = {"train": 14, "validation": 3, "test": 3}
    m, data, model = _pipeline(tmp_path, ["--source", "hub", "--dataset", str(source)], expect)
    from captioning.store import load_split

    captions = [list(r["captions"]) for r in load_split(str(data), "train")]
    if form == "parquet":  # a JSON list in a text cell is a list of captions
        assert ["colour number 1", "a square"] in captions
    image = tmp_path / "one.jpg"
    Image.new("RGB", (40, 40), (120, 50, 90)).save(image)
    assert inference.main(["--image_path", str(image), "--model_path", str(model)]) == 0
    assert metrics.main(["--predictions", str(model / "test_results_coco.json"),
                         "--annotations", str(model / "test_predictions.json")]) == 0


@pytest.mark.parametrize("make_bad, extra, message", [
    (lambda d: make_imagefolder(d, "jsonl"), ["--caption_column", "words"],
     "no column 'words' (its columns: file_name, captions, split)"),
    (lambda d: os.makedirs(d), [], "has no metadata.jsonl or metadata.csv"),
    (lambda d: (make_imagefolder(d, "csv"), open(os.path.join(d, "metadata.csv"), "a").write(
        'photos/img_02.jpg,"unterminated\n')), [], "metadata.csv line"),
])
def test_bad_caption_data_is_one_line(tmp_path, capsys, make_bad, extra, message):
    root = str(tmp_path / "mine")
    make_bad(root)
    rc = dataloader.main(["--source", "folder", "--image_dir", root, "--save_path",
                          str(tmp_path / "data"), "--encoder_model", "tiny", "--decoder_model",
                          "tiny", "--quiet", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "data").exists()


def test_finetune_a_published_captioner_on_your_folder(nlpconnect_dir, tmp_path, capsys):
    """--from_model takes the nlpconnect-shaped model's processor (32 px) and tokenizer;
    train.py then starts from its weights (the manifest names it) and captions."""
    root = tmp_path / "mine"
    make_imagefolder(str(root), "jsonl")
    data, model = tmp_path / "data", tmp_path / "model"
    assert dataloader.main(["--source", "folder", "--image_dir", str(root), "--from_model",
                            nlpconnect_dir, "--save_path", str(data), "--quiet"]) == 0
    m = json.load(open(data / "manifest.json", encoding="utf-8"))
    assert m["from_model"] == nlpconnect_dir and m["image_size"] == [32, 32]
    capsys.readouterr()
    assert train.main(["--data_path", str(data), "--output_dir", str(model), "--epochs", "1",
                       "--batch_size", "4", "--runs_dir", str(tmp_path / "runs"),
                       "--num_preview_images", "0", "--quiet"]) == 0
    assert f"model: from {nlpconnect_dir}" in capsys.readouterr().out
    assert inference.main(["--image_path", str(root / "photos" / "img_01.jpg"),
                           "--model_path", str(model)]) == 0


def test_a_mismatched_init_from_is_refused_in_one_line(nlpconnect_dir, tmp_path, capsys):
    root = tmp_path / "mine"
    make_imagefolder(str(root), "jsonl")
    data = tmp_path / "data"  # a tiny tokenizer and 64 px: not the nlpconnect model's
    assert dataloader.main(["--source", "folder", "--image_dir", str(root), "--encoder_model",
                            "tiny", "--decoder_model", "tiny", "--save_path", str(data),
                            "--quiet"]) == 0
    capsys.readouterr()
    rc = train.main(["--data_path", str(data), "--output_dir", str(tmp_path / "model"),
                     "--init_from", nlpconnect_dir, "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--from_model" in err[0] and "vocabulary" in err[0]


def test_non_ascii_caption_comes_back_byte_identical(tmp_path, capsys):
    """A tiny model trained to memorise one German caption with an emoji predicts it, and
    test_predictions.json holds it byte for byte; metrics.py warns that its tokeniser is
    English-only."""
    caption = "Ein Hund läuft 🐕 über die Straße"
    root = tmp_path / "dogs"
    root.mkdir()
    with open(root / "metadata.jsonl", "w", encoding="utf-8") as f:
        for i in range(30):
            _image(str(root / f"{i}.jpg"), (200, 8 * i, 40))
            f.write(json.dumps({"file_name": f"{i}.jpg", "caption": caption},
                               ensure_ascii=False) + "\n")
    data, model = tmp_path / "data", tmp_path / "model"
    assert dataloader.main(["--source", "folder", "--image_dir", str(root), "--encoder_model",
                            "tiny", "--decoder_model", "tiny", "--save_path", str(data),
                            "--quiet"]) == 0
    assert train.main(["--data_path", str(data), "--output_dir", str(model), "--epochs", "25",
                       "--batch_size", "8", "--lr", "2e-3", "--num_beams", "1",
                       "--save_steps", "10000", "--runs_dir", str(tmp_path / "runs"),
                       "--num_preview_images", "0", "--quiet"]) == 0
    raw = (model / "test_predictions.json").read_bytes()
    predictions = json.loads(raw)
    assert predictions and all(p["caption"] == caption for p in predictions)
    assert caption.encode("utf-8") in raw  # written as UTF-8, not as escapes
    capsys.readouterr()
    assert metrics.main(["--predictions", str(model / "test_results_coco.json"),
                         "--annotations", str(root / "metadata.jsonl")]) == 0
    err = capsys.readouterr().err
    assert "not ASCII" in err and len([l for l in err.splitlines() if "ASCII" in l]) == 1


def _readme_block(marker):
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "README.md"), encoding="utf-8").read()
    after = readme.split(f"<!-- {marker} -->", 1)[1]
    return after.split("```", 2)[1].split("\n", 1)[1]


def test_readme_own_data_commands_run_as_written(tmp_path):
    import shlex
    import subprocess
    import sys

    from conftest import ROOT

    images = tmp_path / "my_images"
    images.mkdir()
    metadata = _readme_block("own-data-metadata")
    (images / "metadata.jsonl").write_text(metadata, encoding="utf-8")
    for i, line in enumerate(metadata.strip().splitlines()):
        _image(str(images / json.loads(line)["file_name"]), (40 * i, 90, 160))
    for command in _readme_block("own-data-commands").strip().splitlines():
        argv = shlex.split(command)
        assert argv[0] == "python"
        r = subprocess.run([sys.executable, os.path.join(ROOT, argv[1]), *argv[2:]],
                           cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, (command, r.stderr[-2000:])
