"""Caption-set readers on small files written here (fast tier): the edge cases of people's
own metadata files."""

import argparse
import json

import pytest
from PIL import Image

from captioning.sources import SourceError, read_imagefolder, references_by_image_id
from captioning.splits import plan_splits


def _folder(tmp_path, names):
    for name in names:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(path)


def test_one_file_spelled_two_ways_is_one_image(tmp_path):
    _folder(tmp_path, ["a.jpg", "sub/b.jpg"])
    rows = [{"file_name": "a.jpg", "caption": "one"}, {"file_name": "./a.jpg", "caption": "two"},
            {"file_name": "sub/./b.jpg", "caption": "three"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    entries, has_split, counts = read_imagefolder(str(tmp_path))
    assert [(e["file_name"], e["captions"]) for e in entries] == [
        ("a.jpg", ["one", "two"]), ("sub/b.jpg", ["three"])]
    refs = references_by_image_id(str(tmp_path / "metadata.jsonl"))
    assert refs == {e["image_id"]: e["captions"] for e in entries}


def test_a_csv_with_a_byte_order_mark_reads(tmp_path):
    _folder(tmp_path, ["a.jpg"])
    (tmp_path / "metadata.csv").write_bytes("file_name,caption\na.jpg,ein Baum\n"
                                            .encode("utf-8-sig"))
    entries, _, _ = read_imagefolder(str(tmp_path))
    assert entries[0]["captions"] == ["ein Baum"]


@pytest.mark.parametrize("content, message", [
    ('{"caption": "no file"}\n', "has no file_name column"),
    ('{"file_name": "a.jpg", "caption": "x"}\n{"caption": "y"}\n', "row 2 has no file_name"),
    ('{"file_name": 0, "caption": "x"}\n', "row 1 has no file_name"),
    ('{"file_name": "a.jpg", "caption": "x", "split": "holdout"}\n', "split 'holdout'"),
])
def test_bad_rows_are_one_line_source_errors(tmp_path, content, message):
    _folder(tmp_path, ["a.jpg"])
    (tmp_path / "metadata.jsonl").write_text(content)
    with pytest.raises(SourceError, match=message):
        read_imagefolder(str(tmp_path))


def test_a_latin1_csv_is_named_not_utf8(tmp_path):
    (tmp_path / "metadata.csv").write_bytes("file_name,caption\na.jpg,caf\xe9\n".encode("latin-1"))
    with pytest.raises(SourceError, match="not UTF-8"):
        read_imagefolder(str(tmp_path))


def test_a_train_test_only_set_gets_a_seeded_validation_split(tmp_path, capsys):
    entries = [{"image_id": i, "captions": ["x"], "split": "train" if i < 20 else "test"}
               for i in range(24)]
    splits = {"train": entries[:20], "validation": [], "test": entries[20:]}
    args = argparse.Namespace(seed=1, val_size=None, test_size=None, limit_data=None)
    train, plan = plan_splits(args, splits)
    sizes = {name: len(list(candidates)) for name, candidates, _ in plan}
    assert sizes == {"train": 18, "validation": 2, "test": 4}
    assert "no validation split" in capsys.readouterr().err
    ids = [e["image_id"] for e in entries]
    assert sorted(ids) == sorted(e["image_id"] for e in train + splits["validation"]
                                 + splits["test"])
