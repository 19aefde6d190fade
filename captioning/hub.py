"""A Hugging Face dataset as a caption source (dataloader.py --source hub): a Hub id, a
local parquet file or a save_to_disk folder with an Image column and a caption column, read
into the same entry list as every other source. Only the caption column is read up front;
images are read a wave at a time, just before decoding, so a large set is never in memory.
"""

import os

from .sources import (SPLIT_NAMES, SourceError, as_caption_list, make_entry, normalize_caption,
                      pick_caption_column)


def load_hub_dataset(name_or_path):
    """A Hub id, a local parquet file, or a save_to_disk folder -> {split name: Dataset}."""
    import datasets

    if os.path.isdir(name_or_path) and (
            os.path.isfile(os.path.join(name_or_path, "dataset_info.json"))
            or os.path.isfile(os.path.join(name_or_path, "dataset_dict.json"))):
        loaded = datasets.load_from_disk(name_or_path)
    elif name_or_path.endswith(".parquet"):
        loaded = datasets.load_dataset("parquet", data_files=name_or_path)
    else:
        loaded = datasets.load_dataset(name_or_path)
    return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}


def read_hub(name_or_path, image_column=None, caption_column=None):
    """A dataset with an Image column and a caption column -> (entries, has_split, counts,
    {split: dataset with the image column left undecoded}). Only the caption column is read
    here; images are read a wave at a time by `load_hub_images`."""
    import datasets

    parts = load_hub_dataset(name_or_path)
    first = next(iter(parts.values()))
    images = [n for n, f in first.features.items() if isinstance(f, datasets.Image)]
    if image_column is None:
        if len(images) != 1:
            raise SourceError(f"{name_or_path}: {len(images)} image columns "
                              f"({', '.join(images) or 'none'}); pass --image_column NAME")
        image_column = images[0]
    elif image_column not in first.column_names:
        raise SourceError(f"{name_or_path} has no column '{image_column}' (its columns: "
                          f"{', '.join(first.column_names)})")
    column = pick_caption_column(first.column_names, caption_column, name_or_path)
    unknown = [k for k in parts if k.lower() not in SPLIT_NAMES]
    if unknown and len(parts) > 1:
        raise SourceError(f"{name_or_path}: splits {', '.join(unknown)} are none of "
                          f"{', '.join(sorted(SPLIT_NAMES))}")
    has_split = len(parts) > 1
    counts = {"missing_image": 0, "empty_caption": 0, "no_caption": 0}
    entries, undecoded = [], {}
    for part, ds in parts.items():
        undecoded[part] = ds.cast_column(image_column, datasets.Image(decode=False))
        for i, value in enumerate(ds.select_columns([column])[column]):
            captions = as_caption_list(value)
            kept = [c for c in captions if normalize_caption(c)]
            counts["empty_caption"] += len(captions) - len(kept)
            if not kept:
                counts["no_caption"] += 1
                continue
            entry = make_entry(len(entries), part, str(i), kept, "", "")
            entry.update(file_name=f"{part}/{i}", path=None, hub=(part, i), url=None,
                         split=SPLIT_NAMES.get(part.lower(), "train"))
            entries.append(entry)
    return entries, has_split, counts, (undecoded, image_column)


def load_hub_images(wave, *, hub, counts):
    """The `fetch` step of a Hub source: the wave's encoded image bytes, read from the
    dataset just before decoding (entry["data"]; dataloader.py drops it after)."""
    undecoded, column = hub
    by_part = {}
    for entry in wave:
        by_part.setdefault(entry["hub"][0], []).append(entry)
    for part, entries in by_part.items():
        cells = undecoded[part][[e["hub"][1] for e in entries]][column]
        for entry, cell in zip(entries, cells):  # a null image decodes as unreadable
            entry["data"] = (cell.get("bytes") or cell.get("path")) if cell else b""
