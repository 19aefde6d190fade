"""Prepare COCO-format captioning data for train.py.

    python dataloader.py --source shapes --save_path ./processed_data \
        --encoder_model tiny --decoder_model tiny                       # built-in, offline
    python dataloader.py --source coco --coco_dir ./coco --limit_data 2000 \
        --save_path ./processed_data                                      # real COCO 2014

Reads COCO 2014 in its official layout (annotations/captions_{train,val}2014.json,
train2014/*.jpg, val2014/*.jpg), keeps only RGB images (grayscale and CMYK ones are dropped,
unreadable files are skipped and counted), and writes one row per image:

  pixel_values  uint8 (3, H, W) at the encoder's input size (normalised later, in train.py's
                collator, with the image processor's own mean and std): ~150 KB per image at
                224 px instead of ~3 MB of float32 per caption
  captions      every caption of the image, whitespace-normalised (metrics score against all)
  caption_ids   the captions tokenised, each ending in EOS so the decoder learns to stop

The encoder and decoder are chosen here, because the features depend on them. They are
recorded in manifest.json next to the tokenizer and image processor, and train.py builds the
model from that. Output is written to a temporary directory and renamed into place only when
complete, so an interrupted run leaves nothing train.py would accept.
"""

import argparse
import itertools
import json
import os
import random
import shutil
import sys
import time
from multiprocessing import Pool

from PIL import Image, ImageDraw

from captioning import (FORMAT_VERSION, MANIFEST, SPLITS, TINY, HelpFormatter,
                        load_image_processor, load_tokenizer, open_image, processor_resample,
                        processor_size, resize_to_uint8, split_features,
                        train_tiny_tokenizer, write_json)

SHARD_IMAGES = 2000  # rows per arrow file: bounded memory while writing, few files to open

# ----------------------------------------------------------------------------- built-in set
# Coloured shapes at positions, each image with 4-6 differently worded captions. Small
# enough to learn in a minute on a CPU, varied enough that a model which ignores the image or
# never stops talking scores badly.

COLORS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220),
          "yellow": (235, 215, 20), "purple": (140, 40, 170), "orange": (245, 140, 20)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {"top left": (0.25, 0.28), "top right": (0.75, 0.28), "center": (0.5, 0.5),
             "bottom left": (0.25, 0.72), "bottom right": (0.75, 0.72)}
TEMPLATES = ("a {color} {shape} in the {pos}",
             "a {shape} that is {color}, in the {pos}",
             "there is a {color} {shape} in the {pos} of the picture",
             "the {pos} of the image shows a {color} {shape}",
             "  A {color} {shape} sits in the {pos}. ",
             "a picture with a {color} {shape} at the {pos}")


def draw_shape_image(rng, color, shape, pos, size=(128, 96)):
    width, height = size
    shade = rng.randint(200, 250)
    img = Image.new("RGB", size, (shade, shade, shade))
    cx, cy = POSITIONS[pos][0] * width, POSITIONS[pos][1] * height
    r = rng.uniform(0.14, 0.2) * height
    cx, cy = cx + rng.uniform(-3, 3), cy + rng.uniform(-3, 3)
    draw = ImageDraw.Draw(img)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=COLORS[color])
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=COLORS[color])
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLORS[color])
    return img


def make_shapes_coco(root, num_train=1000, num_val=300, seed=0):
    """Write a deterministic synthetic captioning set in the COCO 2014 layout under `root`.

    Every 20th image is grayscale, so the RGB filter has work to do, and one training file is
    truncated, so the unreadable-file path does too.
    """
    rng = random.Random(seed)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    for split, count, first_id in (("train2014", num_train, 1), ("val2014", num_val, 500000)):
        os.makedirs(os.path.join(root, split), exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            image_id = first_id + i
            color, shape, pos = rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(list(POSITIONS))
            img = draw_shape_image(rng, color, shape, pos)
            if i % 20 == 19:
                img = img.convert("L")
            file_name = f"COCO_{split}_{image_id:012d}.jpg"
            path = os.path.join(root, split, file_name)
            img.save(path, quality=95)
            if split == "train2014" and i == 7:
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 2)
            images.append({"id": image_id, "file_name": file_name, "width": img.width,
                           "height": img.height, "coco_url": f"http://images.cocodataset.org/{split}/{file_name}"})
            for template in rng.sample(TEMPLATES, rng.randint(4, 6)):
                annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                    "caption": template.format(color=color, shape=shape, pos=pos)})
        with open(os.path.join(root, "annotations", f"captions_{split}.json"), "w") as f:
            json.dump({"images": images, "annotations": annotations}, f)


# ----------------------------------------------------------------------------- reading COCO

def normalize_caption(text):
    return " ".join(text.split())


def read_coco_split(coco_dir, split):
    """COCO captions json -> [{image_id, file_name, path, captions}] sorted by image id."""
    ann_path = os.path.join(coco_dir, "annotations", f"captions_{split}.json")
    if not os.path.isfile(ann_path):
        raise FileNotFoundError(f"missing annotations file {ann_path}")
    with open(ann_path) as f:
        data = json.load(f)
    captions = {}
    for ann in data["annotations"]:
        text = normalize_caption(ann["caption"])
        if text:
            captions.setdefault(ann["image_id"], []).append(text)
    return [{"image_id": img["id"], "file_name": img["file_name"],
             "path": os.path.join(coco_dir, split, img["file_name"]),
             "captions": captions[img["id"]]}
            for img in sorted(data["images"], key=lambda im: im["id"]) if img["id"] in captions]


def decode_image(path, size, resample):
    """-> ("ok", uint8 array) | ("non_rgb", None) | ("unreadable", None). Never raises, so one
    bad file among 100,000 can't stop a run. Runs in worker processes."""
    try:
        with open_image(path, draft_size=(size[1], size[0])) as img:
            if img.mode != "RGB":
                return "non_rgb", None
            return "ok", resize_to_uint8(img, size, resample)
    except Exception:  # truncated, zero-byte, missing, not an image: all the same to us
        return "unreadable", None


def _decode_entry(job):
    entry, size, resample = job
    return decode_image(entry["path"], size, resample)


def iter_kept_images(entries, size, resample, num_proc, chunksize, counts):
    """Yield (entry, pixels) for the RGB, readable entries, in order, counting the rest.

    Decoding runs in `num_proc` processes; the caller may stop early (at --limit_data)."""
    jobs = ((entry, size, resample) for entry in entries)
    pool = Pool(num_proc) if num_proc > 1 else None
    try:
        results = pool.imap(_decode_entry, jobs, chunksize=chunksize) if pool else map(_decode_entry, jobs)
        for entry, (status, pixels) in zip(entries, results):
            counts["seen"] += 1
            if status == "ok":
                counts["kept"] += 1
                yield entry, pixels
            else:
                counts[f"dropped_{status}"] += 1
    finally:
        if pool:
            pool.terminate()


def tokenize_captions(captions, tokenizer, max_length):
    """Captions -> token ids, each cut to max_length - 1 tokens and ended with EOS."""
    ids = tokenizer(list(captions), add_special_tokens=False)["input_ids"]
    return [row[:max_length - 1] + [tokenizer.eos_token_id] for row in ids]


def write_split(rows, out_dir, features, tokenizer, max_length, progress):
    """Stream (entry, pixels) rows into arrow shards of SHARD_IMAGES images each."""
    from datasets.arrow_writer import ArrowWriter

    os.makedirs(out_dir, exist_ok=True)
    writer, written, captions = None, 0, 0
    for entry, pixels in rows:
        if written % SHARD_IMAGES == 0:
            if writer:
                writer.finalize()
            shard = os.path.join(out_dir, f"shard-{written // SHARD_IMAGES:05d}.arrow")
            writer = ArrowWriter(features=features, path=shard)
        writer.write(features.encode_example({
            "image_id": entry["image_id"], "file_name": entry["file_name"],
            "pixel_values": pixels, "captions": entry["captions"],
            "caption_ids": tokenize_captions(entry["captions"], tokenizer, max_length)}))
        written += 1
        captions += len(entry["captions"])
        progress.update(1)
    if writer:
        writer.finalize()
    return written, captions


def select_splits(coco_dir, limit_data, val_size, test_size, seed):
    """Official split: train from train2014; validation and test drawn from val2014 without
    overlap. Candidates are shuffled with `seed`, and the limits count *kept* images."""
    train = read_coco_split(coco_dir, "train2014")
    held_out = read_coco_split(coco_dir, "val2014")
    random.Random(seed).shuffle(train)
    random.Random(seed + 1).shuffle(held_out)
    if limit_data is not None and limit_data > len(train):
        raise ValueError(f"--limit_data {limit_data} is more than the {len(train)} captioned "
                         f"images in train2014")
    if val_size + test_size > len(held_out):
        raise ValueError(f"--val_size {val_size} + --test_size {test_size} is more than the "
                         f"{len(held_out)} captioned images in val2014")
    return train, held_out


def build_tokenizer(decoder_model, train_entries, work_dir):
    if decoder_model == TINY:
        return train_tiny_tokenizer((c for e in train_entries for c in e["captions"]),
                                    os.path.join(work_dir, "bpe"))
    return load_tokenizer(decoder_model)


def prepare(args, work_dir):
    """Everything, written under work_dir. Returns the manifest."""
    from tqdm import tqdm

    train, held_out = select_splits(args.coco_dir, args.limit_data, args.val_size,
                                    args.test_size, args.seed)
    processor = load_image_processor(args.encoder_model)
    size, resample = processor_size(processor), processor_resample(processor)
    # A tiny tokenizer learns from the training split's captions only, never val/test.
    tokenizer = build_tokenizer(args.decoder_model, train, work_dir)
    features = split_features(size)

    # Counts are per source folder: validation and test are both drawn from one pass over
    # val2014, taken in turn from the same stream of kept images, so they never overlap.
    counts = {name: dict(seen=0, kept=0, dropped_non_rgb=0, dropped_unreadable=0)
              for name in ("train2014", "val2014")}
    train_kept = iter_kept_images(train, size, resample, args.num_proc, args.batch_size,
                                  counts["train2014"])
    held_out_kept = iter_kept_images(held_out, size, resample, args.num_proc, args.batch_size,
                                     counts["val2014"])
    plan = (("train", train_kept, args.limit_data),  # None: all of train2014
            ("validation", held_out_kept, args.val_size), ("test", held_out_kept, args.test_size))
    rows, captions = {}, {}
    try:
        for split, kept, wanted in plan:
            with tqdm(total=wanted or len(train), desc=f"{split:<10}", unit="img", file=sys.stderr,
                      disable=args.quiet) as bar:
                rows[split], captions[split] = write_split(
                    itertools.islice(kept, wanted), os.path.join(work_dir, split), features,
                    tokenizer, args.max_length, bar)
            if wanted is not None and rows[split] < wanted:
                raise ValueError(f"only {rows[split]} usable images for the {split} split, "
                                 f"{wanted} asked for")
    finally:
        train_kept.close()
        held_out_kept.close()

    tokenizer.save_pretrained(work_dir)
    processor.save_pretrained(work_dir)
    shutil.rmtree(os.path.join(work_dir, "bpe"), ignore_errors=True)
    counts["total"] = {k: counts["train2014"][k] + counts["val2014"][k] for k in counts["val2014"]}
    return {
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "source": args.source, "coco_dir": os.path.abspath(args.coco_dir), "split": "official",
        "encoder_model": args.encoder_model, "decoder_model": args.decoder_model,
        "image_size": list(size), "max_length": args.max_length,
        "vocab_size": len(tokenizer), "seed": args.seed,
        "rows": rows, "captions": captions, "images": counts,
    }


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--source", choices=["coco", "shapes"], default="coco",
                   help="coco: read COCO 2014 from --coco_dir; shapes: first generate the "
                        "built-in synthetic set (COCO layout) into --coco_dir, then read it")
    p.add_argument("--coco_dir", default=None,
                   help="COCO 2014 root holding annotations/, train2014/, val2014/ "
                        "(default: ./coco, or ./data/shapes_coco with --source shapes)")
    p.add_argument("--encoder_model", default="google/vit-base-patch16-224-in21k",
                   help="ViT Hub id or local directory, or 'tiny' for a small random ViT")
    p.add_argument("--decoder_model", default="gpt2",
                   help="GPT-2 Hub id or local directory, or 'tiny' for a small random GPT-2 "
                        "with a BPE tokenizer trained on the training captions")
    p.add_argument("--limit_data", type=int, default=None,
                   help="number of training *images* to keep after the RGB filter (not caption "
                        "rows); default: all of train2014")
    p.add_argument("--val_size", type=int, default=500, help="validation images, from val2014")
    p.add_argument("--test_size", type=int, default=500,
                   help="test images, from val2014, disjoint from validation")
    p.add_argument("--save_path", default="./processed_data", help="output directory")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --save_path (otherwise it is refused)")
    p.add_argument("--max_length", type=int, default=32,
                   help="maximum caption length in tokens, EOS included")
    p.add_argument("--batch_size", type=int, default=8,
                   help="images per decoding task handed to a worker process")
    p.add_argument("--num_proc", type=int, default=max(1, min(4, os.cpu_count() or 1)),
                   help="processes decoding images in parallel")
    p.add_argument("--seed", type=int, default=42, help="seed for choosing images")
    p.add_argument("--shapes_train", type=int, default=1000,
                   help="with --source shapes: images generated for train2014")
    p.add_argument("--shapes_val", type=int, default=300,
                   help="with --source shapes: images generated for val2014")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.coco_dir is None:
        args.coco_dir = "./data/shapes_coco" if args.source == "shapes" else "./coco"
    for name in ("limit_data", "max_length", "num_proc", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name} must be at least 1")
    if args.max_length < 2:
        p.error("--max_length must leave room for EOS (at least 2)")
    if args.val_size < 1 or args.test_size < 1:
        p.error("--val_size and --test_size must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    save_path = os.path.abspath(args.save_path)
    if os.path.exists(save_path) and not args.overwrite:
        print(f"dataloader.py: error: {args.save_path} exists; pass --overwrite to replace it",
              file=sys.stderr)
        return 2
    if args.source == "shapes" and not os.path.isfile(
            os.path.join(args.coco_dir, "annotations", "captions_train2014.json")):
        make_shapes_coco(args.coco_dir, args.shapes_train, args.shapes_val, seed=0)

    work_dir = f"{save_path}.tmp-{os.getpid()}"
    shutil.rmtree(work_dir, ignore_errors=True)
    os.makedirs(work_dir)
    try:
        manifest = prepare(args, work_dir)
        write_json(os.path.join(work_dir, MANIFEST), manifest)
    except (FileNotFoundError, ValueError, OSError) as e:
        shutil.rmtree(work_dir, ignore_errors=True)
        print(f"dataloader.py: error: {e}", file=sys.stderr)
        return 1
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise
    # Swap into place only now: a killed run leaves a .tmp-* directory, never a half dataset.
    if os.path.exists(save_path):
        old = f"{save_path}.old-{os.getpid()}"
        os.rename(save_path, old)
        os.rename(work_dir, save_path)
        shutil.rmtree(old)
    else:
        os.rename(work_dir, save_path)

    img = manifest["images"]["total"]
    print(f"images seen {img['seen']}, kept {img['kept']}, dropped non-RGB "
          f"{img['dropped_non_rgb']}, dropped unreadable {img['dropped_unreadable']}")
    print("rows: " + ", ".join(f"{s} {n}" for s, n in manifest["rows"].items())
          + f" -> {args.save_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
