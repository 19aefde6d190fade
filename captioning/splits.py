"""Which images go to which split, and how many: the candidate plan dataloader.py decodes.

Sizes count *kept* images (after the RGB filter); candidates are taken in a seeded order.
Asking for more than the data holds takes what there is and says so, in one line.
"""

import functools
import random
import sys

from .coco_download import fetch_annotations, fetch_missing
from .hub import load_hub_images, read_hub
from .sources import read_coco_split, read_imagefolder, read_karpathy


def note(message):
    print(f"dataloader.py: {message}", file=sys.stderr)


def fit_sizes(available, limit_data=None, val_size=None, test_size=None):
    """--limit_data, --val_size and --test_size against what the data holds -> the wanted
    kept-image counts {split: n or None (all)}. Asking for more than there is takes what
    there is and says so, as the HF scripts' --max_train_samples do."""
    wanted = {"train": limit_data, "validation": val_size, "test": test_size}
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


def by_split(entries):
    splits = {"train": [], "validation": [], "test": []}
    for entry in entries:
        splits[entry["split"]].append(entry)
    return splits


def plan_splits(args, splits):
    """Sources that name each image's split -> (train entries, plan). Validation and test
    candidates are shuffled with the seed (so --val_size takes a random sample, not the first
    names); a split the data lacks (a train/test-only set, say) is carved from train."""
    rng = random.Random(args.seed)
    for split in ("validation", "test"):
        rng.shuffle(splits[split])
        if not splits[split]:
            rng.shuffle(splits["train"])
            n = getattr(args, "val_size" if split == "validation" else "test_size") \
                or max(1, round(0.1 * len(splits["train"])))
            if n >= len(splits["train"]):
                raise ValueError(f"the data has no {split} split and too few training images "
                                 f"to hold {n} out")
            note(f"the data has no {split} split: holding {n} training images out for it")
            splits[split], splits["train"] = splits["train"][:n], splits["train"][n:]
    train = splits["train"]
    rng.shuffle(train)
    wanted = fit_sizes({s: len(v) for s, v in splits.items()}, args.limit_data, args.val_size,
                       args.test_size)
    return train, [("train", iter(train), wanted["train"]),
                   ("validation", iter(splits["validation"]), wanted["validation"]),
                   ("test", iter(splits["test"]), wanted["test"])]


def plan_seeded_split(args, entries):
    """Sources without splits: a seeded shuffle, then --val_size and --test_size candidates
    (default 10% each) held out, every one of them that decodes kept; the rest is train."""
    entries = list(entries)
    random.Random(args.seed).shuffle(entries)
    n_val = args.val_size or max(1, round(0.1 * len(entries)))
    n_test = args.test_size or max(1, round(0.1 * len(entries)))
    if n_val + n_test >= len(entries):
        raise ValueError(f"{len(entries)} captioned images cannot hold {n_val} validation and "
                         f"{n_test} test images and leave some to train on")
    val, test, train = entries[:n_val], entries[n_val:n_val + n_test], entries[n_val + n_test:]
    wanted = fit_sizes({"train": len(train)}, args.limit_data)
    return train, [("train", iter(train), wanted["train"]), ("validation", iter(val), None),
                   ("test", iter(test), None)]


def select_candidates(args, client=None):
    """-> (train entries, [(split, candidate iterator, wanted kept images or None)],
    fetch step or None, skipped counts). --limit_data, --val_size and --test_size count
    *kept* images; candidates are taken in a seeded order."""
    skipped, fetch = {}, None
    if args.source in ("folder", "hub"):
        if args.source == "folder":
            entries, has_split, skipped = read_imagefolder(args.image_dir, args.caption_column)
        else:
            entries, has_split, skipped, hub = read_hub(args.dataset, args.image_column,
                                                        args.caption_column)
            fetch = functools.partial(load_hub_images, hub=hub)
        if not entries:
            raise ValueError("no captioned images found")
        train, plan = (plan_splits(args, by_split(entries)) if has_split
                       else plan_seeded_split(args, entries))
    elif args.source == "karpathy" or args.split == "karpathy":
        own = args.source == "karpathy"  # Flickr-style: local images, skips counted
        skipped = {"missing_image": 0, "empty_caption": 0, "no_caption": 0} if own else {}
        splits = read_karpathy(args.karpathy_json, args.image_dir if own else args.coco_dir,
                               "" if own else args.coco_base_url, skipped if own else None)
        train, plan = plan_splits(args, splits)
    else:
        if args.download:
            fetch_annotations(args.coco_dir, args.coco_base_url, client, args.retries,
                              args.quiet)
        train = read_coco_split(args.coco_dir, "train2014", args.coco_base_url)
        held_out = read_coco_split(args.coco_dir, "val2014", args.coco_base_url)
        random.Random(args.seed).shuffle(train)
        random.Random(args.seed + 1).shuffle(held_out)
        held = iter(held_out)  # one pass: validation and test never overlap
        wanted = fit_sizes({"train": len(train), "held_out": len(held_out)}, args.limit_data,
                           args.val_size, args.test_size)
        plan = [("train", iter(train), wanted["train"]),
                ("validation", held, wanted["validation"]), ("test", held, wanted["test"])]
    if not train:
        raise ValueError("no captioned training images selected")
    if client is not None:
        fetch = functools.partial(fetch_missing, client=client, workers=args.download_workers,
                                  retries=args.retries, quiet=args.quiet)
    return train, plan, fetch, skipped
