"""Prepare captioning data (COCO 2014, or your own) for train.py.

    python dataloader.py --source shapes --limit_data 400                 # built-in, offline
    python dataloader.py --coco_dir ./coco --limit_data 2000 --save_path ./processed_data
    python dataloader.py --download --coco_dir ./coco --limit_data 2000   # fetch what's needed
    python dataloader.py --split karpathy --karpathy_json dataset_coco.json --coco_dir ./coco
    python dataloader.py --source folder --image_dir ./my_images          # metadata.jsonl/.csv
    python dataloader.py --source karpathy --karpathy_json dataset_flickr8k.json --image_dir ./Flicker8k_Dataset
    python dataloader.py --source hub --dataset ./captions.parquet

Reads COCO 2014 in its official layout (annotations/captions_{train,val}2014.json,
train2014/*.jpg, val2014/*.jpg), or any caption set captioning/sources.py reads, into the same
entry list; keeps only RGB images (grayscale and CMYK ones are dropped,
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
import shutil
import sys
import time
from multiprocessing import Pool

from captioning.cli import (HelpFormatter, configure_runtime, error_exit, positive_float,
                            positive_int, non_negative_int)
from captioning.fetch import Client
from captioning.images import decode_for_storage, processor_resample, processor_size
from captioning.modeling import (TINY, load_image_processor, load_tokenizer, tokenize_captions,
                                 train_tiny_tokenizer)
from captioning.shapes import make_shapes_coco
from captioning.splits import select_candidates
from captioning.sources import COCO_BASE_URL, SourceError, coco_annotation_path
from captioning.store import FORMAT_VERSION, SPLITS, Manifest, split_features, write_split

DEFAULT_ENCODER = "google/vit-base-patch16-224-in21k"
DEFAULT_DECODER = "gpt2"
MAX_WAVE = 512  # images fetched and decoded at a time: bounds memory on a 100,000-image run

# ----------------------------------------------------------------------------- decoding

def _decode_job(job):
    return decode_for_storage(*job)


def decode_wave(wave, size, resample, convert_grayscale, pool=None, chunksize=8):
    """Entries -> iterator of (status, pixels), in order, in the pool's processes if any."""
    jobs = [(e.get("data") or e["path"], size, resample, convert_grayscale) for e in wave]
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
            entry.pop("data", None)  # a Hub image's bytes: decoded, not needed any more
            counts["seen"] += 1
            if pixels is None:
                counts[f"dropped_{status}"] += 1
                continue
            counts["converted_non_rgb"] += status == "converted"
            counts["kept"] += 1
            kept += 1
            yield entry, pixels


# ----------------------------------------------------------------------------- the run

def prepare(args, work_dir):
    """Everything, written under work_dir. Returns the manifest."""
    client = Client(args.download_workers, args.timeout) if args.download else None
    try:
        return write_splits(args, work_dir, client)
    finally:
        if client:
            client.close()


def write_splits(args, work_dir, client):
    """prepare's work: choose, decode, tokenise and write every split."""
    from tqdm import tqdm

    train, plan, fetch, skipped = select_candidates(args, client)
    processor = load_image_processor(args.from_model or args.encoder_model)
    size, resample = processor_size(processor), processor_resample(processor)
    # A tiny tokenizer learns from training captions only, never validation or test ones.
    if args.from_model:
        tokenizer = load_tokenizer(args.from_model)
    elif args.decoder_model == TINY:
        tokenizer = train_tiny_tokenizer((c for e in train for c in e["captions"]),
                                         os.path.join(work_dir, "bpe"))
    else:
        tokenizer = load_tokenizer(args.decoder_model)
    features = split_features(size)

    pool = Pool(args.num_proc) if args.num_proc > 1 else None
    decode = functools.partial(decode_wave, size=size, resample=resample,
                               convert_grayscale=args.convert_grayscale, pool=pool,
                               chunksize=args.batch_size)
    stats = {"captions_truncated": 0}
    tokenize = functools.partial(tokenize_captions, tokenizer=tokenizer,
                                 max_length=args.max_length, stats=stats)
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

    tokenizer.save_pretrained(work_dir)
    processor.save_pretrained(work_dir)
    shutil.rmtree(os.path.join(work_dir, "bpe"), ignore_errors=True)
    counts["total"] = {k: sum(counts[s][k] for s in SPLITS) for k in counts["train"]}
    return Manifest({
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "source": args.source, "split": args.split,
        "data": os.path.abspath(args.image_dir or args.coco_dir) if args.source != "hub"
        else args.dataset,
        "encoder_model": args.encoder_model, "decoder_model": args.decoder_model,
        "from_model": args.from_model,
        "image_size": list(size), "max_length": args.max_length,
        "vocab_size": len(tokenizer), "seed": args.seed,
        "convert_grayscale": args.convert_grayscale,
        "rows": rows, "captions": captions, "images": counts,
        "skipped": skipped, "captions_truncated": stats["captions_truncated"],
    })


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--source", choices=["coco", "shapes", "folder", "karpathy", "hub"],
                   default="coco",
                   help="coco: COCO 2014 from --coco_dir; shapes: first generate the built-in "
                        "synthetic set (COCO layout) into --coco_dir, then read it; folder: "
                        "--image_dir with metadata.jsonl/.csv (HF imagefolder); karpathy: a "
                        "Flickr8k/30k-style --karpathy_json with --image_dir; hub: --dataset, "
                        "a datasets id, parquet file or save_to_disk folder")
    p.add_argument("--image_dir", default=None,
                   help="with --source folder or karpathy: the folder of images")
    p.add_argument("--dataset", default=None,
                   help="with --source hub: a Hub dataset id, a .parquet file or a "
                        "save_to_disk folder")
    p.add_argument("--image_column", default=None,
                   help="with --source hub: the Image column (default: the only one)")
    p.add_argument("--caption_column", default=None,
                   help="with --source folder or hub: the caption column (default: the first "
                        "of caption, captions, text, sentences); a cell may be a string or a "
                        "list of strings")
    p.add_argument("--from_model", default=None,
                   help="prepare for fine-tuning a trained VisionEncoderDecoderModel (train.py's "
                        "output or a folder shaped like nlpconnect/vit-gpt2-image-captioning): "
                        "its image processor and tokenizer are used, and train.py starts from "
                        "its weights")
    p.add_argument("--coco_dir", default=None,
                   help="COCO 2014 root holding annotations/, train2014/, val2014/ "
                        "(default: ./coco, or ./data/shapes_coco with --source shapes)")
    p.add_argument("--split", choices=["official", "karpathy"], default="official",
                   help="official: train from train2014, validation and test drawn from "
                        "val2014 without overlap; karpathy: the splits of --karpathy_json")
    p.add_argument("--karpathy_json", default=None,
                   help="Karpathy's dataset_coco.json (with --split karpathy), or "
                        "dataset_flickr8k.json / dataset_flickr30k.json (with --source "
                        "karpathy); also a parquet file or Hub id with the same columns")
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
    if (args.split == "karpathy" or args.source == "karpathy") and not args.karpathy_json:
        p.error("--split karpathy and --source karpathy need --karpathy_json")
    if args.source in ("folder", "karpathy") and not args.image_dir:
        p.error(f"--source {args.source} needs --image_dir")
    if args.source == "hub" and not args.dataset:
        p.error("--source hub needs --dataset")
    if args.download and args.source != "coco":
        p.error("--download fetches COCO only (--source coco)")
    if args.from_model:
        args.encoder_model = args.decoder_model = args.from_model
    if args.split == "official" and args.source in ("coco", "shapes"):
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
    except SourceError as e:  # the user's caption data itself: a usage error
        shutil.rmtree(work_dir, ignore_errors=True)
        return error_exit("dataloader.py", e, code=2)
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
    skipped = manifest["skipped"]
    if any(skipped.values()) or manifest["captions_truncated"]:
        print(f"skipped: {skipped.get('missing_image', 0)} listed images missing, "
              f"{skipped.get('empty_caption', 0)} empty captions, "
              f"{skipped.get('no_caption', 0)} images left without a caption; "
              f"{manifest['captions_truncated']} captions cut to --max_length {args.max_length}")
    if args.download:
        print(f"downloads: {img['downloaded']} fetched, {img['already_present']} already "
              f"present, {img['download_failed']} failed")
    print("rows: " + ", ".join(f"{s} {n}" for s, n in manifest["rows"].items())
          + f" -> {args.save_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
