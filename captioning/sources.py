"""Caption sets -> one list of entries, whatever the source:

    {"image_id": int, "file_name": str, "captions": [str, ...], "path": local file,
     "url": where --download fetches it}

Readers here: COCO 2014's official layout (annotations/captions_<folder>.json) and
Karpathy's split file (dataset_coco.json, or a parquet/Hub copy with the same columns).
The built-in shapes set is written in the COCO layout (shapes.py) and read as COCO.
"""

import json
import os

COCO_BASE_URL = "http://images.cocodataset.org"
COCO_FOLDERS = ("train2014", "val2014")


def normalize_caption(text):
    return " ".join(text.split())


def captions_by_image(annotations):
    """COCO annotations [{image_id, caption}] -> {image_id: [captions in file order]}."""
    grouped = {}
    for ann in annotations:
        grouped.setdefault(ann["image_id"], []).append(ann["caption"])
    return grouped


def make_entry(image_id, folder, file_name, captions, coco_dir, base_url, url=None):
    captions = [c for c in (normalize_caption(t) for t in captions) if c]
    return {"image_id": int(image_id), "file_name": file_name, "captions": captions,
            "path": os.path.join(coco_dir, folder, file_name),
            "url": url or f"{base_url.rstrip('/')}/{folder}/{file_name}"}


def coco_annotation_path(coco_dir, folder):
    return os.path.join(coco_dir, "annotations", f"captions_{folder}.json")


def read_coco_split(coco_dir, folder, base_url=COCO_BASE_URL):
    """captions_<folder>.json -> entries sorted by image id (images without captions left out)."""
    ann_path = coco_annotation_path(coco_dir, folder)
    if not os.path.isfile(ann_path):
        raise FileNotFoundError(f"missing annotations file {ann_path} (add --download to "
                                f"fetch it)")
    with open(ann_path, encoding="utf-8") as f:
        data = json.load(f)
    captions = captions_by_image(data["annotations"])
    entries = [make_entry(img["id"], folder, img["file_name"], captions.get(img["id"], []),
                          coco_dir, base_url)
               for img in sorted(data["images"], key=lambda im: im["id"])]
    return [e for e in entries if e["captions"]]


KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "validation", "test": "test"}


def read_karpathy(source, coco_dir, base_url=COCO_BASE_URL):
    """Karpathy's dataset_coco.json, a parquet file, or a Hub dataset with the same columns
    (filepath, filename, split, sentences, cocoid[, url]) -> {split: entries}.
    restval goes to train, as in every codebase that uses this split."""
    if source.endswith(".json"):
        with open(source, encoding="utf-8") as f:
            rows = json.load(f)["images"]
    else:
        from datasets import concatenate_datasets, load_dataset

        loaded = (load_dataset("parquet", data_files=source) if source.endswith(".parquet")
                  else load_dataset(source))
        rows = concatenate_datasets(list(loaded.values())).to_list()
    splits = {"train": [], "validation": [], "test": []}
    for row in rows:
        sentences = [s["raw"] if isinstance(s, dict) else s for s in row["sentences"]]
        entry = make_entry(row["cocoid"], row["filepath"], row["filename"], sentences,
                           coco_dir, base_url, url=row.get("url") if base_url == COCO_BASE_URL
                           else None)
        if entry["captions"]:
            splits[KARPATHY_SPLITS[row["split"]]].append(entry)
    for entries in splits.values():
        entries.sort(key=lambda e: e["image_id"])
    return splits
