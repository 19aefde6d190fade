"""dataloader.py on real-COCO trouble: downloads from a misbehaving server, the Karpathy
split from json and parquet, and every kind of bad image file."""

import json
import os

import pytest
from PIL import Image

import dataloader
from captioning.store import load_split


pytestmark = pytest.mark.slow


def _serve_coco_tree(root, routes, bad):
    """Serve root's files; bad[path] in {"404", "truncated", "corrupt", "slow"}."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            full = os.path.join(dirpath, name)
            path = "/" + os.path.relpath(full, root)
            body = open(full, "rb").read()
            kind = bad.get(path)
            if kind == "404":
                continue
            if kind == "truncated":  # claims the full length, sends half, hangs up
                routes[path] = (200, body[:len(body) // 2], "image/jpeg", {"length": len(body)})
            elif kind == "corrupt":
                routes[path] = (200, b"\xff\xd8\xff" + b"\x00" * 500, "image/jpeg")
            elif kind == "slow":
                routes[path] = (200, body, "image/jpeg", {"delay": 0.3})
            else:
                routes[path] = (200, body, "application/json" if name.endswith("json")
                                else "image/jpeg")


def test_download_fetches_only_selected_images_and_resumes(shapes_coco, tmp_path, http_server):
    url, routes = http_server
    files = sorted(f for f in os.listdir(os.path.join(shapes_coco, "train2014")))
    bad = {}
    for i, name in enumerate(files):
        kind = {0: "404", 1: "truncated", 2: "corrupt", 3: "slow"}.get(i % 6)
        if kind:
            bad[f"/train2014/{name}"] = kind
    _serve_coco_tree(shapes_coco, routes, bad)
    coco = tmp_path / "coco"
    args = ["--download", "--coco_dir", str(coco), "--coco_base_url", url, "--limit_data", "20",
            "--val_size", "4", "--test_size", "4", "--encoder_model", "tiny",
            "--decoder_model", "tiny", "--retries", "1", "--timeout", "5", "--quiet",
            "--save_path", str(tmp_path / "data")]
    assert dataloader.main(args) == 0
    m = json.load(open(tmp_path / "data" / "manifest.json"))
    total = m["images"]["total"]
    requested = {p for p in routes.log if not p.startswith("/annotations")}
    # Only what the run looked at was fetched: one distinct request per image seen.
    assert len(requested) == total["seen"]
    assert total["downloaded"] + total["download_failed"] == total["seen"]
    seen_bad = {p: k for p, k in bad.items() if p in requested}
    failed = sum(k in ("404", "truncated") for k in seen_bad.values())
    assert total["download_failed"] == failed > 0
    corrupt = sum(k == "corrupt" for k in seen_bad.values()) + (
        "/train2014/COCO_train2014_000000000008.jpg" in requested)  # truncated on disk
    assert total["dropped_unreadable"] == failed + corrupt
    assert m["rows"] == {"train": 20, "validation": 4, "test": 4}
    assert not [f for f in os.listdir(coco / "train2014") if ".part-" in f]

    # A second run fetches nothing it already has.
    good = requested - set(seen_bad)
    routes.log.clear()
    assert dataloader.main(args + ["--overwrite"]) == 0
    assert not good & set(routes.log)
    again = json.load(open(tmp_path / "data" / "manifest.json"))["images"]["total"]
    assert again["already_present"] >= len(good) - 1


def _karpathy_rows(shapes_coco):
    rows = []
    for folder in ("train2014", "val2014"):
        data = json.load(open(os.path.join(shapes_coco, "annotations", f"captions_{folder}.json")))
        caps = {}
        for a in data["annotations"]:
            caps.setdefault(a["image_id"], []).append(a["caption"])
        for i, img in enumerate(sorted(data["images"], key=lambda x: x["id"])):
            split = (("train", "restval")[i % 2] if folder == "train2014"
                     else ("val", "test")[i % 2])
            rows.append({"filepath": folder, "filename": img["file_name"], "split": split,
                         "cocoid": img["id"], "sentences": caps[img["id"]]})
    return rows


@pytest.mark.parametrize("form", ["json", "parquet"])
def test_karpathy_split(shapes_coco, tmp_path, form):
    rows = _karpathy_rows(shapes_coco)
    if form == "json":
        source = tmp_path / "dataset_coco.json"
        json.dump({"images": [{**r, "sentences": [{"raw": s} for s in r["sentences"]]}
                              for r in rows]}, open(source, "w"))
    else:
        from datasets import Dataset

        source = tmp_path / "karpathy.parquet"
        Dataset.from_list([{**r, "url": None} for r in rows]).to_parquet(str(source))
    out = tmp_path / "data"
    assert dataloader.main(["--split", "karpathy", "--karpathy_json", str(source),
                            "--coco_dir", shapes_coco, "--save_path", str(out),
                            "--encoder_model", "tiny", "--decoder_model", "tiny",
                            "--limit_data", "30", "--num_proc", "2", "--quiet"]) == 0
    by_split = {}
    for r in rows:
        name = {"train": "train", "restval": "train", "val": "validation", "test": "test"}[r["split"]]
        by_split.setdefault(name, set()).add(r["cocoid"])
    ids = {s: set(load_split(str(out), s)["image_id"]) for s in ("train", "validation", "test")}
    for split, got in ids.items():
        assert got and got <= by_split[split]
    assert not (ids["train"] & ids["validation"] or ids["train"] & ids["test"]
                or ids["validation"] & ids["test"])
    m = json.load(open(out / "manifest.json"))
    assert m["split"] == "karpathy" and m["rows"]["train"] == 30
    # default sizes take every validation/test image that decodes (one val image is grayscale)
    assert m["rows"]["validation"] + m["rows"]["test"] == 29


def _bad_coco(root):
    """10 train images: 5 RGB, grayscale, CMYK, truncated, zero-byte, missing."""
    os.makedirs(root / "annotations")
    os.makedirs(root / "train2014")
    os.makedirs(root / "val2014")
    images, anns = [], []
    for i, kind in enumerate(["rgb"] * 5 + ["gray", "cmyk", "truncated", "empty", "missing"]):
        name = f"COCO_train2014_{i + 1:012d}.jpg"
        path = root / "train2014" / name
        if kind in ("rgb", "truncated"):
            Image.new("RGB", (50, 40), (10 * i, 100, 200)).save(path, quality=95)
        elif kind == "gray":
            Image.new("L", (50, 40), 90).save(path)
        elif kind == "cmyk":
            Image.new("CMYK", (50, 40), (0, 50, 100, 0)).save(path)
        elif kind == "empty":
            path.write_bytes(b"")
        if kind == "truncated":
            path.write_bytes(path.read_bytes()[:300])
        images.append({"id": i + 1, "file_name": name})
        anns += [{"image_id": i + 1, "caption": f"  image   number {i}  "},
                 {"image_id": i + 1, "caption": f"picture {i}"}]
    json.dump({"images": images, "annotations": anns},
              open(root / "annotations" / "captions_train2014.json", "w"))
    val = []
    for i in range(4):
        name = f"COCO_val2014_{100 + i:012d}.jpg"
        Image.new("RGB", (50, 40), (200, 10 * i, 0)).save(root / "val2014" / name)
        val.append({"id": 100 + i, "file_name": name})
    json.dump({"images": val, "annotations": [{"image_id": v["id"], "caption": "red"} for v in val]},
              open(root / "annotations" / "captions_val2014.json", "w"))


@pytest.mark.parametrize("convert", [False, True])
def test_every_kind_of_bad_file_is_counted(tmp_path, convert):
    coco = tmp_path / "coco"
    _bad_coco(coco)
    out = tmp_path / "data"
    assert dataloader.main(["--coco_dir", str(coco), "--save_path", str(out), "--val_size", "2",
                            "--test_size", "2", "--encoder_model", "tiny", "--decoder_model",
                            "tiny", "--quiet"] + (["--convert_grayscale"] if convert else [])) == 0
    m = json.load(open(out / "manifest.json"))
    train = m["images"]["train"]
    assert train["seen"] == 10 and train["dropped_unreadable"] == 3
    if convert:
        assert (train["kept"], train["converted_non_rgb"], train["dropped_non_rgb"]) == (7, 2, 0)
    else:
        assert (train["kept"], train["converted_non_rgb"], train["dropped_non_rgb"]) == (5, 0, 2)
    ds = load_split(str(out), "train")
    assert all(c == [f"image number {i}", f"picture {i}"] for i, c in
               zip([int(n[-9:-4]) - 1 for n in ds["file_name"]], ds["captions"]))
