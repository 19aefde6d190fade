"""Prepare COCO-format captioning data for train.py.

    python dataloader.py --source shapes --save_path ./processed_data \
        --encoder_model tiny --decoder_model tiny                       # built-in, offline
    python dataloader.py --coco_dir ./coco --limit_data 2000 --save_path ./processed_data
    python dataloader.py --download --coco_dir ./coco --limit_data 2000   # fetch what's needed
    python dataloader.py --split karpathy --karpathy_json dataset_coco.json --coco_dir ./coco

Reads COCO 2014 in its official layout (annotations/captions_{train,val}2014.json,
train2014/*.jpg, val2014/*.jpg), keeps only RGB images (grayscale and CMYK ones are dropped,
or converted with --convert_grayscale; unreadable files are skipped and counted), and writes
one row per image:

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
import functools
import glob
import itertools
import os
import random
import shutil
import sys
import time
from multiprocessing import Pool

from captioning.cli import (HelpFormatter, configure_runtime, error_exit, positive_float,
                            positive_int, non_negative_int)
from captioning.coco_download import fetch_annotations, fetch_missing
from captioning.fetch import Client
from captioning.images import decode_for_storage, processor_resample, processor_size
from captioning.modeling import (TINY, load_image_processor, load_tokenizer, tokenize_captions,
                                 train_tiny_tokenizer)
from captioning.shapes import make_shapes_coco
from captioning.sources import COCO_BASE_URL, coco_annotation_path, read_coco_split, read_karpathy
from captioning.store import FORMAT_VERSION, SPLITS, Manifest, split_features, write_split

DEFAULT_ENCODER = "google/vit-base-patch16-224-in21k"
DEFAULT_DECODER = "gpt2"
MAX_WAVE = 512  # images fetched and decoded at a time: bounds memory on a 100,000-image run

# ----------------------------------------------------------------------------- decoding

def _decode_job(job):
    return decode_for_storage(*job)


def decode_wave(wave, size, resample, convert_grayscale, pool=None, chunksize=8):
    """Entries -> iterator of (status, pixels), in order, in the pool's processes if any."""
    jobs = [(e["path"], size, resample, convert_grayscale) for e in wave]
    return pool.imap(_decode_job, jobs, chunksize=chunksize) if pool else map(_decode_job, jobs)


def kept_images(candidates, wanted, decode, counts, fetch=None):
    """Yield (entry, pixels) for up to `wanted` usable images (None: all), taking candidates
    from the iterator in waves no larger than what is still missing. Nothing past the last
    image needed is fetched or decoded, and validation and test can share one iterator."""
    kept = 0
    while wanted is None or kept < wanted:
        wave = list(itertools.islice(candidates, MAX_WAVE if wanted is None
                                     else min(MAX_WAVE, wanted - kept)))
        if not wave:
            return
        if fetch is not None:
            fetch(wave, counts=counts)
        for entry, (status, pixels) in zip(wave, decode(wave)):
            counts["seen"] += 1
            if pixels is None:
                counts[f"dropped_{status}"] += 1
                continue
            counts["converted_non_rgb"] += status == "converted"
            counts["kept"] += 1
            kept += 1
            yield entry, pixels


# ----------------------------------------------------------------------------- the run

def note(message):
    print(f"dataloader.py: {message}", file=sys.stderr)


def fit_sizes(args, available):
    """--limit_data, --val_size and --test_size against what the data holds -> the wanted
    kept-image counts {split: n or None (all)}. Asking for more than there is takes what
    there is and says so, as the HF scripts' --max_train_samples do."""
    wanted = {"train": args.limit_data, "validation": args.val_size, "test": args.test_size}
    if wanted["train"] is not None and wanted["train"] > available["train"]:
        note(f"--limit_data {wanted['train']}: there are only {available['train']} captioned "
             f"training images; taking all of them")
        wanted["train"] = None
    held = available.get("held_out")
    if held is not None and wanted["validation"] + wanted["test"] > held:
        share = wanted["validation"] / (wanted["validation"] + wanted["test"])
        note(f"val2014 has {held} captioned images, fewer than --val_size "
             f"{wanted['validation']} + --test_size {wanted['test']}: splitting them "
             f"{share:.0%} / {1 - share:.0%} into validation and test")
        wanted["validation"], wanted["test"] = max(1, round(held * share)), None
    for split, flag in (("validation", "--val_size"), ("test", "--test_size")):
        if split in available and wanted[split] is not None and wanted[split] > available[split]:
            note(f"{flag} {wanted[split]}: there are only {available[split]} {split} images; "
                 f"taking all of them")
            wanted[split] = None
    return wanted


def select_candidates(args, client=None):
    """-> (train entries, [(split, candidate iterator, wanted kept images or None)]).
    --limit_data, --val_size and --test_size count *kept* images; candidates are taken in a
    seeded order."""
    if args.split == "karpathy":
        splits = read_karpathy(args.karpathy_json, args.coco_dir, args.coco_base_url)
        train, val, test = splits["train"], splits["validation"], splits["test"]
        random.Random(args.seed).shuffle(train)
        val_iter, test_iter = iter(val), iter(test)
        available = {"train": len(train), "validation": len(val), "test": len(test)}
    else:
        if args.download:
            fetch_annotations(args.coco_dir, args.coco_base_url, args, client)
        train = read_coco_split(args.coco_dir, "train2014", args.coco_base_url)
        held_out = read_coco_split(args.coco_dir, "val2014", args.coco_base_url)
        random.Random(args.seed).shuffle(train)
        random.Random(args.seed + 1).shuffle(held_out)
        val_iter = test_iter = iter(held_out)  # one pass: the two never overlap
        available = {"train": len(train), "held_out": len(held_out)}
    if not train:
        raise ValueError("no captioned training images selected")
    wanted = fit_sizes(args, available)
    return train, [("train", iter(train), wanted["train"]),
                   ("validation", val_iter, wanted["validation"]),
                   ("test", test_iter, wanted["test"])]


def prepare(args, work_dir):
    """Everything, written under work_dir. Returns the manifest."""
    from tqdm import tqdm

    client = Client(args.download_workers, args.timeout) if args.download else None
    train, plan = select_candidates(args, client)
    processor = load_image_processor(args.encoder_model)
    size, resample = processor_size(processor), processor_resample(processor)
    # A tiny tokenizer learns from training captions only, never validation or test ones.
    tokenizer = (train_tiny_tokenizer((c for e in train for c in e["captions"]),
                                      os.path.join(work_dir, "bpe"))
                 if args.decoder_model == TINY else load_tokenizer(args.decoder_model))
    features = split_features(size)

    pool = Pool(args.num_proc) if args.num_proc > 1 else None
    decode = functools.partial(decode_wave, size=size, resample=resample,
                               convert_grayscale=args.convert_grayscale, pool=pool,
                               chunksize=args.batch_size)
    fetch = functools.partial(fetch_missing, args=args, client=client) if client else None
    tokenize = functools.partial(tokenize_captions, tokenizer=tokenizer,
                                 max_length=args.max_length)
    counts, rows, captions = {}, {}, {}
    try:
        for split, candidates, wanted in plan:
            counts[split] = dict.fromkeys(
                ("seen", "kept", "dropped_non_rgb", "dropped_unreadable", "converted_non_rgb",
                 "already_present", "downloaded", "download_failed"), 0)
            total = wanted or (len(train) if split == "train" else None)
            with tqdm(total=total, desc=f"{split:<10}", unit="img", file=sys.stderr,
                      disable=args.quiet) as bar:
                rows[split], captions[split] = write_split(
                    kept_images(candidates, wanted, decode, counts[split], fetch),
                    os.path.join(work_dir, split), features, tokenize, bar)
            if rows[split] == 0 or (wanted is not None and rows[split] < wanted):
                raise ValueError(f"only {rows[split]} usable images for the {split} split, "
                                 f"{wanted or 'at least 1'} needed")
    finally:
        if pool:
            pool.terminate()
        if client:
            client.close()

    tokenizer.save_pretrained(work_dir)
    processor.save_pretrained(work_dir)
    shutil.rmtree(os.path.join(work_dir, "bpe"), ignore_errors=True)
    counts["total"] = {k: sum(counts[s][k] for s in SPLITS) for k in counts["train"]}
    return Manifest({
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "source": args.source, "coco_dir": os.path.abspath(args.coco_dir), "split": args.split,
        "encoder_model": args.encoder_model, "decoder_model": args.decoder_model,
        "image_size": list(size), "max_length": args.max_length,
        "vocab_size": len(tokenizer), "seed": args.seed,
        "convert_grayscale": args.convert_grayscale,
        "rows": rows, "captions": captions, "images": counts,
    })


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--source", choices=["coco", "shapes"], default="coco",
                   help="coco: read COCO 2014 from --coco_dir; shapes: first generate the "
                        "built-in synthetic set (COCO layout) into --coco_dir, then read it")
    p.add_argument("--coco_dir", default=None,
                   help="COCO 2014 root holding annotations/, train2014/, val2014/ "
                        "(default: ./coco, or ./data/shapes_coco with --source shapes)")
    p.add_argument("--split", choices=["official", "karpathy"], default="official",
                   help="official: train from train2014, validation and test drawn from "
                        "val2014 without overlap; karpathy: the splits of --karpathy_json")
    p.add_argument("--karpathy_json", default=None,
                   help="Karpathy's dataset_coco.json, a parquet file with its columns, or a "
                        "Hub dataset id such as yerevann/coco-karpathy")
    p.add_argument("--encoder_model", default=None,
                   help="ViT Hub id or local directory, or 'tiny' for a small random ViT "
                        f"(default: {DEFAULT_ENCODER}; tiny with --source shapes)")
    p.add_argument("--decoder_model", default=None,
                   help="GPT-2 Hub id or local directory, or 'tiny' for a small random GPT-2 "
                        "with a BPE tokenizer trained on the training captions "
                        f"(default: {DEFAULT_DECODER}; tiny with --source shapes)")
    p.add_argument("--limit_data", type=positive_int, default=None,
                   help="number of training *images* to keep after the RGB filter (not caption "
                        "rows); more than there are takes all (default: all)")
    p.add_argument("--val_size", type=positive_int, default=None,
                   help="validation images (default: 500 for official, all for karpathy); "
                        "when val2014 holds fewer than --val_size + --test_size, it is split "
                        "in the same proportion")
    p.add_argument("--test_size", type=positive_int, default=None,
                   help="test images (default: 500 for official, all for karpathy)")
    p.add_argument("--convert_grayscale", action="store_true",
                   help="keep grayscale/CMYK images, converted to RGB, instead of dropping them")
    p.add_argument("--save_path", default="./processed_data", help="output directory")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --save_path (otherwise it is refused)")
    p.add_argument("--max_length", type=positive_int, default=32,
                   help="maximum caption length in tokens, EOS included")
    p.add_argument("--batch_size", type=positive_int, default=8,
                   help="images per decoding task handed to a worker process")
    p.add_argument("--num_proc", type=positive_int, default=max(1, min(4, os.cpu_count() or 1)),
                   help="processes decoding images in parallel")
    p.add_argument("--download", action="store_true",
                   help="fetch the caption annotations and only the selected images that are "
                        "not already in --coco_dir")
    p.add_argument("--coco_base_url", default=COCO_BASE_URL, help="COCO server or mirror")
    p.add_argument("--download_workers", type=positive_int, default=16, help="parallel downloads")
    p.add_argument("--timeout", type=positive_float, default=30.0, help="seconds per connect or read")
    p.add_argument("--retries", type=non_negative_int, default=3,
                   help="retries of a failed download, with exponential backoff")
    p.add_argument("--seed", type=int, default=42, help="seed for choosing images")
    p.add_argument("--shapes_train", type=positive_int, default=1000,
                   help="with --source shapes: images generated for train2014")
    p.add_argument("--shapes_val", type=positive_int, default=300,
                   help="with --source shapes: images generated for val2014")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    shapes = args.source == "shapes"
    if args.coco_dir is None:
        args.coco_dir = "./data/shapes_coco" if shapes else "./coco"
    # The built-in set is for running offline: tiny models unless told otherwise.
    args.encoder_model = args.encoder_model or (TINY if shapes else DEFAULT_ENCODER)
    args.decoder_model = args.decoder_model or (TINY if shapes else DEFAULT_DECODER)
    args.coco_base_url = args.coco_base_url.rstrip("/")
    if args.split == "karpathy" and not args.karpathy_json:
        p.error("--split karpathy needs --karpathy_json")
    if args.split == "official":
        args.val_size = 500 if args.val_size is None else args.val_size
        args.test_size = 500 if args.test_size is None else args.test_size
    if args.max_length < 2:
        p.error("--max_length must leave room for EOS (at least 2)")
    return args


def main(argv=None):
    args = parse_args(argv)
    configure_runtime()
    save_path = os.path.abspath(args.save_path)
    if os.path.exists(save_path) and not args.overwrite:
        return error_exit("dataloader.py", f"{args.save_path} exists; pass --overwrite to "
                                           f"replace it")
    if args.source == "shapes" and not os.path.isfile(
            coco_annotation_path(args.coco_dir, "train2014")):
        make_shapes_coco(args.coco_dir, args.shapes_train, args.shapes_val, seed=0)

    for stale in glob.glob(f"{glob.escape(save_path)}.tmp-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    work_dir = f"{save_path}.tmp-{os.getpid()}"
    os.makedirs(work_dir)
    try:
        manifest = prepare(args, work_dir)
        manifest.write(work_dir)
    except (FileNotFoundError, ValueError, OSError, KeyError) as e:
        shutil.rmtree(work_dir, ignore_errors=True)
        message = f"bad input file, missing field {e}" if isinstance(e, KeyError) else e
        return error_exit("dataloader.py", message, code=1)
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
    print(f"images seen {img['seen']}, kept {img['kept']} ({img['converted_non_rgb']} converted "
          f"to RGB), dropped non-RGB {img['dropped_non_rgb']}, dropped unreadable "
          f"{img['dropped_unreadable']}")
    if args.download:
        print(f"downloads: {img['downloaded']} fetched, {img['already_present']} already "
              f"present, {img['download_failed']} failed")
    print("rows: " + ", ".join(f"{s} {n}" for s, n in manifest["rows"].items())
          + f" -> {args.save_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
