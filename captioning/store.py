"""The on-disk data format that dataloader.py writes and train.py reads:

    <save_path>/manifest.json                  what was prepared, for which models, counts
    <save_path>/{tokenizer,preprocessor} files  the tokenizer and image processor used
    <save_path>/<split>/shard-NNNNN.arrow      one row per *image* (see `split_features`)

plus the atomic JSON helpers every script uses for its outputs.
"""

import glob
import itertools
import json
import os

SPLITS = ("train", "validation", "test")
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SHARD_IMAGES = 2048  # rows per arrow file: bounded memory while writing, few files to open
WRITE_CHUNK = 64  # rows per arrow write


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json(path, obj):
    """Write through a temporary name so a crash never leaves half a JSON file behind.
    Non-ASCII text is written as itself (UTF-8), not as escapes."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
    os.replace(tmp, path)


class ManifestError(ValueError):
    """A --data_path that train.py cannot read; the message is one readable line."""


class Manifest(dict):
    """manifest.json: a dict that knows how to write, read and check itself."""

    def write(self, data_path):
        write_json(os.path.join(data_path, MANIFEST), dict(self))

    @classmethod
    def read(cls, data_path):
        path = os.path.join(data_path, MANIFEST)
        if not os.path.isdir(data_path):
            raise ManifestError(f"--data_path {data_path} does not exist; run dataloader.py "
                                f"first")
        if not os.path.isfile(path):
            raise ManifestError(f"--data_path {data_path} has no {MANIFEST}: it was not "
                                f"written by dataloader.py (or that run did not finish)")
        try:
            manifest = cls(read_json(path))
        except ValueError as e:
            raise ManifestError(f"{path} is not valid JSON: {e}") from None
        manifest.validate(data_path)
        return manifest

    def validate(self, data_path):
        if self.get("format_version") != FORMAT_VERSION:
            raise ManifestError(f"{os.path.join(data_path, MANIFEST)}: format_version "
                                f"{self.get('format_version')!r}, this train.py reads "
                                f"{FORMAT_VERSION}; rerun dataloader.py")
        for key in ("encoder_model", "decoder_model", "image_size", "max_length"):
            if key not in self:
                raise ManifestError(f"{os.path.join(data_path, MANIFEST)} lacks '{key}'; "
                                    f"rerun dataloader.py")
        for split in SPLITS:
            if not os.path.isdir(os.path.join(data_path, split)):
                raise ManifestError(f"{data_path} lacks the {split} split named in its "
                                    f"manifest")


def split_features(image_size):
    from datasets import Array3D, Features, List, Value

    return Features({
        "image_id": Value("int64"),
        "file_name": Value("string"),
        "pixel_values": Array3D(shape=(3, image_size[0], image_size[1]), dtype="uint8"),
        "captions": List(Value("string")),
        "caption_ids": List(List(Value("int32"))),  # each ends with the tokenizer's EOS
    })


def arrow_table(batch, caption_ids, features):
    """(entry, uint8 pixels) rows -> one arrow table in `features`' schema, the pixels
    passed as one flat buffer with computed offsets (datasets' per-example encoding of a
    (3, 224, 224) array costs about as much as decoding the JPEG did)."""
    import numpy as np
    import pyarrow as pa

    pixels = np.stack([p for _, p in batch])
    n, c, h, w = pixels.shape
    nested = pa.array(pixels.reshape(-1), type=pa.uint8())
    for count, width in ((n * c * h, w), (n * c, h), (n, c)):
        nested = pa.ListArray.from_arrays(np.arange(0, count * width + 1, width, dtype=np.int32),
                                          nested)
    schema = features.arrow_schema
    pixel_type = schema.field("pixel_values").type
    columns = {
        "image_id": pa.array([e["image_id"] for e, _ in batch], pa.int64()),
        "file_name": pa.array([e["file_name"] for e, _ in batch], pa.string()),
        "pixel_values": pa.ExtensionArray.from_storage(pixel_type,
                                                       nested.cast(pixel_type.storage_type)),
        "captions": pa.array([e["captions"] for e, _ in batch], schema.field("captions").type),
        "caption_ids": pa.array(caption_ids, schema.field("caption_ids").type),
    }
    return pa.Table.from_arrays([columns[name] for name in schema.names], schema=schema)


def write_split(rows, out_dir, features, tokenize, progress):
    """Stream (entry, pixels) rows into arrow shards of SHARD_IMAGES images each.
    `tokenize(captions) -> ids` tokenises a chunk's captions in one call.
    -> (images written, captions written)."""
    from datasets.arrow_writer import ArrowWriter

    shard_images = SHARD_IMAGES  # read at call time: tests shrink it
    chunk = min(WRITE_CHUNK, shard_images)
    assert shard_images % chunk == 0, "a write must never straddle two shards"
    os.makedirs(out_dir, exist_ok=True)
    writer, written, captions = None, 0, 0
    rows = iter(rows)
    while batch := list(itertools.islice(rows, chunk)):
        if written % shard_images == 0:
            if writer:
                writer.finalize()
            shard = os.path.join(out_dir, f"shard-{written // shard_images:05d}.arrow")
            writer = ArrowWriter(features=features, path=shard)
        ids = iter(tokenize([c for e, _ in batch for c in e["captions"]]))
        caption_ids = [list(itertools.islice(ids, len(e["captions"]))) for e, _ in batch]
        writer.write_table(arrow_table(batch, caption_ids, features))
        written += len(batch)
        captions += sum(len(e["captions"]) for e, _ in batch)
        progress.update(len(batch))
    if writer:
        writer.finalize()
    return written, captions


def load_split(data_path, split):
    """One split as a memory-mapped Dataset. pixel_values come out as numpy uint8 (datasets'
    numpy/torch formats would widen them to int64, 8x the bytes); the rest as Python lists."""
    import numpy as np
    from datasets import Dataset, concatenate_datasets

    shards = sorted(glob.glob(os.path.join(data_path, split, "shard-*.arrow")))
    if not shards:
        raise FileNotFoundError(f"{data_path}: no shards for split '{split}'")
    parts = [Dataset.from_file(path) for path in shards]
    ds = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
    return ds.with_format("numpy", columns=["pixel_values"], dtype=np.uint8,
                          output_all_columns=True)
