"""dataloader.py on real JPEG files in the COCO layout."""

import json
import os

import numpy as np
import pytest

import dataloader
from captioning.modeling import load_tokenizer
from captioning.store import load_split
from conftest import PREPARED_ROWS, TINY_SIZE


pytestmark = pytest.mark.slow


def test_manifest_counts_and_rows(prepared):
    m = json.load(open(os.path.join(prepared, "manifest.json")))
    assert m["encoder_model"] == "tiny" and m["decoder_model"] == "tiny"
    assert m["rows"] == PREPARED_ROWS
    for split, n in m["rows"].items():
        c = m["images"][split]
        assert c["kept"] == n
        assert c["seen"] == c["kept"] + c["dropped_non_rgb"] + c["dropped_unreadable"]
    assert m["images"]["total"]["dropped_non_rgb"] >= 1
    for split, n in m["rows"].items():
        ds = load_split(prepared, split)
        assert len(ds) == n
        assert sum(len(c) for c in ds["captions"]) == m["captions"][split]


def test_exact_counts_over_a_whole_folder(shapes_coco, tmp_path):
    """No limit: all 60 train images are seen. The built-in set makes every 20th image
    grayscale (3 of 60) and truncates one file."""
    out = tmp_path / "d"
    assert dataloader.main(["--coco_dir", shapes_coco, "--save_path", str(out),
                            "--encoder_model", "tiny", "--decoder_model", "tiny",
                            "--val_size", "14", "--test_size", "14", "--num_proc", "2",
                            "--quiet"]) == 0
    m = json.load(open(out / "manifest.json"))
    train = m["images"]["train"]
    assert (train["seen"], train["kept"], train["dropped_non_rgb"],
            train["dropped_unreadable"]) == (60, 56, 3, 1)
    held_out = [m["images"][s] for s in ("validation", "test")]
    assert sum(c["seen"] for c in held_out) in (29, 30)  # 28 kept + image 19 (grayscale)
    assert sum(c["dropped_non_rgb"] for c in held_out) == 1
    assert m["rows"] == {"train": 56, "validation": 14, "test": 14}


def test_one_uint8_row_per_image_with_all_captions(prepared, shapes_coco):
    ds = load_split(prepared, "train")
    row = ds[0]
    assert row["pixel_values"].dtype == np.uint8 and row["pixel_values"].shape == (3, *TINY_SIZE)
    assert len(set(ds["image_id"])) == len(ds)  # never a row per caption
    ann = json.load(open(os.path.join(shapes_coco, "annotations", "captions_train2014.json")))
    refs = {}
    for a in ann["annotations"]:
        refs.setdefault(a["image_id"], []).append(" ".join(a["caption"].split()))
    for image_id, captions in zip(ds["image_id"], ds["captions"]):
        assert list(captions) == refs[image_id]  # all of them, whitespace-normalised


def test_stored_pixels_are_the_files_resized(prepared, shapes_coco):
    """Checked against plain PIL, not against the code that stored them: a full decode and
    one bilinear resize must give exactly the stored bytes."""
    from PIL import Image

    ds = load_split(prepared, "validation")
    for row in (ds[0], ds[len(ds) - 1]):
        with Image.open(os.path.join(shapes_coco, "val2014", row["file_name"])) as img:
            want = np.asarray(img.convert("RGB").resize(TINY_SIZE[::-1], Image.Resampling.BILINEAR))
        assert np.array_equal(row["pixel_values"], want.transpose(2, 0, 1))


def test_shards_split_at_the_shard_size(shapes_coco, tmp_path, monkeypatch):
    from captioning import store

    monkeypatch.setattr(store, "SHARD_IMAGES", 16)
    out = tmp_path / "d"
    assert dataloader.main(["--coco_dir", shapes_coco, "--save_path", str(out),
                            "--encoder_model", "tiny", "--decoder_model", "tiny",
                            "--limit_data", "40", "--val_size", "2", "--test_size", "2",
                            "--quiet"]) == 0
    assert sorted(os.listdir(out / "train")) == [f"shard-0000{i}.arrow" for i in range(3)]
    ds = load_split(str(out), "train")
    assert len(ds) == 40 and len(set(ds["image_id"])) == 40


def test_every_caption_ends_with_eos(prepared):
    tok = load_tokenizer(prepared)
    assert len(tok) >= 300 and tok.pad_token_id == tok.eos_token_id
    ds = load_split(prepared, "train")
    for captions, ids in zip(ds["captions"][:10], ds["caption_ids"][:10]):
        for text, row in zip(captions, ids):
            assert row[-1] == tok.eos_token_id and tok.eos_token_id not in row[:-1]
            assert tok.decode(row[:-1]) == text


def test_splits_never_share_an_image(prepared):
    ids = {s: set(load_split(prepared, s)["image_id"]) for s in ("train", "validation", "test")}
    assert not ids["train"] & ids["validation"]
    assert not ids["train"] & ids["test"]
    assert not ids["validation"] & ids["test"]


def test_non_rgb_images_are_dropped(prepared, shapes_coco):
    from PIL import Image

    for split in ("train", "validation", "test"):
        for name in load_split(prepared, split)["file_name"]:
            folder = "train2014" if "train2014" in name else "val2014"
            with Image.open(os.path.join(shapes_coco, folder, name)) as img:
                assert img.mode == "RGB"


def test_existing_save_path_is_refused_then_overwritten(shapes_coco, tmp_path, capsys):
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    args = ["--coco_dir", shapes_coco, "--save_path", str(out), "--encoder_model", "tiny",
            "--decoder_model", "tiny", "--limit_data", "5", "--val_size", "2",
            "--test_size", "2", "--num_proc", "1", "--quiet"]
    assert dataloader.main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").exists()
    assert dataloader.main(args + ["--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "manifest.json").exists()
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p or ".old-" in p]


def test_interrupted_run_leaves_nothing_usable_and_a_rerun_works(shapes_coco, tmp_path):
    out = tmp_path / "data"
    stale = tmp_path / "data.tmp-99999"  # what a killed run leaves: never at --save_path
    (stale / "train").mkdir(parents=True)
    (stale / "train" / "shard-00000.arrow").write_bytes(b"half")
    from captioning.store import Manifest

    with pytest.raises(ValueError, match="does not exist"):
        Manifest.read(str(out))
    assert dataloader.main(["--coco_dir", shapes_coco, "--save_path", str(out),
                            "--encoder_model", "tiny", "--decoder_model", "tiny",
                            "--limit_data", "5", "--val_size", "2", "--test_size", "2",
                            "--quiet"]) == 0
    assert not stale.exists() and Manifest.read(str(out))["rows"]["train"] == 5


def test_impossible_request_gives_one_line(shapes_coco, tmp_path, capsys):
    """30 val2014 images, one grayscale: 20 + 10 candidates leave the test split 9 short."""
    rc = dataloader.main(["--coco_dir", shapes_coco, "--save_path", str(tmp_path / "d"),
                          "--encoder_model", "tiny", "--decoder_model", "tiny", "--quiet",
                          "--val_size", "20", "--test_size", "10"])
    err = capsys.readouterr().err
    assert rc == 1 and "usable images for the test split" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not os.listdir(tmp_path)  # nothing half-written left behind


def test_defaults_fit_a_small_folder(shapes_coco, tmp_path, capsys):
    """More than there is: --limit_data takes all 60 training candidates (56 usable), and
    the default 500 + 500 held-out images become a 50/50 split of val2014's 30."""
    out = tmp_path / "d"
    assert dataloader.main(["--coco_dir", shapes_coco, "--save_path", str(out),
                            "--encoder_model", "tiny", "--decoder_model", "tiny", "--quiet",
                            "--limit_data", "400"]) == 0
    err = capsys.readouterr().err
    assert "taking all of them" in err and "splitting them 50% / 50%" in err
    m = json.load(open(out / "manifest.json"))
    assert m["rows"]["train"] == 56
    assert m["rows"]["validation"] == 15 and m["rows"]["test"] == 14  # one val image is gray


def test_missing_annotations_give_one_line(tmp_path, capsys):
    rc = dataloader.main(["--coco_dir", str(tmp_path / "nope"), "--save_path",
                          str(tmp_path / "d"), "--encoder_model", "tiny",
                          "--decoder_model", "tiny", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and "captions_train2014.json" in err and "Traceback" not in err
