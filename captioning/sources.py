"""Caption sets -> one list of entries, whatever the source:

    {"image_id": int, "file_name": str, "captions": [str, ...], "path": local file,
     "url": where --download fetches it}

Readers here: COCO 2014's official layout (annotations/captions_<folder>.json), Karpathy's
split file (dataset_coco.json, dataset_flickr8k/30k.json, or a parquet/Hub copy with the same
columns), and an imagefolder (metadata.jsonl/.csv); Hugging Face datasets are in hub.py.
The built-in shapes set is written in the COCO layout (shapes.py) and read as COCO.
"""

import json
import os

COCO_BASE_URL = "http://images.cocodataset.org"


class SourceError(ValueError):
    """Caption data that cannot be read; the message is one line naming the problem."""
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


KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "validation",
                   "validation": "validation", "dev": "validation", "test": "test"}


def read_karpathy(source, image_root, base_url=COCO_BASE_URL, counts=None):
    """Karpathy's split file -> {split: entries}: dataset_coco.json (filepath + filename under
    a COCO root), dataset_flickr8k.json / dataset_flickr30k.json (filename only, under
    image_root), or a parquet file / Hub dataset with the same columns. restval goes to train,
    as in every codebase that uses this split. image_id is cocoid, else imgid. With a
    `counts` dict, images missing from disk and empty captions are skipped and counted
    there (for local images; --download fetches COCO's later)."""
    if source.endswith(".json"):
        with open(source, encoding="utf-8-sig") as f:
            rows = json.load(f)["images"]
    else:
        from datasets import concatenate_datasets, load_dataset

        loaded = (load_dataset("parquet", data_files=source) if source.endswith(".parquet")
                  else load_dataset(source))
        rows = concatenate_datasets(list(loaded.values())).to_list()
    splits = {"train": [], "validation": [], "test": []}
    for number, row in enumerate(rows):
        sentences = as_caption_list(row["sentences"])
        image_id = row.get("cocoid", row.get("imgid", number))
        folder = row.get("filepath") or ""
        entry = make_entry(image_id, folder, row["filename"], sentences, image_root, base_url,
                           url=row.get("url") if base_url == COCO_BASE_URL else None)
        split = KARPATHY_SPLITS.get(str(row["split"]).lower())
        if split is None:
            raise SourceError(f"{source}: split '{row['split']}' of {row['filename']} is none "
                              f"of {', '.join(KARPATHY_SPLITS)}")
        if counts is not None:
            counts["empty_caption"] += len(sentences) - len(entry["captions"])
            if not os.path.isfile(entry["path"]):
                counts["missing_image"] += 1
                continue
            if not entry["captions"]:
                counts["no_caption"] += 1
        if entry["captions"]:
            splits[split].append(entry)
    for entries in splits.values():
        entries.sort(key=lambda e: e["image_id"])
    return splits


# ----------------------------------------------------------------------------- your own data

CAPTION_COLUMNS = ("caption", "captions", "text", "sentences")
SPLIT_NAMES = {"train": "train", "validation": "validation", "val": "validation",
               "valid": "validation", "dev": "validation", "test": "test"}


def pick_caption_column(columns, wanted, where):
    if wanted is not None:
        if wanted not in columns:
            raise SourceError(f"{where} has no column '{wanted}' (its columns: "
                              f"{', '.join(columns)}); pass --caption_column NAME")
        return wanted
    for name in CAPTION_COLUMNS:
        if name in columns:
            return name
    raise SourceError(f"{where} has none of the caption columns {', '.join(CAPTION_COLUMNS)} "
                      f"(its columns: {', '.join(columns)}); pass --caption_column NAME")


def as_caption_list(value):
    """A caption cell -> list of strings: a string, a list of strings, a Karpathy-style list
    of {"raw": ...}, or a JSON list written into a CSV cell."""
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("[") and text.endswith("]"):
            try:
                parsed = json.loads(text)
            except ValueError:
                return [value]
            return as_caption_list(parsed)
        return [value]
    if isinstance(value, dict):
        return [value.get("raw", "")]
    return [c for item in value for c in as_caption_list(item)]


def find_metadata(image_dir):
    """DIR/metadata.jsonl, else DIR/metadata.csv, else SourceError."""
    for name in ("metadata.jsonl", "metadata.csv"):
        if os.path.isfile(os.path.join(image_dir, name)):
            return os.path.join(image_dir, name)
    raise SourceError(f"{image_dir} has no metadata.jsonl or metadata.csv (a file_name column "
                      f"and a caption column, as Hugging Face's imagefolder reads)")


def read_metadata_file(path):
    """A metadata.jsonl or .csv -> rows as dicts. UTF-8, with or without a byte-order mark
    (Excel's "CSV UTF-8" writes one); any problem is a SourceError naming the line."""
    import csv

    rows = []
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            if path.endswith(".jsonl"):
                for number, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except ValueError as e:
                            raise SourceError(f"{path} line {number} is not JSON: {e}") from None
                        if not isinstance(rows[-1], dict):
                            raise SourceError(f"{path} line {number} is not a JSON object")
                return rows
            reader = csv.DictReader(f, strict=True)
            try:
                for row in reader:
                    if None in row or any(v is None for v in row.values()):
                        raise SourceError(f"{path} line {reader.line_num}: not the "
                                          f"{len(reader.fieldnames)} fields of the header")
                    rows.append(row)
            except csv.Error as e:
                raise SourceError(f"{path} line {reader.line_num}: {e}") from None
    except UnicodeDecodeError as e:
        raise SourceError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    return rows


def group_rows(rows, caption_column, where, counts):
    """Rows naming images by file_name (several may name the same one, ./a.jpg and a.jpg
    are one) -> {normalised file_name: {"captions", "split"}}, empty captions skipped and
    counted."""
    grouped = {}
    for number, row in enumerate(rows, 1):
        name = row.get("file_name")
        if not isinstance(name, str) or not name.strip():
            raise SourceError(f"{where}: row {number} has no file_name text: {row}")
        name = os.path.normpath(name.strip()).replace(os.sep, "/")
        item = grouped.setdefault(name, {"captions": [], "split": None})
        for caption in as_caption_list(row.get(caption_column)):
            if isinstance(caption, str) and normalize_caption(caption):
                item["captions"].append(caption)
            else:
                counts["empty_caption"] += 1
        split = row.get("split")
        if split not in (None, ""):
            if str(split).lower() not in SPLIT_NAMES:
                raise SourceError(f"{where}: split '{split}' for {name} is none of "
                                  f"{', '.join(sorted(SPLIT_NAMES))}")
            item["split"] = SPLIT_NAMES[str(split).lower()]
    return grouped


def read_grouped_metadata(path, caption_column, counts):
    rows = read_metadata_file(path)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    if "file_name" not in columns:
        raise SourceError(f"{path} has no file_name column (its columns: "
                          f"{', '.join(columns) or 'none'})")
    column = pick_caption_column(columns, caption_column, path)
    return group_rows(rows, column, path, counts)


def read_imagefolder(image_dir, caption_column=None):
    """A folder of images with metadata.jsonl/.csv -> (entries, has_split, counts).
    image_id is the position of the image's file_name among all names the metadata lists,
    sorted (metrics.py numbers them the same way). With a split column, rows without a value
    train."""
    counts = {"missing_image": 0, "empty_caption": 0, "no_caption": 0}
    grouped = read_grouped_metadata(find_metadata(image_dir), caption_column, counts)
    entries, has_split = [], any(item["split"] for item in grouped.values())
    for image_id, name in enumerate(sorted(grouped)):
        item, path = grouped[name], os.path.join(image_dir, name)
        if not os.path.isfile(path):
            counts["missing_image"] += 1
            continue
        entry = make_entry(image_id, os.path.dirname(name), os.path.basename(name),
                           item["captions"], image_dir, "")
        entry.update(file_name=name, path=path, split=item["split"] or "train")
        if entry["captions"]:
            entries.append(entry)
        else:
            counts["no_caption"] += 1
    return entries, has_split, counts


def references_by_image_id(path, caption_column=None):
    """{image_id: [captions]} from what metrics.py --annotations accepts: a COCO captions
    json, a Karpathy split json (image_id = cocoid, else imgid), train.py's
    test_predictions.json (its references, for any source), or an imagefolder
    metadata.jsonl/.csv (image_id = the position of file_name in sorted order, as
    read_imagefolder numbers them)."""
    if path.endswith((".jsonl", ".csv")):
        grouped = read_grouped_metadata(path, caption_column, {"empty_caption": 0})
        return {i: [normalize_caption(c) for c in grouped[name]["captions"]]
                for i, name in enumerate(sorted(grouped))}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if isinstance(data, list) and data and "references" in data[0]:  # test_predictions.json
        return {row["image_id"]: list(row["references"]) for row in data}
    if "annotations" in data:
        return captions_by_image(data["annotations"])
    if "images" in data and data["images"] and "sentences" in data["images"][0]:
        return {row.get("cocoid", row.get("imgid", n)): as_caption_list(row["sentences"])
                for n, row in enumerate(data["images"])}
    raise SourceError(f"{path} is neither a COCO captions file, a Karpathy split file nor "
                      f"an imagefolder metadata file")
